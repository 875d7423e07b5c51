"""The mechanism: directions, sites, pure operators, intervention specs and the hook runtime."""

from .direction import (
    Direction,
    DirectionError,
    load_directions,
    load_plain_tensor,
    load_sae_decoder_rows,
    save_directions,
)
from .operators import (
    OPERATORS,
    Operator,
    OperatorInputs,
    add,
    clamp,
    mean_ablate,
    project_out,
    projection,
    reference_ablate,
    register_operator,
)
from .reference import ReferenceSource
from .runtime import InterventionSet, TokenContext
from .sites import (
    SITE_KINDS,
    decoder_layers,
    hidden_size,
    register_architecture,
    register_site_hook,
    registered_model_types,
    resolve_layers,
    site_module,
    unpack_output,
    unwrap_model,
)
from .spec import Intervention, Schedule, SpecError, parse_interventions

__all__ = [
    "Direction",
    "DirectionError",
    "load_directions",
    "load_plain_tensor",
    "load_sae_decoder_rows",
    "save_directions",
    "OPERATORS",
    "Operator",
    "OperatorInputs",
    "register_operator",
    "ReferenceSource",
    "add",
    "clamp",
    "mean_ablate",
    "project_out",
    "projection",
    "reference_ablate",
    "InterventionSet",
    "TokenContext",
    "unpack_output",
    "SITE_KINDS",
    "decoder_layers",
    "hidden_size",
    "register_architecture",
    "register_site_hook",
    "registered_model_types",
    "resolve_layers",
    "site_module",
    "unwrap_model",
    "Intervention",
    "Schedule",
    "SpecError",
    "parse_interventions",
]
