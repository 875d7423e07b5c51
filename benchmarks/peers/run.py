"""The peers benchmark: keel's reference outputs in the main venv, then each peer library's worker in its
own ``.venv-peers/<lib>`` (``benchmarks/peers/setup.sh`` makes them), then runs/bench/peers.json and the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.peers import report

LIBRARIES = ("steering_vectors", "repeng", "pyvene", "nnsight", "transformer_lens")
# the cases, as the workers name them (benchmarks.peers.harness.CASES; not imported: the harness needs torch)
CASES = ("steer", "ablate", "steer_ckpt", "ablate_ckpt", "steer_lora", "ablate_lora")
VENVS = Path(".venv-peers")


def _tail(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


def _worker(python: str, library: str, out: Path, reference: Path, rounds: int, write: bool) -> dict:
    cmd = [python, "-m", "benchmarks.peers.worker", "--library", library, "--out", str(out)]
    cmd += ["--reference", str(reference), "--rounds", str(rounds)] + (["--write-reference"] if write else [])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    except subprocess.TimeoutExpired:
        return {"error": "worker timed out after 3600 s"}
    for line in proc.stdout.splitlines():
        if line.startswith("  "):
            print(line[:300], flush=True)
    if proc.returncode != 0 or not out.exists():
        return {"error": f"worker exited {proc.returncode}: {_tail(proc.stderr or proc.stdout)}"}
    return json.loads(out.read_text())


def run(out_dir: Path = Path("runs/bench"), rounds: int = 10) -> dict:
    work = out_dir / "peers"
    work.mkdir(parents=True, exist_ok=True)
    reference = out_dir / "peers_reference.pt"
    results = {"keel": _worker(sys.executable, "keel", work / "keel.json", reference, rounds, write=True)}
    for library in LIBRARIES:
        venv = VENVS / library
        if not (venv / ".installed").exists():
            log = venv / "install.log"
            why = _tail(log.read_text(), 2) if log.exists() else "benchmarks/peers/setup.sh was not run"
            results[library] = {"error": f"not installed: {why}"}
            continue
        print(f"  -- {library}", flush=True)
        python = str(venv / "bin" / "python")
        results[library] = _worker(python, library, work / f"{library}.json", reference, rounds, write=False)
    peers = report.assemble(results, CASES)
    (out_dir / "peers.json").write_text(json.dumps(peers, indent=2))
    (out_dir / "peers_details.json").write_text(json.dumps(results, indent=2))
    print("\ncell: step-time ratio / peak-memory ratio (each vs plain training, same setting) / equals keel")
    print(
        "(* = fails on the PeftModel itself, measured with the library given peft_model.get_base_model())\n"
    )
    print(report.table(peers, CASES, results))
    errs = report.errors(peers)
    if errs:
        print("\nerrors:")
        for e in errs:
            print("  " + e)
    slower = report.keel_slower(peers)
    if slower:
        print("\nkeel's time ratio above a peer's:")
        for lib, case, k, p in slower:
            print(f"  {case}: keel {k:.3f} > {lib} {p:.3f}")
    return peers


if __name__ == "__main__":
    run(rounds=int(os.environ.get("BENCH_PEER_ROUNDS", "10")))
