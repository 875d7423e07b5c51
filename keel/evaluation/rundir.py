"""The run folder of an evaluation: a status file that says whose results these are and whether they are
complete, atomic writes, and the rule for reusing a folder.

``status.json`` (schema 1) is written when a run starts and rewritten at each stage::

    {"schema": 1, "command": "keel eval",
     "state": "running" | "failed" | "done"  (the words of keel.sweep's status files),
     "stage": "generating" | "judging" | "metrics" | "writing" | "reporting" | "done",
     "config_hash": "<sha256 of the fingerprint>",
     "fingerprint": {"generation": {...}, "judging": {...} | null},
     "attempt": 1, "resumed_from": null | "failed" | "done" | "running" (the earlier attempt's state),
     "started": "<UTC ISO time>", "updated": "...", "finished": "..." | null,
     "pid": 1234, "host": "...",
     "answers": {"file": "answers.jsonl", "n": 48, "sha256": "..."} | null,
     "results": ["answers.jsonl", "scores.jsonl", ...] (files of this run, when done),
     "error": null | "<why it failed>",
     "missing": {...} (per-metric missing judgements, when the run failed on them)}

The fingerprint holds what decides the results: ``generation`` (model, sampling, questions and their
sha256, interventions, or the sha256 of an ``--answers`` file) and ``judging`` (judge, endpoint, judge
prompts). A rerun into a folder with a status file resumes it when the fingerprint matches (it reuses
the answers whose sha256 the status records; judgements come from the cache), and also when it re-scores
that run's own ``answers.jsonl`` with ``--answers``; anything else is refused, naming the settings that
differ, unless ``overwrite``. A folder with result files and no status file is refused too (nothing
says which run made them). Result files are removed when a run starts, and written (each atomically)
only once the run has all of them, so a folder never shows one run's results beside another's.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

STATUS = "status.json"
ANSWERS = "answers.jsonl"
RESULT_FILES = (ANSWERS, "scores.jsonl", "metrics.json", "summary.md", "config.json")
SCHEMA = 1


class RunFolderError(RuntimeError):
    """The output folder cannot be used for this run; the message says why and what to do."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint_hash(fingerprint: dict) -> str:
    return sha256_text(json.dumps(fingerprint, sort_keys=True, default=str))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write through a temporary file in the same folder and rename: readers see the old or new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _differences(old: dict | None, new: dict | None) -> list[str]:
    old, new = old or {}, new or {}
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@dataclass
class Resume:
    """What a run may take over from an earlier attempt in the same folder."""

    attempt: int = 1
    previous_state: str | None = None
    answers_sha256: str | None = None  # reuse answers.jsonl when its sha256 is still this
    generation: dict | None = (
        None  # the fingerprint to record (the earlier run's, when re-scoring its answers)
    )


