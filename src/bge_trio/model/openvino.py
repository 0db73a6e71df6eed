"""The OpenVINO backend: the transformer compiled by OpenVINO, the heads left in torch.

Why: a short query reads every transformer weight once, so its floor is the weights'
bytes over the memory bandwidth. torch's eager forward runs 3-4x that floor on BGE-M3;
OpenVINO's CPU plugin (fused kernels, weights packed once for its matrix kernels) runs
1.4-1.9x in-process (2.8x through the server), and 1.2-1.5x torch's speed on long inputs
(docs/performance.md). Only the
transformer moves: its last hidden state (a cross-encoder: its logit) comes back as fp32
and goes through the same pooling and sparse and ColBERT heads, so every output keeps
its meaning.

What OpenVINO does differently, and what this module does about it:

- **Conversion** (``openvino.convert_model`` on the loaded fp32 torch model; weights
  stored in fp16 where bf16 is served, see :func:`convert`) takes seconds to a minute, in a
  process of its own (:mod:`.conversion`: what it holds is handed back when it exits). The
  result is cached on disk beside the probe cache, keyed like it, and written whole (a
  directory renamed into place): a restart compiles the cached model and never loads the
  torch weights. A two-layer copy is converted with it, for the memory probe. One
  process on the host converts at a time (a file lock, as the probe has): sibling
  processes that start together wait for its files instead of converting beside it.
- **One pass at a time per compiled model.** A compiled model with one stream runs its
  requests one after another, and one stream's threads are fixed when it is compiled. So
  the regular lane has its own compiled model with every core, and the express lane a
  second one with its own (fewer) threads. OpenVINO packs weights per compiled model, so
  the express lane's copy costs the transformer's weights again; the memory plan counts
  it, and ``BGE_TRIO_EXPRESS_TOKENS=0`` leaves it out.
- **Its workspace stays.** After a pass the plugin keeps its intermediate buffers at the
  largest size seen. The cost model describes transient peaks above a fixed resident size,
  so after every pass of more than ``RETAIN_TOKENS`` padded tokens the compiled model is
  told to release them (``release_memory``; it may only be called between passes, which
  one pass at a time per compiled model gives). A small pass keeps its buffers: the lane's
  next pass reuses them, and releasing them would cost a short pass more than it saves.
- **No hook between layers.** A pass runs as an asynchronous request; the thread that
  waits for it calls the between-layers hook every ``POLL_S`` and cancels the request
  when the hook stops the pass (nobody waits for it any more); the compiled model is then
  compiled again (see ``_Compiled._recompile``). A change of threads that the hook asks
  for does not reach a running pass: its threads are the compiled model's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bge_trio.locks import held
from bge_trio.model.encoder import BetweenLayers, ModelConfigError, PassAbandoned

log = logging.getLogger(__name__)

MODEL_FILE = "model.xml"
SHALLOW_FILE = "shallow.xml"
DONE_FILE = "done.json"  # written last: the directory is whole
# A pass of at most this many padded tokens keeps its buffers; a larger one hands them back
# after it. Handing them back costs the next pass their allocation, so a stream of batches
# at the default batch cap (1,024 tokens) keeps them; what they hold (about 40 MB on
# BGE-M3) is reused by the same lane's next pass, so it is counted once, and it is well
# under the memory headroom.
RETAIN_TOKENS = 1024
REFUSED = 2  # the conversion process's exit code for a checkpoint it cannot serve
# How often the thread waiting for a pass asks whether anyone still waits for it.
POLL_S = 0.05


def available() -> bool:
    """Whether OpenVINO is installed (``pip install 'bge-trio[openvino]'``)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str:
    import openvino

    return str(openvino.__version__)


# What a conversion holds, beyond the versions it was made with: the conversion cache and
# the probe cache key on it, so a conversion made another way is made again, and probed.
# 2: attention gets the padding mask as (B, 1, 1, S), not transformers' (B, 1, S, S)
# 3: BERT and (XLM-)RoBERTa are converted from our own transformer (.transformer)
CONVERSION = "3"


