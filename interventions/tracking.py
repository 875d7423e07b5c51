"""Optional W&B logging of a direction file as an artifact of type ``direction``.

wandb is imported only when asked for; ``WANDB_MODE=offline`` works without a key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from .direction import Direction


def log_direction_artifact(
    path: str | Path,
    directions: Sequence[Direction],
    name: str | None = None,
    project: str | None = None,
    run=None,
    aliases: Sequence[str] = (),
) -> str:
    """Log the saved direction file (tensors + JSON sidecar) as a ``direction`` artifact; returns its name.

    Uses the active W&B run, or starts (and finishes) a ``job_type="extract"`` run in ``project``.
    """
    try:
        import wandb
    except ImportError:
        raise ImportError(
            "--report-to wandb needs the wandb package: pip install wandb (or drop --report-to wandb)."
        ) from None
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    sidecar = path.with_suffix(".json")
    name = name or re.sub(r"[^A-Za-z0-9._-]", "-", path.stem)
    first = directions[0]
    metadata = {
        "method": first.method,
        "site": first.site,
        "layers": [d.layer for d in directions],
        "k": [d.k for d in directions],
        "d_model": first.d_model,
        "model_id": first.model_id,
        "model_revision": first.model_revision,
        "source": first.source,
        "directions": [d.metadata() for d in directions],
    }
    own_run = run is None and wandb.run is None
    # An explicit dir: wandb caches its settings per process, so an earlier run's WANDB_DIR would win.
    wandb_dir = os.environ.get("WANDB_DIR", str(path.parent))
    run = (
        run
        or wandb.run
        or wandb.init(project=project or "keel", job_type="extract", config=metadata, dir=wandb_dir)
    )
    try:
        artifact = wandb.Artifact(name, type="direction", metadata=metadata)
        artifact.add_file(str(path))
        artifact.add_file(str(sidecar))
        run.log_artifact(artifact, aliases=list(aliases))
    finally:
        if own_run:
            run.finish()
    return name


def fetch_direction_artifact(ref: str) -> Path:
    """Download a ``direction`` artifact (``entity/project/name:alias``); returns its direction file.

    Inside an active W&B run this goes through ``run.use_artifact`` so the run's lineage shows the
    direction; outside one, through the public API (download only).
    """
    try:
        import wandb
    except ImportError:
        raise ImportError(
            f"Direction {ref!r} lives in W&B: pip install wandb, or download the file."
        ) from None
    artifact = (
        wandb.run.use_artifact(ref) if wandb.run is not None else wandb.Api().artifact(ref, type="direction")
    )
    files = sorted(Path(artifact.download()).glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(
            f"W&B artifact {ref!r} holds {len(files)} .safetensors files; a direction artifact holds exactly one "
            "(as keel extract --report-to wandb logs it)."
        )
    return files[0]


def record_direction_lineage(refs: Sequence[str]) -> None:
    """Mark the active W&B run as a consumer of these direction artifacts (no-op without a run)."""
    if not refs:
        return
    import wandb

    if wandb.run is not None:
        for ref in refs:
            wandb.run.use_artifact(ref)