class RunFolder:
    """Status and files of one evaluation output folder."""

    def __init__(self, path: str | Path, command: str = "keel eval"):
        self.path = Path(path)
        self.command = command
        self.status: dict = {}

    @property
    def status_path(self) -> Path:
        return self.path / STATUS

    def read_status(self) -> dict | None:
        if not self.status_path.is_file():
            return None
        try:
            status = json.loads(self.status_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RunFolderError(
                f"{self.status_path} is unreadable ({e}); use another --output_dir, or --overwrite to discard "
                "the folder's results."
            ) from None
        if not isinstance(status, dict) or status.get("schema") != SCHEMA or "fingerprint" not in status:
            raise RunFolderError(
                f"{self.status_path} is not a keel eval status file (schema {SCHEMA}); use another "
                "--output_dir, or --overwrite to discard the folder's results."
            )
        return status

    def leftovers(self) -> list[str]:
        return [name for name in RESULT_FILES if (self.path / name).exists()]

    def check(
        self,
        generation: dict,
        judging: dict | None,
        answers_sha256: str | None = None,
        overwrite: bool = False,
    ) -> Resume:
        """May this run use the folder? Returns what it may reuse; raises RunFolderError otherwise.
        ``answers_sha256``: the sha256 of the ``--answers`` file, when the run re-scores one. With
        ``overwrite`` any earlier results may go (``start`` removes them); nothing is deleted here."""
        if overwrite:
            return Resume()
        status = self.read_status()
        leftovers = self.leftovers()
        if status is None:
            if leftovers:
                raise RunFolderError(
                    f"{self.path} holds {', '.join(leftovers)} but no {STATUS}: nothing says which run made "
                    "them or whether they are complete. Use another --output_dir, or pass --overwrite to "
                    "discard them."
                )
            return Resume()
        if (
            status.get("state") == "running"
            and status.get("host") == socket.gethostname()
            and isinstance(status.get("pid"), int)
            and status["pid"] != os.getpid()
            and _alive(status["pid"])
        ):
            raise RunFolderError(
                f"{self.path} is in use: another {self.command} (pid {status['pid']}) is writing to it. Wait "
                "for it, or use another --output_dir."
            )
        previous = status["fingerprint"]
        recorded = (status.get("answers") or {}).get("sha256")
        same_generation = previous.get("generation") == generation
        own_answers = answers_sha256 is not None and recorded == answers_sha256
        hint = (
            "Use another --output_dir (to re-score these answers with other settings: --answers "
            f"{self.path / ANSWERS} --output_dir NEW), or pass --overwrite to discard this folder's results."
        )
        if not (same_generation or own_answers):
            diff = "; ".join(_differences(previous.get("generation"), generation))
            raise RunFolderError(
                f"{self.path} holds a {status.get('state')} run of another configuration (answers differ: "
                f"{diff}). {hint}"
            )
        if previous.get("judging") is not None and judging is not None and previous["judging"] != judging:
            diff = "; ".join(_differences(previous["judging"], judging))
            raise RunFolderError(
                f"{self.path} holds a {status.get('state')} run judged otherwise ({diff}). {hint}"
            )
        return Resume(
            attempt=int(status.get("attempt", 1)) + 1,
            previous_state=status.get("state"),
            answers_sha256=recorded if same_generation else None,
            generation=previous.get("generation") if own_answers and not same_generation else None,
        )

    def reusable_answers(self, resume: Resume) -> bool:
        """The folder's answers.jsonl is the one the earlier attempt recorded (byte for byte)."""
        path = self.path / ANSWERS
        return (
            resume.answers_sha256 is not None
            and path.is_file()
            and sha256_file(path) == resume.answers_sha256
        )

    def start(self, fingerprint: dict, resume: Resume, keep_answers: bool) -> None:
        """Mark the folder as this run's: remove earlier results (answers too, unless reused) and write a
        ``running`` status."""
        self.path.mkdir(parents=True, exist_ok=True)
        for name in RESULT_FILES:
            if name == ANSWERS and keep_answers:
                continue
            (self.path / name).unlink(missing_ok=True)
        self.status = {
            "schema": SCHEMA,
            "command": self.command,
            "state": "running",
            "stage": "judging" if keep_answers else "generating",
            "config_hash": fingerprint_hash(fingerprint),
            "fingerprint": fingerprint,
            "attempt": resume.attempt,
            "resumed_from": resume.previous_state,
            "started": _now(),
            "updated": _now(),
            "finished": None,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "answers": None,
            "results": [],
            "error": None,
        }
        if keep_answers:
            self.status["answers"] = self.answers_record()
        self._write()

    def answers_record(self) -> dict:
        path = self.path / ANSWERS
        n = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        return {"file": ANSWERS, "n": n, "sha256": sha256_file(path)}

    def update(self, **fields) -> None:
        self.status.update(fields, updated=_now())
        self._write()

    def fail(self, error: str, **fields) -> None:
        if not self.status:
            return
        self.status.update(fields, state="failed", error=error, results=[], updated=_now(), finished=_now())
        self._write()

    def complete(self, results: list[str]) -> None:
        self.status.update(
            state="done", stage="done", results=results, error=None, updated=_now(), finished=_now()
        )
        self._write()

    def _write(self) -> None:
        atomic_write_text(self.status_path, json.dumps(self.status, indent=2, default=str) + "\n")
