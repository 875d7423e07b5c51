"""``keel train --config recipe.yaml``: SFT with interventions, doing what TRL's ``sft.py`` does; DPO and
GRPO with ``trainer: dpo|grpo`` (GRPO's ``reward_funcs`` as import paths ``module:function``).

Resume (``--resume_from_checkpoint PATH|true``), an eval split (``--dataset_test_split`` with
``--eval_strategy steps``), dataset mixtures (``datasets:`` in the recipe), quantized loading
(``--load_in_4bit``) and ``trust_remote_code``; interventions from the recipe or the command line
(``--interventions '[...]'`` or a YAML file). Writes the resolved recipe and the SHA-256 of every
direction file into ``output_dir`` (``keel_config.yaml``). Also runs under
``accelerate launch scripts/train.py --config ...``. ``--dry_run true`` runs any recipe for a few steps on
a tiny random-init model of the same architecture family, on CPU (``keel.loading.dryrun``).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers.trainer_utils import get_last_checkpoint
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, get_dataset, get_peft_config

from interventions.serialization import KeelInputError
from keel.loading import ModelSpec, load_dataset_any, load_model, quantization_config
from keel.loading.data_baselines import DataBaselineArguments, apply_data_baselines
from keel.loading.dryrun import DryRunArguments, describe, prepare_dry_run, split_dry_run_argv
from keel.rewards import load_reward_funcs
from trainers import (
    InterventionDPOConfig,
    InterventionDPOTrainer,
    InterventionGRPOConfig,
    InterventionGRPOTrainer,
    InterventionSFTConfig,
    InterventionSFTTrainer,
)

from .common import config_dict, parse, write_config_record

PROG = "keel train"
TRAINERS = {"sft": InterventionSFTConfig, "dpo": InterventionDPOConfig, "grpo": InterventionGRPOConfig}


@dataclass
class TrainScriptArguments(DataBaselineArguments, ScriptArguments):
    """TRL's script arguments plus the data baselines (keel.loading.data_baselines) and the trainer choice."""

    trainer: str = field(
        default="sft",
        metadata={
            "help": "The TRL trainer: sft (messages or prompt/completion data), dpo (prompt/chosen/rejected) "
            "or grpo (prompts, with reward_funcs).",
            "choices": list(TRAINERS),
        },
    )
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "A PEFT adapter folder to load on the model and keep training (its weights trainable); "
            "not together with use_peft, which starts a new adapter."
        },
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "grpo: reward functions, as import paths module:function (or a name in keel.rewards, "
            "e.g. length_reward)."
        },
    )


def trainer_name(argv) -> str:
    """``trainer`` from the command line (``--trainer X``) or the recipe (``--config FILE``), read before
    parsing: it chooses the training config class the rest is parsed into."""
    argv, name, config = list(argv), None, None
    for i, arg in enumerate(argv):
        for flag in ("--trainer", "--config"):
            value = argv[i + 1] if arg == flag and i + 1 < len(argv) else None
            if arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            if value is not None and flag == "--trainer":
                name = value
            elif value is not None:
                config = value
    if name is None and config and os.path.isfile(config):
        with open(config) as f:
            try:
                recipe = yaml.safe_load(f)
            except yaml.YAMLError:
                recipe = None  # the parser reports it
        if isinstance(recipe, dict):
            name = recipe.get("trainer")
    name = str(name or "sft").lower()
    if name not in TRAINERS:
        raise KeelInputError(f"trainer {name!r}: choose one of {', '.join(TRAINERS)}.")
    return name


def config_types(argv) -> tuple:
    return (TrainScriptArguments, TRAINERS[trainer_name(argv)], ModelConfig, DatasetMixtureConfig)


CONFIG_TYPES = config_types([])  # sft


