"""Randomly initialised models in the exact BGE-M3 directory layout.

``build_tiny_m3``: real BGE-M3 is 2.2 GB; this one is a few hundred kilobytes and
loads in well under a second, yet it goes through the very same loading code: an
XLM-RoBERTa ``config.json`` and safetensors weights, an ``XLMRobertaTokenizerFast``,
and the ``sparse_linear.pt`` / ``colbert_linear.pt`` heads. Its outputs are
meaningless but deterministic for a given seed, which is what reference tests need.

``build_full_m3``: BAAI/bge-m3's architecture and vocabulary size (250,002 x 1024
embeddings, 24 layers of width 1024, 16 heads, feed-forward 4096, 8194 positions),
random weights. It costs exactly the time and memory of the real model, so it is what
speed and memory are measured on; its vectors mean nothing. ``layers`` makes a
shallow variant (the full embedding matrix, fewer layers) for tests that need the
whole vocabulary but not the depth. Its tokenizer is the tiny one: text covers a few
hundred ids, token-id input reaches all 250,002.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A cat sleeps on the warm windowsill while a kitten plays.",
    "Stock markets fell sharply as investors worried about interest rates.",
    "Le chat dort sur le rebord de la fenêtre.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El mercado de valores cayó bruscamente.",
    "Hybrid retrieval combines dense, sparse and multi-vector scores.",
    "Embedding servers turn text into vectors for search and RAG.",
    "0123456789 numbers, punctuation; and symbols: !?-+*/=()[]{}",
]


# BAAI/bge-m3's config.json, the numbers that decide time and memory.
M3_VOCAB_SIZE = 250_002
M3_HIDDEN_SIZE = 1024
M3_LAYERS = 24
M3_HEADS = 16
M3_INTERMEDIATE_SIZE = 4096
M3_MAX_SEQ_LENGTH = 8192
# The builders' arguments for that shape (every XLM-R large model of the BGE-M3 family).
M3_SHAPE: dict[str, Any] = {
    "hidden_size": M3_HIDDEN_SIZE,
    "heads": M3_HEADS,
    "intermediate_size": M3_INTERMEDIATE_SIZE,
    "max_seq_length": M3_MAX_SEQ_LENGTH,
    "model_vocab_size": M3_VOCAB_SIZE,
    "layer_norm_eps": 1e-5,
}


def build_full_m3(directory: Path, *, layers: int = M3_LAYERS, seed: int = 0) -> Path:
    """Write a full-size BGE-M3 stand-in (random weights) into ``directory``.

    The 24-layer model is 2.27 GB of fp32 safetensors and takes about 20 s to build.
    """
    return build_tiny_m3(directory, layers=layers, seed=seed, **M3_SHAPE)


def build_tiny_m3(
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
    """Write the tiny model into ``directory`` (created if needed) and return it.

    ``vocab_size`` is what the tokenizer learns; ``model_vocab_size`` (default: the
    tokenizer's) is the embedding matrix's row count.
    """
    from transformers import XLMRobertaModel

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
    )
    model = XLMRobertaModel(config, add_pooling_layer=False)
    model.save_pretrained(str(directory))
    torch.save(torch.nn.Linear(hidden_size, 1).state_dict(), directory / "sparse_linear.pt")
    torch.save(
        torch.nn.Linear(hidden_size, hidden_size).state_dict(), directory / "colbert_linear.pt"
    )
    return directory


def write_tokenizer(directory: Path, vocab_size: int, max_seq_length: int) -> int:
    """Train the tiny XLM-R-style tokenizer on the corpus, save it in ``directory`` and
    return how many tokens it learnt."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import UnigramTrainer
    from transformers import XLMRobertaTokenizerFast  # type: ignore[attr-defined]

    # XLM-R's special tokens, in XLM-R's order: <s>=0, <pad>=1, </s>=2, <unk>=3.
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", shrinking_factor=0.9
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    fast = XLMRobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=max_seq_length,
    )
    fast.save_pretrained(str(directory))
    return int(tok.get_vocab_size())


def xlm_roberta_config(
    *,
    vocab_size: int,
    hidden_size: int,
    layers: int,
    heads: int,
    intermediate_size: int,
    max_seq_length: int,
    layer_norm_eps: float,
    **extra: Any,
) -> Any:
    """An XLM-RoBERTa config with XLM-R's special token ids and position offset."""
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate_size,
        layer_norm_eps=layer_norm_eps,
        max_position_embeddings=max_seq_length + 2,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        **extra,
    )
