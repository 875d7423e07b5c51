"""Intervention: a validated, serialisable description of one intervention.

operator + direction + site + layers + which tokens + in which phases + coefficient (and schedule).
It round-trips through plain dicts (YAML recipes, the W&B config); unknown keys fail loudly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .direction import (
    Direction,
    DirectionError,
    direction_file_paths,
    file_sha256,
    load_directions,
    random_direction,
)
from .operators import BASIS, MEAN, OPERATORS, VALUE, Operator
from .serialization import KeelInputError, from_dict, read_config_value
from .sites import SITE_KINDS, parse_layers
from .tracking import fetch_direction_artifact

TOKENS = ("all", "prompt", "completion")
PHASES = ("train", "reference", "generate", "eval")
SCHEDULES = ("constant", "linear_warmup", "linear_decay")
WANDB_PREFIX = "wandb:"


class SpecError(KeelInputError):
    """An intervention spec that cannot be used; the message names the field and the fix."""


@dataclass
class Schedule:
    """How the coefficient moves over training: ``constant``, ``linear_warmup`` (0 -> coefficient over
    ``steps``), ``linear_decay`` (coefficient -> 0 from ``start`` to ``start + steps``)."""

    kind: str = "constant"
    steps: int = 0
    start: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise SpecError(f"Unknown schedule {self.kind!r}: choose one of {', '.join(SCHEDULES)}.")
        if self.kind != "constant" and self.steps <= 0:
            raise SpecError(f"Schedule {self.kind!r} needs steps > 0 (got {self.steps}).")

    def factor(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        t = min(max((step - self.start) / self.steps, 0.0), 1.0)
        return t if self.kind == "linear_warmup" else 1.0 - t


@dataclass
class Intervention:
    """One intervention. ``direction`` is a path to a direction file, a :class:`Direction`, or a tensor.

    ``layers``: an int, list, ``"all"`` or ``"start:stop"``; ``None`` means the direction's own layer.
    ``direction`` may also be ``"random:SEED[:K]"`` (K random orthonormal rows of the model's width) or
    ``"wandb:ENTITY/PROJECT/NAME:ALIAS"`` (a ``direction`` artifact; training runs record its lineage).
    ``direction_layer``: when the file holds one direction per layer, which one to use at every target
    layer; by default each target layer uses the direction recorded for it.
    ``tokens``: positions acted on: ``all`` (also padding, as CAFT does), ``prompt`` or ``completion``
    (labels != -100; during generation: the newly generated tokens).
    ``operator``: ``project_out``, ``mean_ablate`` (needs the direction's reference ``mean``),
    ``reference_ablate`` (the projection a reference model has on the same batch; keel trainers keep a
    frozen copy of the starting model for it), ``resample_ablate`` (the reference's projection from
    another row of the batch, same position), ``clamp`` (to ``value``) or ``add`` (steer).
    ``phases``: when it is on: ``train`` (default), ``reference`` (the reference pass of DPO/GRPO),
    ``generate``, ``eval``.
    """

    operator: str
    direction: Any
    site: str = "resid_post"
    layers: Any = None
    tokens: str = "all"
    phases: list[str] = field(default_factory=lambda: ["train"])
    coefficient: float = 1.0
    schedule: Schedule | None = None
    value: Any = None  # clamp target (scalar or list of k)
    components: list[int] | None = None  # rows of the direction to use
    direction_layer: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise SpecError(
                f"Unknown operator {self.operator!r}: choose one of {', '.join(OPERATORS)}, or register "
                "your own with interventions.register_operator()."
            )
        if self.site not in SITE_KINDS:
            raise SpecError(f"Unknown site {self.site!r}: choose one of {', '.join(SITE_KINDS)}.")
        if self.tokens not in TOKENS:
            raise SpecError(f"Unknown tokens {self.tokens!r}: choose one of {', '.join(TOKENS)}.")
        if isinstance(self.phases, str):
            self.phases = [self.phases]
        self.phases = list(self.phases)
        bad = [p for p in self.phases if p not in PHASES]
        if bad or not self.phases:
            raise SpecError(f"Unknown phases {bad or self.phases!r}: choose from {', '.join(PHASES)}.")
        if isinstance(self.schedule, dict):
            self.schedule = from_dict(Schedule, self.schedule, "schedule", error=SpecError)
        if isinstance(self.schedule, str):
            self.schedule = Schedule(kind=self.schedule)
        if isinstance(self.coefficient, bool):
            raise SpecError(f"coefficient must be a number, got {self.coefficient!r}.")
        try:
            self.coefficient = float(self.coefficient)
        except (TypeError, ValueError):
            raise SpecError(f"coefficient must be a number, got {self.coefficient!r}.") from None
        if not math.isfinite(self.coefficient):
            raise SpecError(
                f"Intervention {self.name or self.operator!r}: coefficient must be finite, got {self.coefficient}."
            )
        if self.value is not None:
            _check_value(self.value, self.name or self.operator)
        problem = self.op.check(self.value)
        if problem:
            raise SpecError(problem)
        if self.op.phases is not None and not set(self.phases) <= set(self.op.phases):
            raise SpecError(
                f"operator {self.operator!r} needs a reference model's pass over the same batch, which keel "
                f"trainers run for the {' and '.join(repr(p) for p in self.op.phases)} phases only; "
                f"got phases {self.phases}."
            )
        if self.layers is not None:
            try:
                parse_layers(self.layers)
            except ValueError as err:
                raise SpecError(f"Intervention {self.name or self.operator!r}: {err}") from None
        if self.direction is None:
            raise SpecError("`direction` is required: a path to a direction file, a Direction or a tensor.")
        if self.name is None:
            self.name = f"{self.operator}@{self.site}"

    @property
    def op(self) -> Operator:
        """The registered operator object this spec names."""
        return OPERATORS[self.operator]

    @property
    def wandb_artifact(self) -> str | None:
        """The W&B artifact reference of the direction, if it comes from one."""
        d = self.direction
        return d[len(WANDB_PREFIX) :] if isinstance(d, str) and d.startswith(WANDB_PREFIX) else None

    @property
    def direction_path(self) -> Path | None:
        """The local direction file this spec reads, if it reads one (not a tensor, random or W&B)."""
        d = self.direction
        if isinstance(d, Path) or (isinstance(d, str) and not d.startswith(("random:", WANDB_PREFIX))):
            return direction_file_paths(d)[0]
        return None

    def direction_fingerprint(self) -> dict | None:
        """Path and SHA-256 of the direction file and its JSON sidecar, for run records and W&B."""
        path = self.direction_path
        if path is None or not path.is_file():
            return None
        sidecar = direction_file_paths(path)[1]
        out = {"path": str(path), "sha256": file_sha256(path)}
        if sidecar.is_file():
            out["metadata_sha256"] = file_sha256(sidecar)
        return out

    def coefficient_at(self, step: int) -> float:
        return self.coefficient * (self.schedule.factor(step) if self.schedule else 1.0)

    # --- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.direction, Direction):
            out["direction"] = (
                f"<Direction {self.direction.method} k={self.direction.k} layer={self.direction.layer}>"
            )
        elif isinstance(self.direction, torch.Tensor):
            out["direction"] = f"<tensor {tuple(self.direction.shape)}>"
        elif isinstance(self.direction, Path):
            out["direction"] = str(self.direction)
        out["schedule"] = dataclasses.asdict(self.schedule) if self.schedule else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Intervention:
        if isinstance(data, Intervention):
            return data
        if not isinstance(data, dict):
            raise SpecError(f"An intervention spec must be a mapping, got {type(data).__name__}: {data!r}.")
        return from_dict(cls, data, "intervention", error=SpecError)

    # --- resolution --------------------------------------------------------------------------------
    def directions_by_layer(self, layers: list[int], d_model: int | None = None) -> dict[int, Direction]:
        """The Direction to use at each target layer, selected components applied."""
        candidates = self._load_candidates(d_model)
        by_layer = {d.layer: d for d in candidates}
        out = {}
        for layer in layers:
            if self.direction_layer is not None:
                key = self.direction_layer
                if key not in by_layer:
                    raise SpecError(
                        f"direction_layer={key} not in the direction file (layers {sorted(by_layer, key=str)})."
                    )
                d = by_layer[key]
            elif layer in by_layer:
                d = by_layer[layer]
            elif len(candidates) == 1 and candidates[0].layer is None:
                d = candidates[0]
            else:
                raise SpecError(
                    f"Intervention {self.name!r} targets layer {layer}, but its direction was made for layer(s) "
                    f"{sorted(by_layer, key=str)}. Set `layers` to match, or set `direction_layer` to apply one "
                    "direction at other layers on purpose."
                )
            out[layer] = d.select(self.components) if self.components is not None else d
        return out

    def default_layers(self, d_model: int | None = None) -> list[int]:
        layers = sorted(d.layer for d in self._load_candidates(d_model) if d.layer is not None)
        if not layers:
            raise SpecError(
                f"Intervention {self.name!r} has no `layers` and its direction records no layer; set `layers`."
            )
        return layers

    def _load_candidates(self, d_model: int | None = None) -> list[Direction]:
        """Load once per spec (a W&B artifact is downloaded once, a file read once)."""
        cache = self.__dict__.setdefault("_loaded", {})
        if d_model not in cache:
            cache[d_model] = self._load_candidates_uncached(d_model)
        return cache[d_model]

    def _load_candidates_uncached(self, d_model: int | None) -> list[Direction]:
        d = self.direction
        if isinstance(d, str) and d.startswith("random:"):
            return [_random_from_string(d, d_model)]
        if isinstance(d, str) and d.startswith(WANDB_PREFIX):
            d = fetch_direction_artifact(d[len(WANDB_PREFIX) :])
        if isinstance(d, Direction):
            return [d]
        if isinstance(d, torch.Tensor):
            return [Direction(vectors=d, method="tensor")]
        if isinstance(d, (str, Path)):
            try:
                return load_directions(d)
            except (FileNotFoundError, DirectionError) as err:
                raise SpecError(f"Intervention {self.name!r}: cannot load direction {d!r}: {err}") from None
        raise SpecError(f"`direction` must be a path, a Direction or a tensor; got {type(d).__name__}.")


def _random_from_string(text: str, d_model: int | None) -> Direction:
    """``random:SEED`` or ``random:SEED:K``: K orthonormal random rows (a control, or a smoke-test recipe)."""
    parts = text.split(":")[1:]
    try:
        seed, k = int(parts[0]), int(parts[1]) if len(parts) > 1 else 1
    except (ValueError, IndexError):
        raise SpecError(f"Cannot read {text!r}: write random:SEED or random:SEED:K (integers).") from None
    if d_model is None:
        raise SpecError(f"{text!r} needs the model's hidden size; resolve it through an InterventionSet.")
    return random_direction(d_model, k=k, seed=seed)


def check_unique_names(specs: list[Intervention]) -> None:
    names = [i.name for i in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(
            f"Intervention names must be unique; {duplicates} appear more than once (two interventions with "
            "the same operator and site get the same default name): set `name` on each."
        )


def _check_value(value, name: str) -> None:
    try:
        values = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise SpecError(
            f"Intervention {name!r}: value must be a number or a list of numbers, got {value!r}."
        ) from None
    if values.dim() > 1 or not torch.isfinite(values).all():
        raise SpecError(
            f"Intervention {name!r}: value must be finite numbers (a scalar or a list), got {value!r}."
        )


def parse_interventions(value, what: str = "interventions") -> list[Intervention]:
    """Interventions from a list of specs or mappings, or a string: a YAML/JSON list, or the path of a
    YAML file holding one (or a mapping with key ``interventions``). ``None`` means none."""
    if value is None:
        return []
    what, value = read_config_value(value, what, key="interventions", error=SpecError)
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise SpecError(f"{what} must be a list of interventions, got {type(value).__name__}: {value!r}.")
    specs = [Intervention.from_dict(i) for i in value]
    check_unique_names(specs)
    return specs


def prepare_direction(
    spec: Intervention, direction: Direction
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(vectors, mean, value) in the form the operator declares it needs: orthonormal rows for a basis
    (a single row normalised, its mean scaled with it). The hook runtime and weight baking both use it."""
    needs = spec.op.needs
    value = None
    if VALUE in needs or spec.value is not None:
        value = torch.as_tensor(spec.value, dtype=torch.float32)
        if value.numel() not in (1, direction.k):
            raise SpecError(
                f"Intervention {spec.name!r}: value has {value.numel()} entries; give one or k={direction.k}."
            )
    if BASIS not in needs:
        return direction.vectors, None, value
    mean = direction.mean
    if direction.k == 1:
        norm = direction.vectors.norm()
        vectors = direction.vectors / norm
        mean = None if mean is None else mean / norm
    elif direction.is_orthonormal():
        vectors = direction.vectors
    else:
        if mean is not None and MEAN in needs:
            raise SpecError(
                f"Intervention {spec.name!r}: {spec.operator} needs an orthonormal direction with its mean "
                "computed on that basis; orthonormalize first (Direction.orthonormalized()) and recompute the mean."
            )
        vectors = direction.orthonormalized().vectors
    if MEAN in needs and mean is None:
        raise SpecError(
            f"Intervention {spec.name!r}: {spec.operator} needs the direction's reference mean projection "
            "(Direction.mean); extract it with a reference mean, or use project_out / clamp."
        )
    return vectors, mean, value
