"""Our own transformer and tokenizer against transformers' on the same checkpoints.

The server runs BERT and (XLM-)RoBERTa through :mod:`bge_trio.model.transformer` and every
tokenizer through :mod:`bge_trio.model.tokens`; transformers only loads the rest. These
compare them directly, on padded batches (the mask), pairs (token types, classifier heads)
and the checkpoint layouts transformers accepts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bge_trio.model.loading import load_encoder
from bge_trio.model.source import ModelSource, resolve_model
from bge_trio.model.tokens import Tokenizer
from bge_trio.model.transformer import Transformer, Wrapped
from bge_trio.testing.tiny_reranker import build_tiny_bert_cross_encoder

TEXTS = [
    "What do cats eat?",
    "Cats   eat fish,\tmice and\nbirds; they don't eat grass.",
    "Ünïcödé \uff46\uff55\uff4c\uff4c width and 日本語 text",
    "a",
    "",
    "It's 3.14 -- isn't it? I'm sure we've seen they're right!",
]


def _transformers_model(path: Path) -> Any:
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(path))
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    auto: Any = AutoModelForSequenceClassification if classifier else AutoModel
    return auto.from_pretrained(str(path), dtype=torch.float32).eval()


def _padded(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in ids)
    batch = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    return batch, mask


def _models(name: str, tmp_path: Path, bundled: ModelSource, tiny: Path, reranker: Path) -> Path:
    if name == "bert-cross-encoder":
        return build_tiny_bert_cross_encoder(tmp_path / "bert", bundled.path)
    return {"minilm": bundled.path, "tiny-m3": tiny, "tiny-reranker": reranker}[name]


@pytest.mark.parametrize("name", ["minilm", "tiny-m3", "tiny-reranker", "bert-cross-encoder"])
def test_the_transformer_equals_transformers_model(
    name: str,
    tmp_path: Path,
    bundled_source: ModelSource,
    tiny_model_dir: Path,
    tiny_reranker_dir: Path,
) -> None:
    """Last hidden states (a cross-encoder: logits) of a padded batch of texts and of
    pairs, with token types where the model has them."""
    path = _models(name, tmp_path, bundled_source, tiny_model_dir, tiny_reranker_dir)
    encoder = load_encoder(resolve_model(str(path)), dtype="fp32", threads=2)
    assert isinstance(encoder.model, Transformer)
    theirs = _transformers_model(path)
    rows = encoder.tokenize(TEXTS) + encoder.pair_ids(TEXTS[0], TEXTS[1:])
    ids, mask = _padded(rows, encoder.pad_id)
    segments = encoder._segments(ids).get("token_type_ids")
    if name == "bert-cross-encoder":
        assert segments is not None
        assert int(segments.sum()) > 0
    with torch.inference_mode():
        mine = encoder.model(ids, mask, segments)
        named = {"input_ids": ids, "attention_mask": mask}
        if segments is not None:
            named["token_type_ids"] = segments
        out = theirs(**named)
        want = out.logits if encoder.info.kind == "reranker" else out.last_hidden_state
    real = mask.bool() if encoder.info.kind == "embedding" else slice(None)
    np.testing.assert_allclose(mine[real].numpy(), want[real].numpy(), atol=2e-5)
    if encoder.info.kind == "reranker":
        assert len(set(np.round(want[:, 0].numpy(), 4).tolist())) > 3  # the scores differ


def _assert_same_vectors(original: ModelSource, copy: Path) -> None:
    """The copy loads on our own transformer and serves the original's very vectors."""
    want = load_encoder(original, dtype="fp32", threads=2)
    got = load_encoder(resolve_model(str(copy)), dtype="fp32", threads=2)
    assert isinstance(got.model, Transformer)
    batch = want.tokenize(TEXTS)
    for a, b in zip(want.forward(batch), got.forward(batch), strict=True):
        np.testing.assert_array_equal(a.dense, b.dense)


def test_a_checkpoint_with_a_prefix_and_old_layer_norm_names_loads_the_same(
    bundled_source: ModelSource, tmp_path: Path
) -> None:
    """transformers accepts ``bert.``-prefixed weights (saved from a task model) and
    TensorFlow-era ``LayerNorm.gamma``/``beta``: so does the server, to the same vectors."""
    copy = tmp_path / "renamed"
    shutil.copytree(bundled_source.path, copy)
    weights = load_file(str(copy / "model.safetensors"))
    renamed = {
        "bert."
        + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in weights.items()
    }
    assert any(k.endswith("gamma") for k in renamed)
    save_file(renamed, str(copy / "model.safetensors"), metadata={"format": "pt"})
    _assert_same_vectors(bundled_source, copy)