def trainer_class(script_args) -> tuple[type, dict]:
    """The trainer class ``script_args.trainer`` names and what only it takes (GRPO's reward functions)."""
    name = getattr(script_args, "trainer", "sft")
    funcs = getattr(script_args, "reward_funcs", None)
    if name == "grpo":
        return InterventionGRPOTrainer, {"reward_funcs": load_reward_funcs(funcs)}
    if funcs:
        raise KeelInputError(f"reward_funcs is for trainer grpo; this recipe trains with {name}.")
    return {"sft": InterventionSFTTrainer, "dpo": InterventionDPOTrainer}[name], {}


def load_datasets(script_args, training_args, dataset_args):
    """(train, eval or None): a mixture when ``datasets`` is given, else ``dataset_name``'s splits.

    A mixture is TRL's ``get_dataset``: its splits are ``train`` and, with ``test_split_size``, ``test``
    (split with ``seed``, so a resumed run trains on the same rows; TRL's own split is unseeded);
    ``dataset_train_split``/``dataset_test_split`` name the splits of ``dataset_name`` only."""
    wants_eval = training_args.eval_strategy != "no"
    if dataset_args.datasets:
        if script_args.dataset_name:
            print(
                f"{PROG}: both `datasets` and dataset_name are given; training on the `datasets` mixture.",
                file=sys.stderr,
            )
        test_size = dataset_args.test_split_size
        mixture = get_dataset(_replace(dataset_args, test_split_size=None))["train"]
        if test_size is not None:
            if dataset_args.streaming:
                raise SystemExit(
                    f"{PROG}: test_split_size cannot split a streaming mixture; drop one of them."
                )
            split = mixture.train_test_split(test_size=test_size, seed=training_args.seed)
            train, test = split["train"], split["test"]
        else:
            train, test = mixture, None
        if wants_eval and test is None:
            raise SystemExit(
                f"{PROG}: eval_strategy is {training_args.eval_strategy.value!r} but the `datasets` mixture has no "
                "test split; set test_split_size in the recipe, or eval_strategy: 'no'."
            )
        return train, (test if wants_eval else None)
    if not script_args.dataset_name:
        raise SystemExit(f"{PROG}: give dataset_name (a file, folder or hub id) or a `datasets:` mixture.")

    def split(name: str):
        return load_dataset_any(
            script_args.dataset_name,
            script_args.dataset_config,
            name,
            streaming=script_args.dataset_streaming,
        )

    return split(script_args.dataset_train_split), (
        split(script_args.dataset_test_split) if wants_eval else None
    )


def _replace(config, **changes):
    out = copy.copy(config)
    for key, value in changes.items():
        setattr(out, key, value)
    return out


