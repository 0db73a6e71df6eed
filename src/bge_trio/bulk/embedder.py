"""The server's startup, input rules and batch planner, without the server.

One :class:`BulkEmbedder` per process (or per Ray actor): it runs the server's startup
sequence (:func:`~bge_trio.engine.prepare`: the model, the memory budget of the
container or node it runs in, the cost model, where the probe cache makes a second start
cheap) and embeds lists of texts in passes planned by the same
:func:`~bge_trio.scheduler.batching.plan_batch` and policy as the server's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import attrs

from bge_trio.bulk.rows import BadRow, Row
from bge_trio.cgroups import cpu_count
from bge_trio.config import Settings
from bge_trio.engine import prepare
from bge_trio.engine.inputs import Lengths, check_outputs, fit_lengths, merged
from bge_trio.errors import InputTooLong, InvalidRequest
from bge_trio.memory.plan import MemoryPlan
from bge_trio.model.encoder import Embedding, Encoder, Output
from bge_trio.model.source import ModelSource
from bge_trio.model.windows import Windows
from bge_trio.scheduler.batching import BatchPolicy, plan_batch

log = logging.getLogger(__name__)


@attrs.frozen(eq=False)
class Rows:
    """Results in input order: an embedding and its token count, or why the text failed."""

    embeddings: list[Embedding | None]
    tokens: list[int]
    errors: dict[int, str]  # input index -> reason


@attrs.frozen(eq=False)
class Tokenized:
    """Texts tokenized and fitted to the length rules, before any forward pass."""

    count: int  # texts (or rows) in all
    kept: list[int]  # the input index of each text that will be embedded
    ids: list[list[int]]  # its token ids
    windows: list[Windows]  # and how it is cut (one window unless chunked)
    errors: dict[int, str]  # input index -> why it has no vectors


class BulkEmbedder:
    def __init__(
        self,
        settings: Settings,
        source: ModelSource,
        outputs: frozenset[Output],
        *,
        threads: int | None = None,
    ) -> None:
        prepared = prepare(settings, source, threads=threads or cpu_count(), workers=1)
        try:
            check_outputs(prepared.encoder.info, outputs)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
        self.settings = settings
        self.encoder: Encoder = prepared.encoder
        self.memory: MemoryPlan = prepared.memory
        self.policy: BatchPolicy = prepared.policy
        self.outputs = outputs
        log.info(
            "bulk embedder ready: %s, probe %s, budget %d bytes per pass",
            self.encoder.info.name,
            self.memory.status,
            self.memory.budget.workspace_bytes,
        )

    def embed(self, texts: Sequence[str]) -> Rows:
        """Every text, in passes the server's planner would run; long texts follow
        ``BGE_TRIO_LONG_INPUT`` (a text refused by it is an error, not an exception)."""
        return self.finish(self.tokenize(texts))

    def embed_rows(self, rows: Sequence[Row | BadRow]) -> Rows:
        """Every row in order; a bad row gets its reason as its error and no vectors."""
        return self.finish(self.tokenize_rows(rows))

    def tokenize_rows(self, rows: Sequence[Row | BadRow]) -> Tokenized:
        """The first stage of :meth:`embed_rows` (no forward pass: it can run in
        another thread while the model embeds the rows before)."""
        good = [(i, row.text) for i, row in enumerate(rows) if isinstance(row, Row)]
        tokenized = self.tokenize([text for _, text in good])
        errors = {i: row.reason for i, row in enumerate(rows) if isinstance(row, BadRow)}
        errors.update({good[j][0]: reason for j, reason in tokenized.errors.items()})
        return attrs.evolve(
            tokenized,
            count=len(rows),
            kept=[good[j][0] for j in tokenized.kept],
            errors=errors,
        )

    def tokenize(self, texts: Sequence[str]) -> Tokenized:
        encoder = self.encoder
        ids = encoder.tokenize(texts)
        lengths = Lengths(
            max_seq=encoder.info.max_seq_length,
            fits_memory=self.policy.max_single_length(),
            chunk_window=self.settings.chunk_window,
            chunk_overlap=self.settings.chunk_overlap,
        )
        kept: list[int] = []
        kept_ids: list[list[int]] = []
        windows: list[Windows] = []
        errors: dict[int, str] = {}
        for index, one in enumerate(ids):
            try:
                (fitted,) = fit_lengths(encoder, [one], self.settings.long_input, lengths)
            except InputTooLong as exc:
                errors[index] = exc.about("the text")
                continue
            kept.append(index)
            kept_ids.append(one)
            windows.append(fitted)
        return Tokenized(len(texts), kept, kept_ids, windows, errors)

    def finish(self, tokenized: Tokenized) -> Rows:
        """The forward passes of tokenized texts, results in input order."""
        windows = tokenized.windows
        flat = [list(w) for fitted in windows for w in fitted.token_ids]
        done = merged(tokenized.ids, windows, self._forward_all(flat))
        embeddings: list[Embedding | None] = [None] * tokenized.count
        tokens = [0] * tokenized.count
        for index, embedding, fitted in zip(tokenized.kept, done.embeddings, windows, strict=True):
            embeddings[index] = embedding
            tokens[index] = fitted.tokens
        return Rows(embeddings, tokens, dict(tokenized.errors))

    def _forward_all(self, token_ids: list[list[int]]) -> list[Embedding]:
        """Shortest first, so each planned pass takes texts of like length (little padding)."""
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        results: list[Embedding | None] = [None] * len(token_ids)
        while order:
            chosen = plan_batch([len(token_ids[i]) for i in order], self.policy)
            batch = [order[i] for i in chosen]
            for index, result in zip(
                batch,
                self.encoder.forward([token_ids[i] for i in batch], self.outputs),
                strict=True,
            ):
                results[index] = result
            taken = set(chosen)
            order = [index for i, index in enumerate(order) if i not in taken]
        return [r for r in results if r is not None]
