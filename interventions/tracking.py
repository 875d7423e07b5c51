"""W&B, the keel way: one convention for every run (train, eval, extract, sweep, demo), and direction files
as artifacts of type ``direction`` so lineage links directions, fine-tunes and evaluations.

Conventions: project = the explicit setting, else ``WANDB_PROJECT``, else ``keel``; group = the explicit
setting, else ``WANDB_RUN_GROUP`` (a sweep sets it to the sweep's name); ``job_type`` = train / eval /
extract / sweep / demo; tags from the run (operators, layers) plus ``KEEL_WANDB_TAGS`` (a sweep adds
condition and seed); files under the run folder (``dir``). A finished run's identity is written to
``wandb_run.json`` in its folder, which is how an evaluation finds the training run it evaluates.
wandb is imported only when asked for; ``WANDB_MODE=offline`` works without a key.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from .direction import Direction, file_sha256


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
        or wandb.init(config=metadata, dir=wandb_dir, **run_settings("extract", project=project))
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


RUN_FILE = "wandb_run.json"
DEFAULT_PROJECT = "keel"
TAGS_ENV = "KEEL_WANDB_TAGS"


def _wandb():
    try:
        import wandb
    except ImportError:
        raise ImportError(
            "W&B reporting needs the wandb package: pip install wandb (or drop report_to wandb)."
        ) from None
    return wandb


def run_settings(
    job_type: str,
    name: str | None = None,
    project: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
) -> dict:
    """The ``wandb.init`` keyword arguments keel's convention gives a run (see the module docstring)."""
    env_tags = [t for t in os.environ.get(TAGS_ENV, "").split(",") if t]
    all_tags = list(dict.fromkeys([*env_tags, *tags]))  # ordered, unique
    return {
        "project": project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        "group": group or os.environ.get("WANDB_RUN_GROUP") or None,
        "job_type": job_type,
        "name": name,
        "tags": [t[:64] for t in all_tags] or None,
    }


def intervention_tags(specs) -> list[str]:
    """Tags that say what a run intervened with: ``op:<operator>`` and ``layers:<...>`` per intervention."""
    tags = []
    for spec in specs:
        tags.append(f"op:{spec.operator}")
        if spec.layers is not None:
            tags.append(f"layers:{spec.layers}")
    return tags


def start_run(folder: str | Path, job_type: str, config: dict | None = None, **settings):
    """Start (or reuse, when one is active) a W&B run with keel's settings; its files go under ``folder``."""
    wandb = _wandb()
    if wandb.run is not None:
        if config:
            wandb.run.config.update(config, allow_val_change=True)
        return wandb.run
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = run_settings(job_type, **settings)
    return wandb.init(config=config or {}, dir=str(folder), **kwargs)


def write_run_record(folder: str | Path, run) -> Path:
    """``wandb_run.json`` in ``folder``: the run's id, project, group and name, for the runs that follow."""
    record = {
        "id": run.id,
        "project": run.project,
        "group": run.group,
        "name": run.name,
        "job_type": run.job_type,
    }
    path = Path(folder) / RUN_FILE
    path.write_text(json.dumps(record, indent=2))
    return path


def read_run_record(folder: str | Path | None) -> dict | None:
    """The W&B run recorded in ``folder`` (written by :func:`write_run_record`), if any."""
    if folder is None:
        return None
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def use_direction_files(run, paths: Sequence[str | Path]) -> list[str]:
    """Log each local direction file (tensors + sidecar) as a ``direction`` artifact and mark the run as
    its consumer, so W&B lineage covers directions given by path as it does ``wandb:`` references.
    Offline runs cannot mark inputs: there the artifact is logged by the run (it syncs with it)."""
    wandb = _wandb()
    names = []
    for path in paths:
        path = Path(path)
        sidecar = path.with_suffix(".json")
        digest = file_sha256(path)
        name = re.sub(r"[^A-Za-z0-9._-]", "-", f"{path.stem}-{digest[:12]}")
        artifact = wandb.Artifact(name, type="direction", metadata={"path": str(path), "sha256": digest})
        artifact.add_file(str(path))
        if sidecar.is_file():
            artifact.add_file(str(sidecar))
        if run.settings.mode == "offline" or getattr(run.settings, "_offline", False):
            run.log_artifact(artifact)  # offline runs cannot mark inputs; the file is logged with the run
        else:
            run.use_artifact(artifact)
        names.append(name)
    return names


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


def read_offline_run(run_folder: str | Path, wait: float = 10.0) -> dict:
    """What an offline W&B run folder (``wandb/offline-run-*``) recorded: project, group, job_type, tags,
    name, config, and the artifacts it logged or used; read from its ``.wandb`` log without a server
    (for tests, and to check a run before ``wandb sync``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_folder).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_folder} holds no run-*.wandb file; pass a wandb/offline-run-* folder.")
    from google.protobuf.message import DecodeError

    def parse(blob: bytes) -> list:
        out = []
        for data in _log_records(blob):
            record = pb.Record()
            record.ParseFromString(data)
            out.append((record.WhichOneof("record_type"), record))
        return out

    deadline = time.time() + wait
    while True:  # wandb's writer process may still be flushing a run that just finished
        try:
            parsed, error = parse(files[0].read_bytes()), None
        except DecodeError as err:  # a record the writer has not finished writing yet
            parsed, error = [], err
        kinds = {kind for kind, _ in parsed}
        if "exit" in kinds or time.time() > deadline:
            break
        time.sleep(0.2)
    if error is not None:
        raise ValueError(
            f"{files[0]} still holds a record that does not parse after {wait} s ({error}): the run is "
            "still being written, or the file is damaged."
        )
    info: dict = {
        "config": {},
        "logged_artifacts": [],
        "used_artifacts": [],
        "history": [],
        "finished": "exit" in kinds,
    }
    for kind, record in parsed:
        if kind == "run":
            r = record.run
            info.update(
                project=r.project,
                group=r.run_group,
                job_type=r.job_type,
                tags=list(r.tags),
                name=r.display_name,
                id=r.run_id,
            )
            for item in r.config.update:
                info["config"][_item_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                info["config"][_item_key(item)] = json.loads(item.value_json)
        elif kind == "artifact":
            info["logged_artifacts"].append({"name": record.artifact.name, "type": record.artifact.type})
        elif kind == "use_artifact":
            info["used_artifacts"].append(
                {"name": record.use_artifact.name, "type": record.use_artifact.type}
            )
        elif kind == "history":
            info["history"].append(
                {_item_key(item): json.loads(item.value_json) for item in record.history.item}
            )
    for key, value in list(info["config"].items()):  # wandb nests each config value as {"value": ...}
        if isinstance(value, dict) and set(value) == {"value"}:
            info["config"][key] = value["value"]
    return info


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _log_records(data: bytes) -> list[bytes]:
    """The records of a W&B run log: a 7-byte header, then LevelDB log blocks of 32 KiB."""
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        block_end = (pos // block + 1) * block
        if block_end - pos < 7:  # a block's tail too short for a header is padding
            pos = block_end
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if length == 0 and kind == 0:
            pos = block_end
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full record
            records.append(chunk)
        elif kind == 2:  # first fragment
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            records.append(pending + chunk)
            pending = b""
    return records