def resume_target(value, output_dir: str) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or true/last for the newest in output_dir."""
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in ("true", "last"):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise SystemExit(
                f"{PROG}: resume_from_checkpoint={value} but {output_dir} holds no checkpoint-*."
            )
        return last
    if not os.path.isfile(os.path.join(value, "trainer_state.json")):
        raise SystemExit(
            f"{PROG}: resume_from_checkpoint {value} is not a checkpoint folder (no trainer_state.json); "
            "pass a checkpoint-N folder, or true for the newest in output_dir."
        )
    return str(value)


def model_spec(training_args, model_args, adapter: str | None = None) -> ModelSpec:
    """What sft.py passes to from_pretrained: revision, dtype, attention, trust_remote_code, quantization
    and ``model_init_kwargs`` (those win, as in sft.py); ``adapter``: a PEFT adapter loaded trainable."""
    return ModelSpec(
        model_args.model_name_or_path,
        adapter=adapter,
        trainable_adapter=adapter is not None,
        revision=model_args.model_revision,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=training_args.trust_remote_code,
        quantization=quantization_config(model_args=model_args),
        device="cpu" if training_args.use_cpu else None,
        model_kwargs=dict(training_args.model_init_kwargs or {}) or None,
    )


def summary_line(output_dir: str, state, result, start_step: int = 0) -> str:
    """The closing line. The final train loss is the mean over the steps this run trained (TRL's
    ``train_loss``; after a resume, only the steps after the checkpoint), then the last logged loss."""
    trained = result.global_step - start_step
    steps = f"{trained} of {result.global_step}" if start_step else f"{trained}"
    logged = [e for e in state.log_history if "loss" in e and "step" in e]
    last = f"; last logged {logged[-1]['loss']:.4f} at step {logged[-1]['step']}" if logged else ""
    return (
        f"keel train: model saved to {output_dir}; final train loss {result.training_loss:.4f} "
        f"(mean over this run's {steps} steps{last})."
    )


def checkpoint_step(checkpoint: str | None) -> int:
    if checkpoint is None:
        return 0
    return int(json.loads(Path(checkpoint, "trainer_state.json").read_text()).get("global_step", 0))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        types = config_types(argv)  # trainer: sft|dpo|grpo chooses the training config
        dry, rest = split_dry_run_argv(argv)
        if dry.dry_run and not {"-h", "--help"} & set(argv):
            *configs, notes = prepare_dry_run(rest, dry, lambda a: parse(types, a, PROG, __doc__))
            print(describe(notes), file=sys.stderr)
        else:  # DryRunArguments only so that --help lists the options
            configs = parse(types + (DryRunArguments,), argv, PROG, __doc__)[:4]
    except KeelInputError as err:
        raise SystemExit(f"{PROG}: {err}") from None
    try:
        return run(*configs)
    except KeelInputError as err:
        raise SystemExit(f"{PROG}: {err}") from None


def run(script_args, training_args, model_args, dataset_args) -> int:
    if not model_args.model_name_or_path:
        raise SystemExit(f"{PROG}: give model_name_or_path (a hub id, a local folder or tiny:<model_type>).")
    trainer_cls, trainer_kwargs = trainer_class(script_args)  # a bad reward function fails before any loading
    record = {
        "script": config_dict(script_args),
        "training": config_dict(training_args),
        "model": config_dict(model_args),
        "datasets": config_dict(dataset_args),
    }
    if "wandb" in (training_args.report_to or []):
        os.environ.setdefault("WANDB_DIR", training_args.output_dir)
    resume = resume_target(training_args.resume_from_checkpoint, training_args.output_dir)
    train_dataset, eval_dataset = load_datasets(script_args, training_args, dataset_args)
    # inoculation_prompt / interleave: they change the training data (labelled on stderr); never the eval split
    train_dataset = apply_data_baselines(train_dataset, script_args, seed=training_args.seed)
    adapter = getattr(script_args, "adapter", None)
    if adapter and model_args.use_peft:
        raise SystemExit(
            f"{PROG}: adapter={adapter} continues an existing adapter and use_peft starts a new one; give one."
        )
    model, tokenizer = load_model(model_spec(training_args, model_args, adapter))
    # Already applied by load_model; left set, SFTTrainer would warn that it ignores them.
    training_args.model_init_kwargs = None
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        **trainer_kwargs,
    )
    if trainer.is_world_process_zero():
        record["training"]["resume_from_checkpoint"] = resume
        write_config_record(training_args.output_dir, record)
    result = trainer.train(resume_from_checkpoint=resume)
    if trainer.is_fsdp_enabled and "FULL" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type):
        # Checkpoints may be sharded (recipes/accelerate/fsdp2.yaml); the final model must load anywhere.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json (the log history) beside the model
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.accelerator.print(
        summary_line(training_args.output_dir, trainer.state, result, checkpoint_step(resume))
    )
    if "wandb" in (training_args.report_to or []):
        import wandb  # the WandbCallback leaves its run open after train()

        wandb.finish()
    # Free the DDP wrapper (its reducer holds the process group) while the group is still registered: freed
    # after destroy_process_group, the gloo group's destructor joins its worker thread from the dealloc,
    # holding the GIL the worker may be waiting for, and rank 0 hangs at exit (seen in 1 of 3-6 CPU runs).
    accelerator = trainer.accelerator
    del trainer, model
    accelerator.free_memory()
    accelerator.end_training()  # what Trainer.end() does (transformers>=5.18): trackers, process group
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
