"""One request's texts on their way through the scheduler.

A :class:`Ticket` is the request's side: it collects each text's result in input
order and wakes the request when the last one arrives (or the first failure).
A :class:`WorkItem` is one text of it in the queue. A ticket marked cancelled
(client gone, deadline passed) has its remaining items dropped before they run.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from bge_trio.model.encoder import Embedding, Output


@attrs.define(eq=False)
class Ticket:
    outputs: frozenset[Output]
    size: int
    results: list[Embedding | None] = attrs.field(init=False)
    remaining: int = attrs.field(init=False)
    error: BaseException | None = None
    cancelled: bool = False
    done: trio.Event = attrs.field(factory=trio.Event)
    queue_s: float = 0.0  # the longest any of its texts waited for a forward pass
    inference_s: float = 0.0  # time of the forward passes its texts were in

    def __attrs_post_init__(self) -> None:
        self.results = [None] * self.size
        self.remaining = self.size
        if self.size == 0:
            self.done.set()

    def deliver(self, index: int, embedding: Embedding) -> None:
        if self.results[index] is None:
            self.results[index] = embedding
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.done.set()

    @property
    def finished(self) -> bool:
        return self.done.is_set()


@attrs.frozen(eq=False)
class WorkItem:
    ticket: Ticket
    index: int
    token_ids: Sequence[int]
    enqueued_at: float

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def abandoned(self) -> bool:
        return self.ticket.cancelled or self.ticket.finished
