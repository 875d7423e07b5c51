"""``keel train --config recipe.yaml``: SFT with interventions, doing what TRL's ``sft.py`` does.

Resume (``--resume_from_checkpoint PATH|true``), an eval split (``--dataset_test_split`` with
``--eval_strategy steps``), dataset mixtures (``datasets:`` in the recipe), quantized loading
(``--load_in_4bit``) and ``trust_remote_code``; interventions from the recipe or the command line
(``--interventions '[...]'`` or a YAML file). Writes the resolved recipe and the SHA-256 of every
direction file into ``output_dir`` (``keel_config.yaml``). Also runs under
``accelerate launch scripts/train.py --config ...``.
"""

from __future__ import annotations

import os
from pathlib import Path

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, get_dataset, get_peft_config

from keel.loading import ModelSpec, load_dataset_any, load_model, quantization_config
from trainers import InterventionSFTConfig, InterventionSFTTrainer

from .common import config_dict, parse, write_config_record

CONFIG_TYPES = (ScriptArguments, InterventionSFTConfig, ModelConfig, DatasetMixtureConfig)
PROG = "keel train"


def load_datasets(script_args, training_args, dataset_args):
    """(train, eval or None): a mixture when ``datasets`` is given, else ``dataset_name``'s splits."""
    wants_eval = training_args.eval_strategy != "no"
    if dataset_args.datasets:
        mixture = get_dataset(dataset_args)
        train = mixture[script_args.dataset_train_split]
        test = script_args.dataset_test_split
        if wants_eval and test not in mixture:
            raise SystemExit(
                f"{PROG}: eval_strategy is {training_args.eval_strategy!r} but the mixture has no {test!r} split "
                f"(it has {sorted(mixture)}); set test_split_size in the recipe, or eval_strategy: 'no'."
            )
        return train, (mixture[test] if wants_eval else None)
    if not script_args.dataset_name:
        raise SystemExit(f"{PROG}: give dataset_name (a file, folder or hub id) or a `datasets:` mixture.")
    name, config = script_args.dataset_name, script_args.dataset_config
    train = load_dataset_any(name, config, script_args.dataset_train_split)
    test = load_dataset_any(name, config, script_args.dataset_test_split) if wants_eval else None
    return train, test


def resume_target(value, output_dir: str):
    """``--resume_from_checkpoint``: a checkpoint folder, or true/last for the newest in output_dir."""
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in ("true", "last"):
        checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        if not checkpoints:
            raise SystemExit(
                f"{PROG}: resume_from_checkpoint={value} but {output_dir} holds no checkpoint-*."
            )
        return str(checkpoints[-1])
    if not Path(value).is_dir():
        raise SystemExit(f"{PROG}: resume_from_checkpoint {value} is not a checkpoint folder.")
    return str(value)


def main(argv: list[str] | None = None) -> int:
    script_args, training_args, model_args, dataset_args = parse(CONFIG_TYPES, argv, PROG, __doc__)
    if "wandb" in (training_args.report_to or []):
        os.environ.setdefault("WANDB_DIR", training_args.output_dir)
    resume = resume_target(training_args.resume_from_checkpoint, training_args.output_dir)
    train_dataset, eval_dataset = load_datasets(script_args, training_args, dataset_args)
    spec = ModelSpec(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=training_args.trust_remote_code,
        quantization=quantization_config(model_args=model_args),
    )
    model, tokenizer = load_model(spec)
    trainer = InterventionSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    sections = {
        "script": config_dict(script_args),
        "training": config_dict(training_args),
        "model": config_dict(model_args),
        "datasets": config_dict(dataset_args),
    }
    write_config_record(training_args.output_dir, sections)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    if "wandb" in (training_args.report_to or []):
        import wandb

        wandb.finish()
    trainer.accelerator.print(
        f"keel train: model saved to {training_args.output_dir}; final train loss {result.training_loss:.4f} "
        f"after {result.global_step} steps."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
