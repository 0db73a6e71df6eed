"""The limits passes are planned with, kept honest by the passes that were measured.

The memory plan gives a batch policy (a cost model and a workspace). The express lane's
worst case is set aside from it (:func:`~bge_trio.scheduler.lanes.express_share`). Every
pass that ran alone comes back with its measured peak; one above its prediction, and
large enough to count, corrects the cost model at once (see
:mod:`bge_trio.memory.recalibrate`), and a confirmed correction is sent on the
``corrections`` channel for whoever keeps it (the engine writes it to the probe cache).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Protocol

import attrs
import trio

from bge_trio.memory.cost import CONSERVATIVE
from bge_trio.memory.recalibrate import Drift, Recalibrator
from bge_trio.scheduler.batching import BatchPolicy
from bge_trio.scheduler.lanes import express_share
from bge_trio.scheduler.passes import Peak

log = logging.getLogger("bge_trio.scheduler.scheduler")

# Served passes below this share of the workspace are not used to recalibrate: they are
# noise against it, and the target and the risk are in the large ones.
RECALIBRATE_MIN_SHARE = 0.05


class CorrectionObserver(Protocol):
    def correction_changed(self, factor: float) -> None: ...


class Calibration:
    def __init__(
        self,
        policy: BatchPolicy,
        express_tokens: int,
        observer: CorrectionObserver,
        corrections: trio.MemorySendChannel[float] | None = None,
    ) -> None:
        self._express_tokens = express_tokens
        self._observer = observer
        self._corrections = corrections
        self._recalibrator = Recalibrator()
        self._planned: BatchPolicy | None = None  # the memory plan's, uncorrected
        self._reserve: float | None = None  # the express lane's bytes (None: its own)
        self.given = policy  # in force, before the express lane's share is set aside
        self.regular, self.express = express_share(policy, express_tokens)

    def plan(self, policy: BatchPolicy, express_reserve: float | None = None) -> None:
        """The memory plan's policy: planned with from now on, checked by measured passes;
        ``express_reserve``: the bytes the process's express lane has (None: its own)."""
        self._planned = policy
        self._reserve = express_reserve
        self._apply(policy)

    def _apply(self, policy: BatchPolicy) -> None:
        self.given = policy
        self.regular, self.express = express_share(policy, self._express_tokens, self._reserve)

    def measured(self, peak: Peak) -> None:
        """A pass ran alone and peaked at ``peak``: compare it with its prediction, and
        correct the cost model when it was above."""
        planned, policy = self._planned, self.regular
        if planned is None or peak.bytes < RECALIBRATE_MIN_SHARE * policy.workspace_bytes:
            return
        predicted = policy.cost.predict(peak.batch, peak.seq)
        overrun = self._recalibrator.observe(peak.batch, peak.seq, peak.bytes, predicted)
        if overrun is None:
            return
        correction = self._recalibrator.correction
        self._apply(attrs.evolve(planned, cost=planned.cost.scaled(correction)))
        log.warning(
            "a pass of %d x %d tokens peaked at %d bytes, %.0f%% above the %d predicted; "
            "the cost model is now scaled by %.3f (the largest text that fits: %d tokens)",
            peak.batch,
            peak.seq,
            peak.bytes,
            100 * (overrun.ratio - 1),
            overrun.predicted_bytes,
            correction,
            self.regular.max_single_length(),
        )
        self._observer.correction_changed(correction)
        if self._corrections is not None and self._recalibrator.statistics().confirmed:
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                self._corrections.send_nowait(correction)

    def drift(self) -> Drift:
        return self._recalibrator.statistics()


def unlimited_policy() -> BatchPolicy:
    """A placeholder policy used before the memory model is known (the gate is closed)."""
    return BatchPolicy(CONSERVATIVE, math.inf)
