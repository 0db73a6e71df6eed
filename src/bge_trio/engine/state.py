"""Where an engine is in its life, as one value the code can look at.

    Loading ──► Probing(progress) ──► Ready
       │               │
       └───────────────┴──────────► Failed(reason)

``status`` is the word ``/health`` shows for each. A request waits while the engine is
``Loading`` (it needs the tokenizer), queues while it is ``Probing`` (its texts wait at
the scheduler's closed gate), is served when ``Ready``, and answered 503 once ``Failed``.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from bge_trio.memory.probe import ProbeProgress


@attrs.frozen
class Loading:
    """The model is loading (``step``: what it does now, where that takes a while)."""

    step: str | None = None
    status: ClassVar[str] = "loading"


@attrs.frozen
class Probing:
    """The model is loaded; its memory is being planned (``progress``: the probe's last
    measured shape, None before the first)."""

    progress: ProbeProgress | None = None
    status: ClassVar[str] = "probing"


@attrs.frozen
class Ready:
    status: ClassVar[str] = "ok"


@attrs.frozen
class Failed:
    """Serving is impossible (a model that does not load, a memory limit too small for one
    text, a crashed scheduler); the process is about to exit."""

    reason: str
    status: ClassVar[str] = "error"


State = Loading | Probing | Ready | Failed
