"""InterventionSFTTrainer: TRL's SFTTrainer with interventions switched on during training."""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from .config import InterventionArguments
from .mixin import InterventionTrainerMixin, check_datasets


@dataclass
class InterventionSFTConfig(InterventionArguments, SFTConfig):
    """``SFTConfig`` plus keel's settings (:class:`trainers.config.InterventionArguments`)."""


class InterventionSFTTrainer(InterventionTrainerMixin, SFTTrainer):
    """SFT with an :class:`interventions.InterventionSet` on the policy during training steps.

    ``interventions`` (specs or mappings) overrides ``args.interventions`` when given.
    ``intervention_reference_model``: the reference for reference_ablate / resample_ablate; by default a
    frozen copy of the model as passed in (for PEFT models: the same model with adapters off).
    ``projection_monitor``: a :class:`trainers.ProjectionMonitor` (or its config mapping) overriding
    ``args.projection_monitor``.
    ``args.intervention_reference='precomputed'``: the reference's values come from one pass of the starting
    model over the training data before training, keyed by each example's tokens (trainers.mixin).
    """

    precomputed_reference_supported = True

    def __init__(
        self, *args, interventions=None, intervention_reference_model=None, projection_monitor=None, **kwargs
    ):
        check_datasets(train_dataset=kwargs.get("train_dataset"), eval_dataset=kwargs.get("eval_dataset"))
        super().__init__(*args, **kwargs)
        self._init_interventions(interventions, intervention_reference_model, projection_monitor)
