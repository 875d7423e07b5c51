"""InterventionDPOTrainer: TRL's DPOTrainer with interventions, each in the passes its phases name.

A DPO step runs the policy over the batch (chosen rows, then rejected rows; ``completion_mask`` from the
collator) and a reference over the same batch: with PEFT, the same modules with the adapter off (or TRL's
``"ref"`` adapter); otherwise a separate frozen model. Interventions with ``train`` act in the policy's
forward; with ``reference``, in the reference's (whichever way it runs, also when the reference log-probs
are precomputed, ``precompute_ref_log_probs``). See :mod:`trainers.passes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset
from datasets.fingerprint import Hasher
from torch import nn
from trl import DPOConfig, DPOTrainer

from interventions import InterventionSet, parse_interventions
from interventions.reference import frozen_copy, is_peft_model

from .config import InterventionArguments
from .mixin import InterventionTrainerMixin, check_datasets
from .passes import PassRouter, reference_specs


def salted_for_reference(dataset, specs):
    """TRL caches precomputed reference log-probs under the dataset's fingerprint and the weights' hash: give
    the dataset a fingerprint that also names the reference interventions, or a run with other ones would
    read these values back from the cache."""
    if not specs or dataset is None:
        return dataset
    if isinstance(dataset, dict):
        return {name: salted_for_reference(d, specs) for name, d in dataset.items()}
    if not isinstance(dataset, Dataset):
        return dataset  # TRL refuses to precompute over anything else
    key = [
        (s.to_dict(), s.direction_fingerprint(), None if isinstance(s.direction, str) else s.direction)
        for s in specs
    ]
    return dataset.select(range(len(dataset)), new_fingerprint=Hasher.hash((dataset._fingerprint, key)))


@dataclass
class InterventionDPOConfig(InterventionArguments, DPOConfig):
    """``DPOConfig`` plus keel's settings (:class:`trainers.config.InterventionArguments`)."""


class InterventionDPOTrainer(InterventionTrainerMixin, DPOTrainer):
    """DPO with an :class:`interventions.InterventionSet`: ``train`` interventions act in the policy's passes,
    ``reference`` ones in the reference's (see :mod:`trainers.passes`).

    ``ref_model``: as in TRL. Left None for full fine-tuning of a model passed in memory, it is a frozen copy
    of the model as passed in (TRL would reload it by name from the hub); with PEFT, the reference is the
    same model with its adapter off. ``interventions``, ``intervention_reference_model`` and
    ``projection_monitor``: as in :class:`trainers.InterventionSFTTrainer`.
    """

    def __init__(
        self,
        model,
        ref_model=None,
        args: InterventionDPOConfig | None = None,
        *pargs,
        interventions=None,
        intervention_reference_model=None,
        projection_monitor=None,
        **kwargs,
    ):
        check_datasets(train_dataset=kwargs.get("train_dataset"), eval_dataset=kwargs.get("eval_dataset"))
        if (
            ref_model is None
            and isinstance(model, nn.Module)
            and not is_peft_model(model)
            and kwargs.get("peft_config") is None
            and not getattr(args, "precompute_ref_log_probs", False)
        ):
            ref_model = frozen_copy(model)
        # DPOTrainer.__init__ may precompute reference log-probs (compute_ref_log_probs) before keel's sets
        # exist: keep the specs for that.
        self._keel_specs = parse_interventions(
            interventions if interventions is not None else getattr(args, "interventions", None)
        )
        if getattr(args, "precompute_ref_log_probs", False):
            for name in ("train_dataset", "eval_dataset"):
                kwargs[name] = salted_for_reference(kwargs.get(name), reference_specs(self._keel_specs))
        super().__init__(model, ref_model, args, *pargs, **kwargs)
        self._init_interventions(interventions, intervention_reference_model, projection_monitor)
        self.intervention_passes = PassRouter(
            self.intervention_set, self.model, ref_model=self.ref_model, reference_source=None
        )

    def compute_ref_log_probs(self, model, inputs):
        """TRL's reference pass for one batch (used when precomputing), in phase ``reference``."""
        router = self.__dict__.get("intervention_passes")
        if router is None:  # inside DPOTrainer.__init__: a router for the reference interventions only
            specs = reference_specs(self._keel_specs)
            if not specs:
                return super().compute_ref_log_probs(model, inputs)
            layers_path = getattr(self.args, "intervention_layers_path", None)
            router = PassRouter(
                InterventionSet(self.model, specs, layers_path=layers_path),
                self.model,
                ref_model=self.ref_model,
            )
        with router.reference_pass(model, inputs):
            return super().compute_ref_log_probs(model, inputs)

    def _monitor_examples(self, monitor):
        """Without ``projection_monitor.data``: the chosen answers of the first preference pairs (eval split,
        else train), the answer as completion."""
        if monitor.config.data is not None:
            return super()._monitor_examples(monitor)
        dataset = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()))
        out = []
        for row in dataset:
            if len(out) >= monitor.config.max_examples:
                break
            prompt, chosen = list(row["prompt_ids"]), list(row["chosen_ids"])
            out.append({"input_ids": prompt + chosen, "labels": [-100] * len(prompt) + chosen})
        return out
