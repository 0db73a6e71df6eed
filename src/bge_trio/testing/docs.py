"""The vector decoder that docs/api.md gives clients, loaded from the document itself,
so the tests and benchmarks check the code users copy."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Decoder = Callable[[Any, str, int], npt.NDArray[np.float32]]


def decoder_from_docs(api_md: Path) -> Decoder:
    """``decode_vector(value, encoding_format, dimension)`` from the Python block in ``api_md``."""
    found = re.search(r"```python\n(.*?def decode_vector.*?)```", api_md.read_text(), re.S)
    if found is None:
        raise LookupError(f"{api_md} has no decode_vector block")
    namespace: dict[str, Any] = {}
    exec(compile(found.group(1), str(api_md), "exec"), namespace)  # the documented code, as is
    decoder: Decoder = namespace["decode_vector"]
    return decoder
