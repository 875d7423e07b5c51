"""``keel train --config recipe.yaml``: SFT with interventions (TRL script style: make_parser + main).

Also runs under ``accelerate launch -m scripts.train --config ...``.
"""

from __future__ import annotations

import argparse
import os

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from trainers import InterventionSFTConfig, InterventionSFTTrainer

from .models import load_dataset_any, load_model_for_training


def make_parser(subparsers: argparse._SubParsersAction | None = None) -> TrlParser:
    dataclass_types = (ScriptArguments, InterventionSFTConfig, ModelConfig)
    if subparsers is not None:
        return subparsers.add_parser("train", help="SFT with interventions", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types)


def main(argv: list[str] | None = None) -> None:
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    if "wandb" in (training_args.report_to or []):
        os.environ.setdefault("WANDB_DIR", training_args.output_dir)
    model, tokenizer = load_model_for_training(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
    )
    dataset = load_dataset_any(
        script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split
    )
    trainer = InterventionSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    if "wandb" in (training_args.report_to or []):
        import wandb

        wandb.finish()


if __name__ == "__main__":
    main()
