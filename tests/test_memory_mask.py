"""The key-padding attention mask: the same vectors as transformers' models with their own
mask, less memory than the (B, 1, S, S) mask they build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bge_trio.memory.allocator import configure_allocator
from bge_trio.memory.probe import PeakMeter
from bge_trio.model.encoder import Encoder
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import ModelSource
from bge_trio.model.transformer import Transformer, key_padding


def _transformers_hidden(path: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' own model of the checkpoint, given the (B, S) mask."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        hidden: torch.Tensor = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden


def _expanded_pass(encoder: Encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The served transformer's layers given a (B, 1, S, S) mask, as transformers builds it."""
    model = encoder.model
    assert isinstance(model, Transformer)
    square = key_padding(mask).expand(-1, -1, ids.shape[1], -1).contiguous()
    with torch.inference_mode():
        hidden: torch.Tensor = model.embeddings(ids, None)
        for layer in model.encoder.layer:
            hidden = layer(hidden, square)
    return hidden


def _padded_batch(
    encoder: Encoder, batch: int, seq: int
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    lengths = [seq - 7 * i for i in range(batch)]
    texts = [rng.integers(10, encoder.info.vocab_size, size=n).tolist() for n in lengths]
    ids = torch.full((batch, seq), encoder.pad_id, dtype=torch.long)
    mask = torch.zeros((batch, seq), dtype=torch.long)
    for row, text in enumerate(texts):
        ids[row, : len(text)] = torch.tensor(text)
        mask[row, : len(text)] = 1
    return texts, ids, mask


def test_the_served_mask_gives_the_vectors_of_transformers_own_mask(
    bundled_source: ModelSource, tiny_encoder: Encoder
) -> None:
    for encoder in (load_encoder(bundled_source, dtype="fp32", threads=2), tiny_encoder):
        texts, ids, mask = _padded_batch(encoder, 5, 64)
        # transformers expands it to (B, 1, S, S)
        reference = _transformers_hidden(encoder.info.source.path, ids, mask)
        served = encoder.forward(texts)
        expected = torch.nn.functional.normalize(reference[:, 0].float(), dim=-1)
        if encoder.info.pooling == "mean":
            weights = mask[..., None].float()
            pooled = (reference.float() * weights).sum(1) / weights.sum(1)
            expected = torch.nn.functional.normalize(pooled, dim=-1)
        got = np.stack([e.dense for e in served if e.dense is not None])
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)


def test_a_long_padded_batch_does_not_pay_for_an_s_by_s_mask(tiny_encoder: Encoder) -> None:
    # A narrow model, where the mask is most of a pass (BGE-M3 at S = 8192 is the same case)
    configure_allocator("predictable")
    encoder = tiny_encoder
    texts, ids, mask = _padded_batch(encoder, 16, 512)
    meter = PeakMeter()
    encoder.forward(texts)
    _expanded_pass(encoder, ids, mask)
    served = min(meter.measure(lambda: encoder.forward(texts)) for _ in range(2))
    expanded = min(meter.measure(lambda: _expanded_pass(encoder, ids, mask)) for _ in range(2))
    # a (16, 1, 512, 512) boolean mask and its float copy: 5 bytes x 4 Mi = 20 MiB
    assert expanded - served > 10 << 20