class _Traced(torch.nn.Module):
    """What is converted: token ids, the (B, S) padding mask (and token types) in, fp32 out.

    The transformer (:mod:`.transformer`) hands attention the mask as (B, 1, 1, S),
    broadcast over the queries, as torch serves it: with transformers' models the graph
    built a (B, 1, S, S) mask, and OpenVINO's attention read S² mask values per head.
    Measured on the full-size BGE-M3 stand-in (bf16, 2 threads, AMX): one 2048-token text
    1,379 ms against 1,534 ms with transformers' mask; 4 x 256 and 14 tokens unchanged
    within noise.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(*inputs).float()  # type: ignore[no-any-return]


def convert(
    model: torch.nn.Module,
    segments: bool,
    directory: Path,
    shallow: Callable[[], contextlib.AbstractContextManager[int]],
    *,
    half_weights: bool,
) -> float:
    """Convert the fp32 ``model`` (and a two-layer copy, entered with ``shallow``) into
    ``directory``, written whole: into a temporary directory first, renamed into place.
    Returns the seconds it took.

    ``half_weights`` (served in bf16) stores the weights in fp16, and the compiled model
    computes in bf16. Measured on all-MiniLM-L6-v2 (160 corpus texts, dense cosine to torch
    fp32): min 0.99995, where converting torch's bf16 model (bf16 weights and bf16 between
    every op) gave 0.99985; on the full-size BGE-M3 stand-in both are resident in about
    1.3 GB (torch bf16: 1.47 GB) and run at the same speed within noise. An fp32 file
    would read 2.2 GB of weights into the page cache.
    """
    import openvino as ov

    started = time.perf_counter()
    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    inputs = 3 if segments else 2
    example = tuple(torch.ones((2, 8), dtype=torch.long) for _ in range(inputs))
    shapes = [ov.PartialShape([-1, -1]) for _ in range(inputs)]
    traced = _Traced(model)
    try:
        # the tracer warns of branches fixed at the example's shape: transformers'
        # causal-mask and cache branches, which an encoder never takes
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = ov.convert_model(traced, example_input=example, input=shapes)
            ov.save_model(full, staging / MODEL_FILE, compress_to_fp16=half_weights)
            del full
            with shallow() as depth:
                small = ov.convert_model(traced, example_input=example, input=shapes)
            ov.save_model(small, staging / SHALLOW_FILE, compress_to_fp16=half_weights)
        done = {"openvino": version(), "shallow_layers": depth}
        (staging / DONE_FILE).write_text(json.dumps(done))
        try:
            staging.rename(directory)
        except OSError:  # another process finished first: keep its copy
            if not converted(directory):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return time.perf_counter() - started


@contextlib.contextmanager
def conversion_lock(directory: Path) -> Iterator[None]:
    """Hold the host-wide lock on converting into ``directory`` (blocks: call from a
    worker thread). Sibling processes (hypercorn workers, Ray actors on one node) start
    together; each conversion holds the fp32 model and its trace (several GB for BGE-M3),
    so one converts and the others wait for its files instead of converting beside it."""
    with held(directory.with_name(f"{directory.name}.lock")):
        yield


def convert_once(model_dir: Path, directory: Path, *, half_weights: bool, threads: int) -> bool:
    """Convert ``model_dir`` into ``directory`` unless it is converted already, by this
    process or a sibling (see :func:`conversion_lock`); whether this call converted."""
    if converted(directory):
        return False
    with conversion_lock(directory):
        if converted(directory):  # a sibling converted while this one waited
            return False
        convert_in_child(model_dir, directory, half_weights=half_weights, threads=threads)
    return True


def convert_in_child(model_dir: Path, directory: Path, *, half_weights: bool, threads: int) -> None:
    """Convert ``model_dir`` into ``directory`` (see :func:`convert`) in a child process
    (:mod:`.conversion`); raises :class:`ModelConfigError` with the child's reason when
    the checkpoint cannot be served, ``RuntimeError`` when the conversion failed otherwise."""
    command = [sys.executable, "-m", "bge_trio.model.conversion", str(model_dir), str(directory)]
    command += ["--threads", str(threads), *(["--half-weights"] if half_weights else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return
    lines = done.stderr.strip().splitlines() or ["(no output)"]
    if done.returncode == REFUSED:
        raise ModelConfigError(lines[-1])
    log.error("the OpenVINO conversion failed:\n%s", "\n".join(lines[-30:]))
    raise RuntimeError(f"the OpenVINO conversion failed (exit {done.returncode}): {lines[-1]}")


def converted(directory: Path) -> bool:
    """Whether ``directory`` holds a whole conversion."""
    return (directory / DONE_FILE).is_file()


class _Compiled:
    """One compiled model and its one request: passes run one at a time on it."""

    def __init__(self, core: Any, model: Any, threads: int, precision: str) -> None:
        self._core, self._model = core, model
        self._options = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": precision,
        }
        self.model = self._compile()
        self.request = self.model.create_infer_request()
        self.warm_up()

    def _compile(self) -> Any:
        return self._core.compile_model(self._model, "CPU", self._options)

    def warm_up(self) -> None:
        """One tiny pass: the plugin packs the weights on its first pass, so the resident
        size is whole from the start."""
        example = [np.ones((1, 4), dtype=np.int64) for _ in self.model.inputs]
        self.run(example, None)

    def _recompile(self) -> None:
        """A fresh compiled model after a cancelled pass.

        OpenVINO 2026.4's CPU plugin leaves a cancelled pass's shapes half-updated in the
        compiled graph: the next pass of another shape fails its shape inference (a pass
        of the cancelled shape repairs it, at the cost of the whole pass). Compiling again
        takes about a second on BGE-M3, once per abandoned pass; the old model is dropped
        first, so its packed weights are freed before the new one packs its own.
        """
        del self.request, self.model
        self.model = self._compile()
        self.request = self.model.create_infer_request()
        self.warm_up()

    def run(self, inputs: list[np.ndarray[Any, Any]], between: BetweenLayers | None) -> Any:
        request = self.request
        request.start_async(inputs)
        if between is None:
            request.wait()
        else:
            while not request.wait_for(int(POLL_S * 1000)):
                try:
                    between()
                except PassAbandoned:
                    request.cancel()
                    with contextlib.suppress(RuntimeError):  # "canceled"
                        request.wait()
                    self._recompile()
                    raise
        out = request.get_output_tensor(0).data.copy()
        if inputs[0].size > RETAIN_TOKENS:
            self.model.release_memory()
        return out


class OpenVinoTransformer:
    """The compiled transformer: the regular lane's model, the express lane's, and the
    two-layer copy while the probe runs."""

    def __init__(self, directory: Path, *, threads: int, express_threads: int, dtype: str) -> None:
        import openvino as ov

        self.directory = directory
        self.version = f"{version()} conversion {CONVERSION}"
        self._core = ov.Core()
        self._precision = "bf16" if dtype == "bf16" else "f32"
        self._threads = threads
        # read once, compiled per lane: both compiled models pack their weights from one
        # mapping of the file (a mapping per compiled model would hold the file twice)
        model = self._core.read_model(directory / MODEL_FILE)
        self._regular = _Compiled(self._core, model, threads, self._precision)
        self._express = (
            _Compiled(self._core, model, express_threads, self._precision)
            if express_threads
            else None
        )
        self._active = self._regular
        self.shallow_layers = int(json.loads((directory / DONE_FILE).read_text())["shallow_layers"])

    def weight_bytes(self) -> int:
        """The converted weights' bytes (each compiled model packs its own copy)."""
        size = (self.directory / MODEL_FILE).with_suffix(".bin").stat().st_size
        return size * (2 if self._express is not None else 1)

    def run(
        self,
        inputs: list[torch.Tensor],
        between: BetweenLayers | None,
        express: bool,
    ) -> torch.Tensor:
        compiled = self._express if express and self._express is not None else self._active
        arrays = [tensor.numpy() for tensor in inputs]
        return torch.from_numpy(compiled.run(arrays, between))

    @contextlib.contextmanager
    def shallow(self) -> Iterator[int]:
        """Run the two-layer copy while the block runs (the probe's passes); yields its depth."""
        small = self._core.read_model(self.directory / SHALLOW_FILE)
        self._active = _Compiled(self._core, small, self._threads, self._precision)
        try:
            yield self.shallow_layers
        finally:
            self._active = self._regular
