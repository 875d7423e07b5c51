"""What every keel trainer adds to its TRL parent: an InterventionSet switched on around the right passes.

Only public seams are overridden (``train``, ``training_step``, ``prediction_step``, ``evaluate``,
``log``). Hooks are registered once per ``train()``/``evaluate()`` call and switched by phase; the
token masks come from the batch (``labels != -100`` is the completion), never from tensor indices.
"""

from __future__ import annotations

import copy

from transformers import TrainerCallback

from interventions import Intervention, InterventionSet


class DirectionLineageCallback(TrainerCallback):
    """Once the W&B run exists (``WandbCallback`` starts it at train begin), record which direction
    artifacts this run used, so W&B lineage links directions to fine-tunes."""

    def __init__(self, refs: list[str]):
        self.refs = refs

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and "wandb" in (args.report_to or []):
            from interventions.tracking import record_direction_lineage

            record_direction_lineage(self.refs)


def frozen_reference(model):
    """The reference for reference_ablate / resample_ablate: the model as it is before training, frozen.

    A PEFT model needs no copy (its adapters are switched off for the reference pass; ``None`` says so);
    any other model is deep-copied once, which holds a second copy of the weights in memory.
    """
    from interventions import unwrap_model

    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        return None
    ref = copy.deepcopy(unwrap_model(model)).eval()
    # Trainers and accelerate may set ``forward`` on the instance (a wrapper closing over the original
    # module). deepcopy does not copy closures, so the copy's forward would run the policy: drop them.
    for module in ref.modules():
        module.__dict__.pop("forward", None)
    ref.requires_grad_(False)
    return ref


class InterventionTrainerMixin:
    """Mix into a TRL trainer before the trainer class: ``class X(InterventionTrainerMixin, SFTTrainer)``."""

    intervention_set: InterventionSet

    def _init_interventions(self, interventions, reference_model=None) -> None:
        specs = interventions if interventions is not None else getattr(self.args, "interventions", None)
        layers_path = getattr(self.args, "intervention_layers_path", None)
        self.intervention_set = InterventionSet(
            self.model, specs or [], layers_path=layers_path, seed=self.args.seed
        )
        self.intervention_reference_model = reference_model
        if reference_model is None and self.intervention_set.needs_reference:
            self.intervention_reference_model = frozen_reference(self.model)
        refs = [i.wandb_artifact for i in self.intervention_set.interventions if i.wandb_artifact]
        if refs:
            self.add_callback(DirectionLineageCallback(refs))

    @property
    def interventions(self) -> list[Intervention]:
        return self.intervention_set.interventions

    def train(self, *args, **kwargs):
        with self.intervention_set:
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with self.intervention_set:
            return super().evaluate(*args, **kwargs)

    def _set_batch(self, inputs) -> None:
        self.intervention_set.set_batch(
            attention_mask=inputs.get("attention_mask"),
            labels=inputs.get("labels"),
            completion_mask=inputs.get("completion_mask"),
        )

    def _set_reference(self, inputs, phase: str) -> None:
        """For reference_ablate / resample_ablate: the reference's pass over this batch, before the policy's."""
        iset = self.intervention_set
        if not iset.needs_reference_in(phase):
            return
        ref = self.intervention_reference_model
        # training_step receives the batch before Trainer moves it to the device
        device = next((ref if ref is not None else self.model).parameters()).device
        keys = ("input_ids", "attention_mask", "position_ids")
        batch = {k: inputs[k].to(device) for k in keys if inputs.get(k) is not None}
        if ref is None:  # a PEFT model: the reference is the same model with its adapters off
            with self.accelerator.unwrap_model(self.model).disable_adapter():
                iset.set_reference(self.model, **batch)
        else:
            iset.set_reference(ref, **batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The backward (and gradient checkpointing's recompute) runs inside this call, so the hooks'
        # phase, masks and reference activations cover forward and backward alike.
        self._set_batch(inputs)
        self._set_reference(inputs, "train")
        self.intervention_set.set_step(self.state.global_step)
        self.intervention_set.collect_stats = self._logs_this_step()
        with self.intervention_set.phase("train"):
            return super().training_step(model, inputs, num_items_in_batch)

    def _logs_this_step(self) -> bool:
        """Diagnostics cost a few projections per hook: measure them only on the steps that get logged."""
        step, args = self.state.global_step + 1, self.args
        if args.logging_strategy != "steps":
            return True
        every = (
            args.logging_steps
            if args.logging_steps >= 1
            else max(int(args.logging_steps * self.state.max_steps), 1)
        )
        first = args.logging_first_step and self.state.global_step == 0
        return first or step % every == 0 or step == self.state.max_steps

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self.intervention_set.collect_stats = True
        self._set_batch(inputs)
        self._set_reference(inputs, "eval")
        with self.intervention_set.phase("eval"):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        prefix = "interventions/" if self.model.training else "eval_interventions/"
        logs.update(self.intervention_set.pop_metrics(prefix=prefix))
        for op in self.intervention_set.ops:
            if op.spec.schedule is not None and self.model.training:
                logs[f"{prefix}{op.spec.name}/L{op.layer}/coefficient"] = op.coefficient
        super().log(logs, start_time)
