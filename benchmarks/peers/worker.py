"""One library's run, inside that library's virtual environment (keel: the main .venv).

``--write-reference PATH`` (keel only) saves keel's logits and gradients per case; otherwise ``--reference``
is compared against. ``--memory SETTING:OP`` is the fresh-process memory measurement of one arm (prints
bytes). Results go to ``--out`` as ``{case: {...}}``; every failure is recorded with its error text.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import traceback

import torch

from benchmarks.peers import harness as H


def _load_library(name: str):
    return importlib.import_module(f"benchmarks.peers.lib_{name}")


def _memory(library: str, setting: str, op: str, inner: bool = False) -> float:
    arm = f"{setting}:{op}" + (":inner" if inner else "")
    cmd = [sys.executable, "-m", "benchmarks.peers.worker", "--library", library, "--memory", arm]
    # a fixed mmap threshold: every large tensor is its own mapping, returned to the OS when freed, so the
    # peak RSS follows the live tensors rather than the heap's fragmentation
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"memory process failed: {tail[-1] if tail else proc.returncode}")
    return float(proc.stdout.strip().splitlines()[-1])


def _checked_arm(library, op: str, setting: str, inner: bool, b: dict):
    arm = H.Arm(library, op, setting, inner)
    return arm, H.outputs(arm.forward, arm.params, b)


def run_setting(name: str, library, setting: str, reference: dict | None, rounds: int, write: dict | None):
    """Both operators of ``library`` under ``setting``: check against keel, then interleaved timing against
    plain training, then memory, each arm in a fresh process. Under LoRA, a library that fails on the
    PeftModel is recorded with that error and then tried on ``get_base_model()`` (marked ``inner``)."""
    b = H.batch()
    results: dict[str, dict] = {}
    arms: dict[str, H.Arm] = {"plain": H.Arm(None, "plain", setting)}
    inner: dict[str, bool] = {}
    for op in H.OPS:
        case = H.case_name(op, setting)
        res = results[case] = {"error": None, "matches_keel": None}
        try:
            try:
                arm, out = _checked_arm(library, op, setting, False, b)
                inner[op] = False
            except H.NotExpressible:
                raise
            except Exception as err:
                if setting != "lora":
                    raise
                res["error"] = "on the PeftModel: " + H.error_text(err)
                res["traceback"] = traceback.format_exc(limit=8)
                arm, out = _checked_arm(library, op, setting, True, b)
                inner[op] = True
                res["workaround"] = (
                    "works when given peft_model.get_base_model() (the LoRA layers live in it)"
                )
        except H.NotExpressible as err:
            res["error"] = f"not expressible: {err}"
            continue
        except Exception as err:  # the library's own failure, recorded as it reads
            text = H.error_text(err)
            res["error"] = res["error"] + "; on get_base_model(): " + text if res["error"] else text
            res.setdefault("traceback", traceback.format_exc(limit=8))
            continue
        if write is not None:
            write[case] = out
            res["matches_keel"] = True
        elif reference is not None:
            res.update(H.compare(out, reference[case]))
        arms[op] = arm
    if len(arms) > 1:
        try:
            times = H.interleaved_times(arms, b, rounds)
        except Exception as err:
            for op in arms:
                if op != "plain":
                    results[H.case_name(op, setting)]["error"] = "during timed steps: " + H.error_text(err)
            return results
        ratios = H.paired_ratios(times)
        plain_mem = _memory(name, setting, "plain")
        for op, ratio in ratios.items():
            res = results[H.case_name(op, setting)]
            res["time_ratio"] = ratio
            res["step_seconds"] = statistics.median(times[op])
            res["plain_step_seconds"] = statistics.median(times["plain"])
            res["round_ratios"] = [t / q for t, q in zip(times[op], times["plain"])]
            try:
                mem = _memory(name, setting, op, inner[op])
                res["memory_ratio"] = mem / plain_mem
                res["peak_rss_growth_bytes"] = mem
                res["plain_peak_rss_growth_bytes"] = plain_mem
            except Exception as err:
                res["memory_error"] = H.error_text(err)
    del arms
    gc.collect()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--library", required=True)
    parser.add_argument("--reference", default="runs/bench/peers_reference.pt")
    parser.add_argument("--write-reference", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_PEER_ROUNDS", "6")))
    parser.add_argument("--settings", default=",".join(H.SETTINGS))
    parser.add_argument("--memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    H.set_threads()
    if args.memory:
        setting, op, *flags = args.memory.split(":")
        library = _load_library(args.library)  # imported for the plain arm too: same baseline
        print(H.measure_memory(library, op, setting, inner="inner" in flags))
        return
    results: dict[str, dict] = {}
    try:
        library = _load_library(args.library)
    except Exception as err:
        text = "import failed: " + H.error_text(err)
        results = {case: {"error": text, "matches_keel": None} for case in H.CASES}
    else:
        write = {} if args.write_reference else None
        reference = None if write is not None else torch.load(args.reference, weights_only=True)
        for setting in args.settings.split(","):
            try:
                results.update(run_setting(args.library, library, setting, reference, args.rounds, write))
            except Exception as err:  # e.g. the plain arm itself failed: every case of the setting says so
                for op in H.OPS:
                    results[H.case_name(op, setting)] = {"error": H.error_text(err), "matches_keel": None}
            print(
                f"  {args.library} {setting}: "
                + json.dumps(
                    {
                        c: {k: v for k, v in r.items() if k != "traceback"}
                        for c, r in results.items()
                        if H.split_case(c)[1] == setting
                    }
                ),
                flush=True,
            )
        if write is not None:
            os.makedirs(os.path.dirname(args.reference) or ".", exist_ok=True)
            torch.save(write, args.reference)
    versions = {"torch": torch.__version__}
    for dist in (
        "transformers",
        "peft",
        "numpy",
        "steering-vectors",
        "repeng",
        "pyvene",
        "nnsight",
        "transformer-lens",
    ):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            pass
    payload = {"library": args.library, "versions": versions, "cases": results}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
    else:
        print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
