"""Sweep tasks for the tests: deterministic metrics from the run's seed and config, with a log of every
execution (to count which runs a rerun executed) and optional slowness or failure."""

import json
import os
import time
from pathlib import Path


def toy(run, run_dir):
    cfg = run.config
    log = Path(cfg["log"])
    with log.open("a") as f:
        f.write(json.dumps({"key": run.key, "pid": os.getpid()}) + "\n")
    (Path(run_dir) / "partial.txt").write_text("started")
    time.sleep(cfg.get("sleep", 0.0))
    if cfg.get("fail"):
        raise RuntimeError(f"{run.key} fails on purpose")
    return {"score": cfg["scale"] * (run.seed + 1), "seed": run.seed}


def toy_fast(run, run_dir):
    """``toy`` with the sleep skipped (the config, and so the config hash, stays the same)."""
    cfg = dict(run.config, sleep=0.0)
    return toy(type(run)(run.condition, run.seed, cfg), run_dir)
