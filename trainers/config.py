"""The keel settings every keel trainer config adds to its TRL parent (SFT, DPO, GRPO): one definition."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from interventions.spec import parse_interventions

from .monitoring import parse_projection_monitor
from .regularisers import parse_regularisers

REFERENCE_MODES = ("live", "precomputed")


@dataclass
class InterventionArguments:
    """Interventions, W&B conventions and projection monitoring; mixed into ``XConfig(InterventionArguments,
    trl.XConfig)`` so every trainer config reads, validates and records them the same way."""

    interventions: list[Any] | str | None = field(
        default=None,
        metadata={
            "help": "Interventions to apply: a list of mappings with keys operator, direction, site, layers, "
            "tokens, phases, coefficient, schedule, value, components, direction_layer, name; on the command "
            "line a YAML/JSON list ('[]' for none) or the path of a YAML file holding one."
        },
    )
    intervention_reference: str = field(
        default="live",
        metadata={
            "help": "Where reference_ablate / resample_ablate read the starting model's projections: 'live' (a "
            "reference forward per batch: a frozen copy of the model, or a PEFT model with its adapters off) or "
            "'precomputed' (one pass of the starting model over the training data before training, kept per "
            "example, keyed by its tokens; no reference forward and no copy of the weights during training). "
            "precomputed falls back to live, with a warning, where batches cannot be keyed (padding-free "
            "packing, iterable datasets, DPO/GRPO, regularisers that read the reference pass anyway)."
        },
    )
    intervention_layers_path: str | None = field(
        default=None,
        metadata={"help": "Dotted path of the decoder-layer list, for architectures keel does not know."},
    )
    wandb_project: str | None = field(
        default=None,
        metadata={"help": "W&B project when report_to has wandb (default: WANDB_PROJECT, else keel)."},
    )
    wandb_group: str | None = field(
        default=None,
        metadata={"help": "W&B group (default: WANDB_RUN_GROUP, which keel sweep sets to the sweep's name)."},
    )
    wandb_tags: list[str] | None = field(
        default=None,
        metadata={"help": "Extra W&B tags (keel adds operators, layers, and a sweep's condition/seed)."},
    )
    projection_monitor: dict | str | None = field(
        default=None,
        metadata={
            "help": "Projection monitoring (the fine-tuning shift along directions, interventions on and off, "
            "logged as monitor/<name>/L<layer>/on|off|abs_on|abs_off and written to "
            "<output_dir>/projection_monitor.jsonl): a mapping with keys directions (a list of mappings with "
            "keys name, direction, site, layers, direction_layer, components), every, data, max_examples, "
            "batch_size, tokens; on the command line a YAML/JSON mapping or the path of a YAML file holding one."
        },
    )
    regularisers: list[Any] | str | None = field(
        default=None,
        metadata={
            "help": "Regularisers, extra loss terms logged as regularisers/<name> (see trainers/regularisers.py): a "
            "list of mappings with keys name, kind (kl, ldifs, projection_penalty, blocking), weight, schedule and "
            "the kind's own keys (kl: anchor_data, anchor_batch_size; ldifs: site, layers, normalise; "
            "projection_penalty: direction, site, layers, direction_layer, components, tokens; blocking: direction "
            "(up/down/both), directions or sae + latents, site, layers, direction_layer, components); on the command "
            "line a YAML/JSON list or the path of a YAML file holding one."
        },
    )

    def __post_init__(self):
        super().__post_init__()  # the TRL config's own checks
        # Fail at config time on unknown keys or bad values, not after the model is loaded.
        if self.intervention_reference not in REFERENCE_MODES:
            raise ValueError(
                f"intervention_reference must be one of {', '.join(REFERENCE_MODES)}; got "
                f"{self.intervention_reference!r}."
            )
        self.interventions = parse_interventions(self.interventions)
        self.projection_monitor = parse_projection_monitor(self.projection_monitor)
        self.regularisers = parse_regularisers(self.regularisers)

    def to_dict(self):
        out = super().to_dict()
        out["interventions"] = [i.to_dict() for i in self.interventions]
        # Which direction files the run read, byte for byte (lands in the W&B config and the run record).
        out["intervention_direction_files"] = {
            i.name: i.direction_fingerprint() for i in self.interventions if i.direction_fingerprint()
        }
        out["projection_monitor"] = self.projection_monitor.to_dict() if self.projection_monitor else None
        out["regularisers"] = [r.to_dict() for r in self.regularisers]
        return out
