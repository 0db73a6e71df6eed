"""Which compute path runs the transformer: torch (the reference) or OpenVINO.

``BGE_TRIO_BACKEND``:

- ``torch`` (default): torch's eager forward, the reference every output is tested against.
- ``openvino``: the transformer converted and compiled by OpenVINO (:mod:`bge_trio.model.
  openvino`), its conversion cached under ``BGE_TRIO_CACHE_DIR`` keyed by the model, the
  served dtype and every library that shapes the conversion.
- ``auto``: OpenVINO where it is installed, the dtype is one it serves, and it measured
  faster here. The measurement: the first start loads the torch model and times two
  passes on it, a 16-token query and 4 texts of 128 tokens (each twice, the faster
  counts), converts and compiles, times the same passes with OpenVINO, and keeps OpenVINO
  only if it is faster at both. The decision is written beside the conversion, so later
  starts go straight to the chosen backend. Both models are in memory while they are
  compared, so where the memory limit leaves less than twice the weights' bytes beside
  the torch model, ``auto`` stays on torch without measuring (memory comes first).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bge_trio import __version__
from bge_trio.config import ConfigError, Settings
from bge_trio.memory.budget import detect_memory_limit
from bge_trio.memory.cache import cpu_identity, make_key, model_identity
from bge_trio.memory.probe import malloc_trim, resident_bytes
from bge_trio.model import openvino as ov_backend
from bge_trio.model.encoder import Encoder
from bge_trio.model.loading import (
    OpenVinoTarget,
    bf16_supported,
    choose_dtype,
    compile_openvino,
    model_kind,
)
from bge_trio.model.source import ModelSource

log = logging.getLogger("bge_trio.engine")

CHOICE_FILE = "choice.json"
# The passes ``auto`` times on both backends: (texts, tokens each).
COMPARED_SHAPES = ((1, 16), (4, 128))


# OpenVINO's express lane takes texts of at most this many tokens (torch's: 256). A running
# OpenVINO pass keeps the threads it was compiled with, so an express pass beside it
# oversubscribes the cores for as long as it runs (torch's regular pass gives up a thread
# at its next layer instead): measured on the full-size stand-in in bf16 with 256, 16
# clients of 256-token texts got 428 tokens/s through the server, against 558 from the
# raw compiled model and 464 from torch bf16 (docs/performance.md has the run with 64).
# Queries are shorter than this; passages wait for the regular lane, which is fast.
OPENVINO_EXPRESS_TOKENS = 64


def express_tokens(settings: Settings) -> int:
    """The express lane's longest text on the backend the settings may choose."""
    if settings.backend == "torch" or not ov_backend.available():
        return settings.express_tokens
    return min(settings.express_tokens, OPENVINO_EXPRESS_TOKENS)


def openvino_directory(settings: Settings, source: ModelSource) -> Path:
    """Where the conversion of this model in the served dtype is cached."""
    dtype, _ = choose_dtype(settings.dtype, bf16_supported())
    key = make_key(
        package=__version__,
        model=model_identity(source),
        kind=model_kind(source.path),
        dtype=dtype,
        torch=torch.__version__,
        transformers=_installed("transformers"),
        openvino=ov_backend.version(),
        conversion=ov_backend.CONVERSION,
    )
    return settings.cache_dir / f"openvino-{key.digest}"


def openvino_target(
    settings: Settings,
    source: ModelSource,
    *,
    express_threads: int,
    on_step: Callable[[str], None] | None = None,
) -> OpenVinoTarget | None:
    """The OpenVINO target to load with, or None for torch (``auto`` decided already, or
    torch asked for)."""
    if settings.backend == "torch":
        return None
    if not ov_backend.available():
        if settings.backend == "auto":
            return None
        raise ConfigError(
            "BGE_TRIO_BACKEND=openvino needs OpenVINO: pip install 'bge-trio[openvino]'"
        )
    dtype, _ = choose_dtype(settings.dtype, bf16_supported())
    if settings.backend == "auto" and (dtype == "int8" or (settings.workers or 1) > 1):
        return None
    directory = openvino_directory(settings, source)
    return OpenVinoTarget(directory, express_threads, on_step or (lambda _step: None))


def decided(target: OpenVinoTarget) -> str | None:
    """``auto``'s recorded decision for this machine, if there is one."""
    path = target.directory / CHOICE_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("cpu") != cpu_identity() or record.get("threads") != torch.get_num_threads():
        return None
    return str(record["backend"])


def pass_seconds(encoder: Encoder) -> list[float]:
    """The faster of two runs of each of :data:`COMPARED_SHAPES`."""
    seconds = []
    for batch, seq in COMPARED_SHAPES:
        ids = [[min(10 + i, encoder.info.vocab_size - 1)] * seq for i in range(batch)]
        runs = []
        for _ in range(2):
            started = time.perf_counter()
            encoder.forward(ids, encoder.info.outputs)
            runs.append(time.perf_counter() - started)
        seconds.append(min(runs))
    return seconds


def room_to_compare(settings: Settings, encoder: Encoder, root: Path) -> bool:
    """Whether a compiled copy of the weights (twice, with an express lane) fits beside
    the loaded torch model with the headroom to spare."""
    limit = detect_memory_limit(root, settings.memory_limit_bytes).bytes
    needed = 2 * encoder.weight_bytes() + settings.memory_headroom_bytes
    return limit - resident_bytes() > needed


def record(target: OpenVinoTarget, backend: str, torch_s: list[float], ov_s: list[float]) -> None:
    """Write ``auto``'s decision beside the conversion, whole (temp file, rename)."""
    body = {
        "backend": backend,
        "cpu": cpu_identity(),
        "threads": torch.get_num_threads(),
        "shapes": [list(shape) for shape in COMPARED_SHAPES],
        "torch_s": torch_s,
        "openvino_s": ov_s,
    }
    path = target.directory / CHOICE_FILE
    staging = path.with_name(f"{CHOICE_FILE}.tmp-{os.getpid()}")
    staging.write_text(json.dumps(body, indent=1))
    staging.replace(path)


def choose_by_measuring(
    settings: Settings, torch_encoder: Encoder, target: OpenVinoTarget, threads: int, root: Path
) -> Encoder:
    """``auto`` on its first start here: the faster backend, measured (see above)."""
    if not room_to_compare(settings, torch_encoder, root):
        log.info("backend auto: torch (no room beside it to compare an OpenVINO copy)")
        return torch_encoder
    torch_s = pass_seconds(torch_encoder)
    compiled = compile_openvino(torch_encoder, target, threads)
    ov_s = pass_seconds(compiled)
    faster = all(o < t for o, t in zip(ov_s, torch_s, strict=True))
    chosen = "openvino" if faster else "torch"
    record(target, chosen, torch_s, ov_s)
    log.info(
        "backend auto: %s (16-token query %.1f ms torch, %.1f ms OpenVINO; 4x128 %.1f ms, %.1f ms)",
        chosen,
        torch_s[0] * 1e3,
        ov_s[0] * 1e3,
        torch_s[1] * 1e3,
        ov_s[1] * 1e3,
    )
    keep = compiled if faster else torch_encoder
    del compiled, torch_encoder
    malloc_trim()
    return keep


def _installed(package: str) -> str:
    """The installed version of ``package`` (without importing it), or ``none``."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"
