"""Catch a distributed run that silently trains differently from what its configuration asked for.

accelerate falls back without a word: ``accelerate launch`` with an FSDP or DeepSpeed config on CPU runs
each process alone (``DistributedType.NO``, one process each: N independent full runs) or as plain DDP
(``MULTI_CPU``), and TRL's trainers under ``torchrun`` with ``fsdp="full_shard"`` on CPU train as DDP
(see ``STACK-FACTS.md``, addendum 2, sections 2 and 3). A run that asked for sharding and did not get it
would use N times the memory per process at scale (or be N copies of one run), and its results are not
those of the recipe.

:func:`check_distributed_setup` runs at the start of every keel trainer's ``train()``. It compares what was
asked for (``args.fsdp``/``fsdp_config``, ``args.deepspeed``, the ``ACCELERATE_USE_FSDP`` /
``ACCELERATE_USE_DEEPSPEED`` variables ``accelerate launch`` sets, and ``WORLD_SIZE``) with what accelerate
actually runs (``accelerator.distributed_type`` and ``num_processes``), and **raises**
:class:`DistributedSetupError` on a mismatch, on every process, before the first step. Set
``KEEL_ALLOW_DISTRIBUTED_FALLBACK=1`` to train anyway: the same message is then a warning (logged on every
process). On the main process it prints one line saying what runs, e.g.
``keel: distributed setup: MULTI_CPU, 2 processes (DDP)``.
"""

from __future__ import annotations

import os
import sys
import warnings

from interventions.serialization import KeelInputError

ALLOW_ENV = "KEEL_ALLOW_DISTRIBUTED_FALLBACK"
_TRUE = ("1", "true", "yes", "on")


class DistributedSetupError(KeelInputError, RuntimeError):
    """The run asked for FSDP / DeepSpeed (or N processes) and accelerate runs something else (a
    KeelInputError: ``keel train`` exits with the message, no traceback)."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in _TRUE


def requested(args) -> dict:
    """What the configuration and the launcher asked for: ``fsdp``, ``deepspeed`` (bools, with where the
    request came from) and ``world_size`` (processes launched, from ``WORLD_SIZE``)."""
    fsdp_sources, ds_sources = [], []
    if getattr(args, "fsdp", None):
        fsdp_sources.append(f"fsdp={_show(args.fsdp)}")
    if _env_flag("ACCELERATE_USE_FSDP"):
        fsdp_sources.append(
            "ACCELERATE_USE_FSDP=true, from an accelerate FSDP config or TrainingArguments.fsdp"
        )
    if getattr(args, "deepspeed", None):
        ds_sources.append(f"deepspeed={args.deepspeed!r}")
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        ds_sources.append(
            "ACCELERATE_USE_DEEPSPEED=true (accelerate launch --use_deepspeed / a DeepSpeed config)"
        )
    return {
        "fsdp": fsdp_sources,
        "deepspeed": ds_sources,
        "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1),
    }


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(getattr(v, "value", v)) for v in value)
    return repr(value)


def _kind(distributed_type) -> str:
    return str(getattr(distributed_type, "value", distributed_type))


def describe(accelerator) -> str:
    kind = _kind(accelerator.distributed_type)
    n = accelerator.num_processes
    what = {
        "MULTI_CPU": "DDP",
        "MULTI_GPU": "DDP",
        "FSDP": "sharded",
        "DEEPSPEED": "DeepSpeed",
        "NO": "one process",
    }
    return f"{kind}, {n} process{'es' if n != 1 else ''} ({what.get(kind, kind)})"


def problems(args, accelerator) -> list[str]:
    """Each way the run differs from what was asked; empty when it is what was asked."""
    asked = requested(args)
    kind = _kind(accelerator.distributed_type)
    got = describe(accelerator)
    out = []
    if asked["fsdp"] and kind != "FSDP":
        out.append(
            f"FSDP was asked for ({'; '.join(asked['fsdp'])}) but accelerate runs {got}: every process holds "
            "the whole model and optimizer state."
        )
    if asked["deepspeed"] and kind != "DEEPSPEED":
        out.append(
            f"DeepSpeed was asked for ({'; '.join(asked['deepspeed'])}) but accelerate runs {got}: no ZeRO "
            "partitioning."
        )
    if asked["world_size"] > 1 and accelerator.num_processes != asked["world_size"]:
        out.append(
            f"{asked['world_size']} processes were launched (WORLD_SIZE) but accelerate sees "
            f"{accelerator.num_processes}: each process trains alone on the whole dataset."
        )
    return out


def check_distributed_setup(trainer) -> None:
    """Raise :class:`DistributedSetupError` (or, with ``KEEL_ALLOW_DISTRIBUTED_FALLBACK=1``, warn) when the
    trainer's accelerator does not run what its args and launcher asked for; print what runs."""
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is None:
        return
    found = problems(trainer.args, accelerator)
    is_main = accelerator.is_main_process
    multi = accelerator.num_processes > 1 or requested(trainer.args)["world_size"] > 1
    if is_main and (multi or found):
        print(f"keel: distributed setup: {describe(accelerator)}", file=sys.stderr, flush=True)
    if not found:
        return
    message = (
        "the distributed setup is not what was asked for.\n  - "
        + "\n  - ".join(found)
        + "\nOn CPU, accelerate never shards (FSDP/DeepSpeed need GPUs; it falls back to DDP or to one "
        "process each): drop the FSDP/DeepSpeed config, or call torch's fully_shard yourself (tests/"
        "distributed/fsdp2_worker.py). On GPUs, check the accelerate config (recipes/accelerate/) and that "
        f"the launcher sees the GPUs. Set {ALLOW_ENV}=1 to train anyway."
    )
    if _env_flag(ALLOW_ENV):
        warnings.warn(message, stacklevel=2)
        print(f"WARNING: {message}", file=sys.stderr, flush=True)
        return
    raise DistributedSetupError(message)
