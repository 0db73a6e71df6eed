"""How forward passes share the CPU: regular workers, and an express lane for short texts.

One 8,000-token BGE-M3 text is minutes of work on two cores; in strict arrival order
every short query behind it waits that long. So beside the regular workers there is
one **express lane**: a thread of its own that runs only texts of at most
``express_tokens`` tokens, and only while every regular worker is busy. Its passes
are small, so they run beside a long one instead of after it.

Cores are split by the moment: a regular pass uses ``threads`` while the express lane
is idle, and drops to ``shared_threads`` at its next encoder layer while an express
pass runs (and for ``EXPRESS_LINGER_S`` after the last one), so the two never ask
for more threads than there are cores for longer than one layer; a pass predicted to
be long starts shared (``LONG_PASS_S``). Measured on the full-size BGE-M3 stand-in on
2 cores (docs/performance.md): short queries beside 8,000-token documents are answered
in seconds instead of waiting minutes behind them; the documents take up to 1.8x
their time alone meanwhile.

The express lane's passes are capped at ``express_tokens`` padded tokens, so their
worst-case memory is small and known: it is set aside from the regular workspace
(see :func:`express_share`).
"""

from __future__ import annotations

import math

import attrs

from bge_trio.scheduler.batching import BatchPolicy

# Texts of at most this many tokens may take the express lane (queries, titles).
EXPRESS_TOKENS = 256
# A regular pass keeps sharing the cores this long after the last express pass ended:
# queries come in streams, and a layer of an 8,000-token text runs for seconds at full
# width, with every query that arrives meanwhile competing for an oversubscribed core.
EXPRESS_LINGER_S = 2.0
# A regular pass predicted to run longer than this starts on the shared threads, so a
# query that arrives during its first layer does not meet an oversubscribed core; from
# its second layer on it takes every core while the express lane is quiet. Costs at
# most one layer at reduced width (about 2 % of a 24-layer pass).
LONG_PASS_S = 10.0


@attrs.frozen
class Lanes:
    workers: int  # regular forward passes at once
    threads: int  # torch threads of a regular pass while the express lane is idle
    shared_threads: int  # ... while an express pass runs beside it
    express_threads: int
    express_tokens: int  # 0: no express lane

    @property
    def express(self) -> bool:
        return self.express_tokens > 0


def plan_lanes(
    cpu_threads: int, workers: int | None, express_tokens: int = EXPRESS_TOKENS
) -> Lanes:
    """The arrangement for ``cpu_threads`` usable cores.

    ``workers=None`` (auto) runs one regular pass with every core, plus the express
    lane: a long text gets the whole machine when it is alone, and under load the
    express lane makes it two passes at once, which is what the fastest fixed
    arrangement (two workers) gives short texts. An explicit ``workers`` divides the
    cores as before.
    """
    cpu = max(1, cpu_threads)
    count = workers or 1
    threads = max(1, cpu // count)
    express_threads = max(1, cpu // (count + 1)) if express_tokens else 0
    shared = max(1, (cpu - express_threads) // count) if express_tokens else threads
    return Lanes(count, threads, shared, express_threads, express_tokens)


def express_share(
    policy: BatchPolicy, express_tokens: int, reserve: float | None = None
) -> tuple[BatchPolicy, BatchPolicy | None]:
    """The limits of regular passes, and of express passes beside them (None: shut).

    An express pass runs beside a regular one, so its worst case (one text of
    ``express_tokens``, or that many padded tokens of shorter ones) is set aside
    from the regular workspace. Where that would take more than a tenth of it, the
    express lane stays shut: memory comes first. In a process that serves several
    models the express lane is one, beside any model's regular passes: ``reserve`` is
    then the largest worst case among them, set aside from every model's passes.
    """
    own = policy.cost.predict(1, express_tokens) if express_tokens else math.inf
    shared = own if reserve is None else reserve
    if not express_tokens or shared > 0.1 * policy.workspace_bytes:
        return policy, None
    regular = attrs.evolve(policy, workspace_bytes=policy.workspace_bytes - shared)
    if own > shared:  # this model's worst express pass (corrected upwards) no longer fits
        return regular, None
    express = BatchPolicy(
        policy.cost, shared, max_batch_tokens=express_tokens, max_batch_items=express_tokens
    )
    return regular, express
