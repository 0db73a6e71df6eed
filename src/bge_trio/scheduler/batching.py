"""Which waiting texts share the next forward pass.

A batch is padded to its longest text, so its memory is W(B, S_max) and its
wasted work is the padding. The plan starts from the oldest waiting text (so no
text waits forever behind a stream of better-fitting ones) and grows through its
neighbours in length order, each time taking the neighbour that adds the least
padding, while the predicted memory fits the budget and the optional token cap.

Fitting is not enough: a 10-token query padded to a 300-token passage costs 30
times its own work, far more than running it later with other queries. So a
neighbour joins only if the padding it adds is no more work than the fixed cost of
a pass of its own (``overhead_tokens``, measured by :mod:`bge_trio.scheduler.pace`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from bge_trio.memory.cost import CostModel


@attrs.frozen
class BatchPolicy:
    """The limits a batch must respect."""

    cost: CostModel
    workspace_bytes: float
    max_batch_tokens: int | None = None
    max_batch_items: int = 1024

    def fits(self, batch: int, seq: int) -> bool:
        if batch > self.max_batch_items:
            return False
        if self.max_batch_tokens is not None and batch * seq > self.max_batch_tokens and batch > 1:
            return False
        return self.cost.predict(batch, seq) <= self.workspace_bytes

    def max_single_length(self) -> int:
        """The longest text whose forward pass fits the workspace on its own.

        The token cap shapes batches; it never shortens a text that fits in memory.
        """
        return self.cost.max_seq_within(self.workspace_bytes)


def plan_batch(
    lengths: Sequence[int], policy: BatchPolicy, overhead_tokens: float = math.inf
) -> list[int]:
    """Indices into ``lengths`` (oldest first) of the texts to run next.

    The oldest text is always included, even if it alone exceeds the policy: callers
    reject or truncate such texts before they queue, and a plan must make progress.
    With ``overhead_tokens`` infinite (passes are expensive) every text that fits
    joins; with a finite one, only texts that add at most that much padding.
    """
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    anchor = order.index(0)
    lo = hi = anchor
    width = lengths[0]
    size = 1
    while True:
        options: list[tuple[int, str, int]] = []  # (added padding, side, new width)
        if lo > 0:
            options.append((width - lengths[order[lo - 1]], "lo", width))
        if hi < len(order) - 1:
            longer = lengths[order[hi + 1]]
            options.append(((longer - width) * size, "hi", longer))
        grown = False
        for padding, side, new_width in sorted(options):
            if padding <= overhead_tokens and policy.fits(size + 1, new_width):
                if side == "lo":
                    lo -= 1
                else:
                    hi += 1
                width = new_width
                size += 1
                grown = True
                break
        if not grown:
            return [order[i] for i in range(lo, hi + 1)]
