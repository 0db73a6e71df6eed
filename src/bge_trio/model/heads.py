"""The two extra BGE-M3 heads, exactly as FlagEmbedding's BGEM3FlagModel uses them.

* sparse (lexical) weights: ``relu(sparse_linear(h))`` per token; special tokens
  (CLS, EOS, PAD, UNK) are dropped, only weights > 0 are kept, and a token id that
  occurs several times keeps its largest weight.
* ColBERT (multi-vector): ``normalize(colbert_linear(h[:, 1:]) * mask[:, 1:])``,
  one vector for every real token after CLS (the final EOS included).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

SPARSE_FILE = "sparse_linear.pt"
COLBERT_FILE = "colbert_linear.pt"


def load_linear(path: Path, hidden_size: int) -> torch.nn.Linear | None:
    """Load a head saved as a Linear state dict, or None when the file is absent."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    weight = state["weight"]
    if weight.ndim != 2 or weight.shape[1] != hidden_size:
        raise ValueError(
            f"{path.name}: weight shape {tuple(weight.shape)} does not match hidden size "
            f"{hidden_size}"
        )
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in state)
    linear.load_state_dict(state)
    return linear.float().eval()


def sparse_token_weights(sparse_linear: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """(B, S, H) -> (B, S) non-negative weight of every position."""
    return torch.relu(sparse_linear(hidden.float())).squeeze(-1)


def sparse_vector(
    token_ids: Iterable[int], weights: npt.NDArray[np.float32], unused_ids: frozenset[int]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """One text's lexical weights as (ascending unique token ids, their max weight)."""
    ids = np.fromiter(token_ids, dtype=np.int64)
    w = weights[: len(ids)]
    keep = w > 0
    if unused_ids:
        keep &= ~np.isin(ids, np.fromiter(unused_ids, dtype=np.int64))
    ids, w = ids[keep], w[keep]
    unique, inverse = np.unique(ids, return_inverse=True)
    values = np.zeros(len(unique), dtype=np.float32)
    np.maximum.at(values, inverse, w)
    return unique, values


def colbert_vectors(
    colbert_linear: torch.nn.Linear, hidden: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(B, S, H) states -> (B, S-1, D) normalised vectors; padding rows are zero."""
    vecs = colbert_linear(hidden[:, 1:].float()) * mask[:, 1:].unsqueeze(-1).float()
    return torch.nn.functional.normalize(vecs, dim=-1)
