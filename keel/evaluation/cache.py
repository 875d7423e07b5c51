"""A persistent judge cache: re-scoring the same answers costs nothing and survives interruption.

Why SQLite rather than JSONL: each judged batch is committed as one transaction, so a run killed mid-way
(Ctrl-C, a preempted GPU, an API outage) leaves every finished score on disk and never a torn line;
lookups go through the primary key without reading the whole file; several processes can share one
cache file (SQLite locks it). It is in the standard library. Only hashes of the prompt template,
question and answer are stored, not their text, so the cache stays small and holds no model output.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from keel.evaluation.judge_base import Judgement, JudgeRequest
from keel.evaluation.judges import JudgeError


def cache_key(judge_name: str, request: JudgeRequest) -> str:
    """Key = (judge, prompt template, question, answer) plus the metric (exact judges have no template)."""
    parts = [judge_name, request.metric, request.prompt_template, request.question, request.answer]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()


class JudgeCache:
    """SQLite table ``judgements(key, judge, metric, score, label, extra, created)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, judge TEXT, metric TEXT, "
            "score REAL, label TEXT, extra TEXT, created REAL)"
        )
        self._db.commit()

    def get_many(self, keys: list[str]) -> dict[str, Judgement]:
        found = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, score, label, extra FROM judgements WHERE key IN ({marks})", chunk
                ).fetchall()
                for key, score, label, extra in rows:
                    found[key] = Judgement(
                        score=score, label=label, extra={**json.loads(extra), "cached": True}
                    )
        return found

    def put_many(self, items: list[tuple[str, str, str, Judgement]]) -> None:
        """Store ``(key, judge_name, metric, judgement)`` rows in one transaction."""
        now = time.time()
        rows = [
            (
                key,
                judge,
                metric,
                j.score,
                j.label,
                json.dumps({k: v for k, v in j.extra.items() if k != "cached"}),
                now,
            )
            for key, judge, metric, j in items
        ]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        self._db.close()


class CachedJudge:
    """Wraps any ``Judge``: answers cached requests from the cache, sends only misses to the judge, in
    chunks of ``chunk_size`` that are committed as they finish (and partial results of a failed chunk),
    so an interrupted run resumes where it stopped."""

    def __init__(self, judge, cache: JudgeCache, chunk_size: int = 64):
        self.inner = judge
        self.cache = cache
        self.name = judge.name
        self.chunk_size = chunk_size
        self.hits = 0
        self.misses = 0

    def config(self) -> dict:
        inner = self.inner.config() if hasattr(self.inner, "config") else {"name": self.name}
        return {**inner, "cache": str(self.cache.path)}

    def _store(self, keys, requests, idx, got, found) -> None:
        done = [(i, j) for i, j in zip(idx, got) if j is not None]
        self.cache.put_many([(keys[i], self.name, requests[i].metric, j) for i, j in done])
        found.update({keys[i]: j for i, j in done})

    def judge(self, requests: list[JudgeRequest], progress=None) -> list[Judgement]:
        keys = [cache_key(self.name, r) for r in requests]
        found = self.cache.get_many(keys)
        self.hits += sum(k in found for k in keys)
        todo = [i for i, k in enumerate(keys) if k not in found]
        self.misses += len(todo)
        if progress is not None:
            progress.update(len(requests) - len(todo))
        failed: list[str] = []
        for start in range(0, len(todo), self.chunk_size):
            idx = todo[start : start + self.chunk_size]
            batch = [requests[i] for i in idx]
            try:
                got = self.inner.judge(batch)
            except JudgeError as e:
                got = list(e.partial) + [None] * (len(batch) - len(e.partial))
                failed.append(str(e))
                if e.fatal:  # the endpoint is unusable: keep what came back and stop
                    self._store(keys, requests, idx, got, found)
                    break
            if len(got) != len(batch):
                raise JudgeError(
                    f"Judge {self.name} returned {len(got)} judgements for {len(batch)} requests."
                )
            self._store(keys, requests, idx, got, found)
            if progress is not None:
                progress.update(sum(j is not None for j in got))
        if failed:
            n_missing = sum(k not in found for k in keys)
            raise JudgeError(
                f"{n_missing} of {len(requests)} judgements are missing ({len(failed)} failed batch(es); "
                f"first: {failed[0]}). The others are cached in {self.cache.path}: rerun to request only the rest.",
                [found.get(k) for k in keys],
                fatal=True,
            )
        return [found[k] for k in keys]
