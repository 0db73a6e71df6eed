"""Pooling: how one vector per text is taken from the last hidden state.

BGE-M3 (and XLM-RoBERTa models in general) use the CLS token's state. A
sentence-transformers directory says what it was trained with in
``1_Pooling/config.json``; all-MiniLM-L6-v2, for example, averages the states of
the real (non-padding) tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

Pooling = Literal["cls", "mean", "max", "lasttoken"]

_MODES: dict[str, Pooling] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}


def read_pooling(model_dir: Path) -> Pooling:
    """The pooling the directory declares; CLS when it declares none (the BGE convention)."""
    config = model_dir / "1_Pooling" / "config.json"
    if config.is_file():
        values = json.loads(config.read_text())
        for key, mode in _MODES.items():
            if values.get(key):
                return mode
    return "cls"


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: Pooling) -> torch.Tensor:
    """(B, S, H) states and (B, S) mask -> (B, H) L2-normalised vectors."""
    if mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    elif mode == "max":
        masked = hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min)
        pooled = masked.max(1).values
    else:  # lasttoken: the state of each row's last real token (right padding)
        last = mask.sum(1).long() - 1
        pooled = hidden[torch.arange(hidden.shape[0]), last]
    return torch.nn.functional.normalize(pooled.float(), dim=-1)
