"""The texts waiting for a forward pass, oldest first, and what they add up to."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from bge_trio.scheduler.batching import BatchPolicy, plan_batch
from bge_trio.scheduler.work import WorkItem


class QueueObserver(Protocol):
    def queue_changed(self, items: int, tokens: int) -> None: ...


class WorkQueue:
    def __init__(self, observer: QueueObserver) -> None:
        self.pending: list[WorkItem] = []  # oldest first
        self.items = 0  # admitted texts not yet in a forward pass (or dropped)
        self.tokens = 0
        self._observer = observer

    def __bool__(self) -> bool:
        return bool(self.pending)

    def add(self, items: Sequence[WorkItem]) -> None:
        """A request's texts, all at once (the planner must see them together)."""
        self.pending.extend(items)
        self.items += len(items)
        self.tokens += sum(item.length for item in items)
        self._observer.queue_changed(self.items, self.tokens)

    def lengths(self, at_most: int | None = None) -> list[int]:
        return [item.length for item in self.pending if at_most is None or item.length <= at_most]

    def drop_abandoned(self) -> None:
        """Forget the texts whose request was cancelled or answered."""
        dropped = [item for item in self.pending if item.abandoned]
        if dropped:
            self.pending = [item for item in self.pending if not item.abandoned]
            self._uncount(dropped)

    def take_planned(
        self, policy: BatchPolicy, overhead_tokens: float, at_most: int | None = None
    ) -> list[WorkItem]:
        """The next pass: texts (of at most ``at_most`` tokens, when given) planned by
        :func:`~bge_trio.scheduler.batching.plan_batch`, taken out of the queue. Texts of
        requests that have gone are dropped first."""
        self.drop_abandoned()
        candidates = [
            i for i, item in enumerate(self.pending) if at_most is None or item.length <= at_most
        ]
        if not candidates:
            return []
        lengths = [self.pending[i].length for i in candidates]
        chosen = plan_batch(lengths, policy, overhead_tokens)
        return self.take(candidates[i] for i in chosen)

    def take(self, indices: Iterable[int]) -> list[WorkItem]:
        """Remove the texts at ``indices`` (positions in ``pending``), in queue order."""
        chosen = set(indices)
        batch = [self.pending[i] for i in sorted(chosen)]
        self.pending = [item for i, item in enumerate(self.pending) if i not in chosen]
        self._uncount(batch)
        return batch

    def fail_all(self, error: BaseException) -> None:
        """Answer every waiting text with ``error`` and empty the queue."""
        for item in self.pending:
            item.ticket.fail(error)
        self._uncount(self.pending)
        self.pending = []

    def _uncount(self, items: Sequence[WorkItem]) -> None:
        self.items -= len(items)
        self.tokens -= sum(item.length for item in items)
        self._observer.queue_changed(self.items, self.tokens)
