"""The real model with something of the test's before each forward pass (a fault, a hold,
a record), loaded as the server loads it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bge_trio.engine.prepare import LoadEncoder
from bge_trio.model.encoder import BetweenLayers, Embedding, Encoder, Output
from bge_trio.model.loading import load_encoder
from bge_trio.model.source import ModelSource

BeforePass = Callable[[Sequence[Sequence[int]]], None]


def loader_with(before_pass: BeforePass, on_load: Callable[[], None] = lambda: None) -> LoadEncoder:
    """A ``load_encoder`` for ``create_app``: the real encoder, calling ``before_pass(batch)``
    before each forward pass (and ``on_load()`` where it loads)."""

    def load(source: ModelSource, **kwargs: Any) -> Encoder:
        on_load()
        real = load_encoder(source, **kwargs)

        class Watched(Encoder):
            def forward(
                self,
                batch: Sequence[Sequence[int]],
                outputs: frozenset[Output] = frozenset({"dense"}),
                between_layers: BetweenLayers | None = None,
                express: bool = False,
            ) -> list[Embedding]:
                before_pass(batch)
                return super().forward(batch, outputs, between_layers, express)

        return Watched(
            real.tokenizer,
            real.model,
            real.info,
            real.sparse_linear,
            real.colbert_linear,
            compiled=real.compiled,
            config=real.config,
        )

    return load