def test_a_pytorch_model_bin_checkpoint_loads_the_same(
    bundled_source: ModelSource, tmp_path: Path
) -> None:
    """Checkpoints saved before safetensors (``pytorch_model.bin``, BGE-M3's own among them)."""
    copy = tmp_path / "bin"
    shutil.copytree(bundled_source.path, copy)
    torch.save(load_file(str(copy / "model.safetensors")), copy / "pytorch_model.bin")
    (copy / "model.safetensors").unlink()
    _assert_same_vectors(bundled_source, copy)


def test_other_architectures_are_served_through_transformers(
    bundled_source: ModelSource, tmp_path: Path
) -> None:
    """An encoder this server does not write out (DistilBERT here) is loaded by
    transformers and serves its vectors: mean-pooled hidden states of transformers' model."""
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    directory = tmp_path / "distilbert"
    config = DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    DistilBertModel(config).save_pretrained(str(directory))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled_source.path / name, directory / name)
    shutil.copytree(bundled_source.path / "1_Pooling", directory / "1_Pooling")
    shutil.copy(bundled_source.path / "modules.json", directory / "modules.json")
    encoder = load_encoder(resolve_model(str(directory)), dtype="fp32", threads=2)
    assert isinstance(encoder.model, Wrapped)
    assert encoder.layers == 2
    assert encoder.info.dimension == 32
    rows = encoder.tokenize(TEXTS)
    ids, mask = _padded(rows, encoder.pad_id)
    with torch.inference_mode():
        hidden = _transformers_model(directory)(input_ids=ids, attention_mask=mask)[0]
    weights = mask[..., None].float()
    want = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    got = np.stack([e.dense for e in encoder.forward(rows) if e.dense is not None])
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["minilm", "tiny-m3"])
def test_the_tokenizer_reads_as_transformers_fast_tokenizer_does(
    name: str, bundled_source: ModelSource, tiny_model_dir: Path
) -> None:
    """Ids, offsets, special-token masks, pieces, special ids and decoding, against
    transformers' ``PreTrainedTokenizerFast`` on the same ``tokenizer.json``."""
    from transformers import PreTrainedTokenizerFast

    path = bundled_source.path if name == "minilm" else tiny_model_dir
    ours = Tokenizer.read(path)
    theirs = PreTrainedTokenizerFast.from_pretrained(str(path))
    for role in ("cls", "sep", "pad", "unk", "eos", "mask"):
        assert ours.id_of(role) == getattr(theirs, f"{role}_token_id"), role
    for special in (True, False):
        want = theirs(
            TEXTS,
            add_special_tokens=special,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        got = ours.encode(TEXTS, add_special_tokens=special)
        assert [e.ids for e in got] == want["input_ids"]
        assert [e.offsets for e in got] == [list(map(tuple, o)) for o in want["offset_mapping"]]
        assert [e.special_tokens_mask for e in got] == want["special_tokens_mask"]
    for ids in want["input_ids"] + [[ours.id_of("cls") or 0, *want["input_ids"][1]]]:
        assert ours.pieces(ids) == theirs.convert_ids_to_tokens(ids)
        for skip in (True, False):
            assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip)
    long = " ".join(TEXTS) * 200  # a saved truncation (MiniLM's file: 128) is not applied
    assert len(ours.encode([long])[0].ids) == len(theirs(long, truncation=False)["input_ids"])


def test_a_checkpoint_without_tokenizer_json_gets_its_class_s_tokenizer(
    bundled_source: ModelSource, tmp_path: Path
) -> None:
    """Only ``vocab.txt`` (BERT): transformers' fast tokenizer for the class, the same ids."""
    copy = tmp_path / "vocab-only"
    shutil.copytree(bundled_source.path, copy)
    (copy / "tokenizer.json").unlink()
    with_file = Tokenizer.read(bundled_source.path)
    without = Tokenizer.read(copy)
    assert [e.ids for e in without.encode(TEXTS)] == [e.ids for e in with_file.encode(TEXTS)]
    assert without.special == with_file.special


def test_special_tokens_written_as_objects_are_read(
    bundled_source: ModelSource, tmp_path: Path
) -> None:
    """Older files name a special token as ``{"content": "[CLS]", "lstrip": ...}``."""
    copy = tmp_path / "object-specials"
    shutil.copytree(bundled_source.path, copy)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        config = json.loads((copy / name).read_text())
        for key, value in config.items():
            if key.endswith("_token"):
                config[key] = {"content": value, "lstrip": False, "normalized": False}
        (copy / name).write_text(json.dumps(config))
    assert Tokenizer.read(copy).special == Tokenizer.read(bundled_source.path).special
    assert Tokenizer.read(copy).id_of("cls") == 101
