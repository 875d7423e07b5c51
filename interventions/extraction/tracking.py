"""Optional W&B logging of a direction file as an artifact of type ``direction``.

wandb is imported only when asked for; ``WANDB_MODE=offline`` works without a key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..direction import Direction


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
