"""Randomly initialised cross-encoders in the layout of BAAI/bge-reranker-v2-m3.

A cross-encoder is XLM-RoBERTa with a one-logit classification head
(``XLMRobertaForSequenceClassification``, ``num_labels=1``): it reads a (query, document)
pair as one sequence and its logit is the pair's relevance.

``build_tiny_reranker``: a few hundred kilobytes, the tiny BGE-M3 model's tokenizer, and
the very same loading code as the real one; its scores are meaningless but deterministic
for a given seed, which is what reference tests need. ``build_full_reranker``:
bge-reranker-v2-m3's architecture and vocabulary (the same 568M backbone as BGE-M3, 8194
positions), random weights: it costs the time and memory of the real model, so it is what
speed and memory are measured on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bge_trio.testing.tiny_m3 import M3_LAYERS, M3_SHAPE, write_tokenizer, xlm_roberta_config


def build_full_reranker(directory: Path, *, layers: int = M3_LAYERS, seed: int = 0) -> Path:
    """Write a full-size bge-reranker-v2-m3 stand-in (random weights) into ``directory``:
    2.27 GB of fp32 safetensors, about 20 s to build."""
    return build_tiny_reranker(directory, layers=layers, seed=seed, **M3_SHAPE)


def build_tiny_reranker(
    directory: Path,
    *,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int | None = None,
    max_seq_length: int = 512,
    vocab_size: int = 250,
    model_vocab_size: int | None = None,
    layer_norm_eps: float = 1e-12,
    seed: int = 0,
) -> Path:
    """Write the tiny cross-encoder into ``directory`` (created if needed) and return it.

    The classification head's weights are drawn wider than transformers' initialiser so
    the logits of different pairs differ by more than rounding (random scores, spread).
    """
    from transformers import XLMRobertaForSequenceClassification

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    learnt = write_tokenizer(directory, vocab_size, max_seq_length)
    config = xlm_roberta_config(
        vocab_size=model_vocab_size or learnt,
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        intermediate_size=intermediate_size or hidden_size * 2,
        max_seq_length=max_seq_length,
        layer_norm_eps=layer_norm_eps,
        num_labels=1,
        architectures=["XLMRobertaForSequenceClassification"],
    )
    model = XLMRobertaForSequenceClassification(config)
    with torch.no_grad():
        torch.nn.init.normal_(model.classifier.dense.weight, std=1.0)
        torch.nn.init.normal_(model.classifier.out_proj.weight, std=1.0 / hidden_size**0.5)
        torch.nn.init.zeros_(model.classifier.out_proj.bias)
    model.save_pretrained(str(directory))
    return directory


def build_tiny_bert_cross_encoder(directory: Path, tokenizer_from: Path) -> Path:
    """A tiny BERT-style cross-encoder (random weights, ``BertForSequenceClassification``:
    the pooler, then a one-logit classifier) with the tokenizer files of the BERT model
    in ``tokenizer_from`` (all-MiniLM-L6-v2's): two token types, so a pair's passes carry
    token type ids."""
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        type_vocab_size=2,
        architectures=["BertForSequenceClassification"],
    )
    config.num_labels = 1
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # scores spread wider than rounding, and the types matter
        torch.nn.init.normal_(model.classifier.weight, std=1.0)
        torch.nn.init.normal_(model.bert.embeddings.token_type_embeddings.weight, std=1.0)
    model.save_pretrained(str(directory))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / name, directory / name)
    return directory
