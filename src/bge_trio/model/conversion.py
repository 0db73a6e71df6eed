"""OpenVINO's conversion of a model directory, in a process of its own.

Why a process: converting loads the fp32 torch weights, traces the model and runs
OpenVINO's PyTorch frontend, and what that leaves behind stays resident in the process
that did it (measured on all-MiniLM-L6-v2: 849 MB resident after converting and
compiling in one process, 648 MB when the conversion was cached; on BGE-M3 several GB).
The memory plan reads the resident size after loading, so a first start inside a
container limit would plan with less room than every later start, or not start at all.
A child process hands all of it back when it exits; the server only compiles the files.

``python -m bge_trio.model.conversion MODEL_DIR TARGET_DIR [--half-weights] --threads N``
is the child (started by :func:`.openvino.convert_in_child`): exit 0 when the directory
is whole, 2 with the one-line reason when the checkpoint cannot be served (a
:class:`ModelConfigError`), 1 on anything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bge_trio.model.encoder import ModelConfigError
from bge_trio.model.openvino import REFUSED


def main(argv: list[str]) -> int:
    import torch

    from bge_trio.model import openvino as ov_backend
    from bge_trio.model.loading import load_encoder
    from bge_trio.model.source import ModelSource

    parser = argparse.ArgumentParser(prog="python -m bge_trio.model.conversion")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--half-weights", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        source = ModelSource(args.model_dir, str(args.model_dir), None)
        encoder = load_encoder(source, dtype="fp32", threads=args.threads)
    except ModelConfigError as exc:
        print(str(exc).replace("\n", " "), file=sys.stderr)
        return REFUSED
    assert encoder.model is not None  # a torch encoder
    ov_backend.convert(
        encoder.model,
        encoder.has_segments,
        args.directory,
        encoder.shallow,
        half_weights=args.half_weights,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
