"""Direction extraction: one template (batching, padding masks, hooks, pooling, progress) and the methods.

Layer convention as in :mod:`interventions.sites`: ``resid_post`` layer ``i`` is the output of decoder
layer ``i`` (``hidden_states[i + 1]``).
"""

from ..tracking import log_direction_artifact
from .core import (
    POOLINGS,
    ActivationExtractor,
    Batch,
    ExtractionError,
    PooledCollector,
    RunningMean,
    View,
    collect_pooled,
    pad_batch,
    peft_views,
    pool,
)
from .data import (
    POSITIONS,
    chat_example,
    contrastive_examples,
    generate_contrastive_answers,
    read_jsonl,
    record_examples,
    split_record,
    text_example,
)
from .methods import (
    FinetuneDiffPCA,
    MeanDifference,
    MeanProjection,
    Reservoir,
    contrastive_directions,
    finetune_difference,
    judged_directions,
    mean_difference,
    model_views,
    random_direction,
    with_reference_mean,
)
from .sae import SAE, SAELatentRanking, sae_latents

__all__ = [
    "POOLINGS",
    "POSITIONS",
    "SAE",
    "ActivationExtractor",
    "Batch",
    "ExtractionError",
    "FinetuneDiffPCA",
    "MeanDifference",
    "MeanProjection",
    "PooledCollector",
    "Reservoir",
    "RunningMean",
    "SAELatentRanking",
    "View",
    "chat_example",
    "collect_pooled",
    "contrastive_directions",
    "contrastive_examples",
    "generate_contrastive_answers",
    "finetune_difference",
    "judged_directions",
    "log_direction_artifact",
    "mean_difference",
    "model_views",
    "pad_batch",
    "peft_views",
    "pool",
    "random_direction",
    "read_jsonl",
    "record_examples",
    "sae_latents",
    "split_record",
    "text_example",
    "with_reference_mean",
]
