"""A checkpoint that lacks weights the model needs is refused, not served with random ones."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bge_trio.model.encoder import ModelConfigError
from bge_trio.model.loading import OpenVinoTarget, load_encoder
from bge_trio.model.source import resolve_model
from tests.conftest import running_server
from tests.reference import ReferenceM3


def _copy_with(src: Path, dst: Path, edit: Any) -> Path:
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    edit(weights)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_a_missing_layer_weight_is_a_startup_error_naming_it(
    backend: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """On OpenVINO the checkpoint is read by the conversion's own process: its refusal
    comes back as the same one-line error, and nothing is left in the cache."""
    key = "encoder.layer.1.attention.self.query.weight"
    broken = _copy_with(tiny_model_dir, tmp_path / "broken", lambda w: w.pop(key))
    target = OpenVinoTarget(tmp_path / "openvino", 0) if backend == "openvino" else None
    with pytest.raises(ModelConfigError, match="lacks 1 weight") as error:
        load_encoder(resolve_model(str(broken)), dtype="fp32", openvino=target)
    assert key in str(error.value)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "openvino").exists()


def test_a_weight_of_the_wrong_shape_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    key = "encoder.layer.0.output.dense.bias"
    broken = _copy_with(
        tiny_model_dir, tmp_path / "shape", lambda w: w.__setitem__(key, torch.zeros(3))
    )
    with pytest.raises(ModelConfigError, match=key.replace(".", r"\.")):
        load_encoder(resolve_model(str(broken)), dtype="fp32")


def test_extra_weights_are_named_and_the_unused_pooler_is_not(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, reference: ReferenceM3
) -> None:
    def edit(weights: dict[str, torch.Tensor]) -> None:
        hidden = weights["embeddings.word_embeddings.weight"].shape[1]
        weights["lm_head.bias"] = torch.ones(4)
        weights["pooler.dense.weight"] = torch.ones(hidden, hidden)  # an embedding model's

    extra = _copy_with(tiny_model_dir, tmp_path / "extra", edit)
    with caplog.at_level(logging.INFO, logger="bge_trio.model.encoder"):
        encoder = load_encoder(resolve_model(str(extra)), dtype="fp32")
    # the weights it has are the model's own: the same vectors as the original checkpoint
    (served,) = encoder.forward(encoder.tokenize(["still fine"]))
    (expected,) = reference.encode(["still fine"])
    np.testing.assert_allclose(served.dense, expected.dense, atol=1e-5)  # type: ignore[arg-type]
    messages = [r.getMessage() for r in caplog.records]
    assert any("ignored: lm_head.bias" in m for m in messages)
    assert not any("pooler" in m for m in messages)


async def test_the_server_reports_the_broken_checkpoint_on_health(
    tiny_model_dir: Path, tmp_path: Path, settings_for: Any
) -> None:
    key = "embeddings.word_embeddings.weight"
    broken = _copy_with(tiny_model_dir, tmp_path / "no-embeddings", lambda w: w.pop(key))
    async with running_server(settings_for(broken), ready=False) as server:
        await server.engine.failed.wait()
        health = await server.client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "error"
    assert key in health.json()["error"]
