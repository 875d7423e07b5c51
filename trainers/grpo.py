"""InterventionGRPOTrainer: TRL's GRPOTrainer with interventions in training, reference and sampling passes.

One GRPO step samples completions from the policy (phase ``generate``), scores them (the policy without
gradients when TRL needs old log-probs, phase ``train``; the reference when ``beta > 0``, phase
``reference``: the same modules with the adapter off under PEFT, a separate frozen model otherwise) and
then runs the policy's loss forward (phase ``train``). Each intervention acts in the passes its phases
name (:mod:`trainers.passes`): give ``phases: [train, generate]`` for the policy that samples to be the
policy that is optimised; by default (``[train]``) samples come from the model without interventions.

vLLM samples outside the hooked model: with ``use_vllm=True`` every intervention that acts in ``train``
or ``generate`` is refused (:func:`check_vllm_interventions`); bake static ablations into the weights
(``keel bake``) and train the baked model instead.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn
from trl import GRPOConfig, GRPOTrainer

from interventions import Intervention, parse_interventions, unwrap_model
from interventions.bake import BakeError, baked_record, check_bakeable
from interventions.reference import is_peft_model
from interventions.serialization import KeelInputError

from .config import InterventionArguments
from .mixin import InterventionTrainerMixin, check_datasets
from .passes import PassRouter

HOOK_PHASES_REFUSED_WITH_VLLM = ("train", "generate")
GENERATION_SEAM = (
    "_generate_single_turn"  # GRPOTrainer's sampling call (TRL 1.16): prompts in, completions out
)


def check_vllm_interventions(interventions: Sequence[Intervention], use_vllm: bool, model=None) -> None:
    """Refuse hook interventions that would have to act where vLLM samples.

    vLLM generates from its own copy of the weights, outside the hooked model: an intervention in
    ``generate`` cannot act there, and one in ``train`` would make the samples come from another policy
    than the one optimised (TRL's vLLM importance-sampling correction would then treat the intervention as
    sampling noise and clip it away). Interventions only in ``reference``/``eval`` are fine, and so is a
    model with a static ablation baked into its weights (``config.keel_baked``, from ``keel bake``).
    """
    if not use_vllm:
        return
    hooked = [s for s in interventions if set(s.phases) & set(HOOK_PHASES_REFUSED_WITH_VLLM)]
    if not hooked:
        return
    baked = baked_record(model) if model is not None and not isinstance(model, str) else None
    lines = []
    for spec in hooked:
        try:
            check_bakeable(spec)
            fix = "bake it into the weights with `keel bake` and train the baked model without it"
        except BakeError as err:
            fix = f"it cannot be baked ({err}), so train it with use_vllm=False"
        lines.append(f"  - {spec.name!r} ({spec.operator}, phases {spec.phases}): {fix}")
    note = (
        f" This model already has {len(baked.get('bakes', []))} baked ablation(s) (config.keel_baked): drop the "
        "hook interventions they replace."
        if baked
        else ""
    )
    raise KeelInputError(
        "use_vllm=True samples with vLLM, outside the hooked model, so hook interventions that act in "
        "'train' or 'generate' would make the samples come from another policy than the one optimised:\n"
        + "\n".join(lines)
        + f"\nOr set use_vllm=False (keel then samples with the hooked model).{note}"
    )


@dataclass
class InterventionGRPOConfig(InterventionArguments, GRPOConfig):
    """``GRPOConfig`` plus keel's settings (:class:`trainers.config.InterventionArguments`); refuses
    ``use_vllm`` with hook interventions in ``train``/``generate`` (:func:`check_vllm_interventions`)."""

    def __post_init__(self):
        super().__post_init__()
        check_vllm_interventions(self.interventions, self.use_vllm)


@contextlib.contextmanager
def loadable_reference(model, ref_model, args, peft_config) -> Iterator[None]:
    """GRPOTrainer builds its reference (``beta > 0``, full fine-tuning) with ``from_pretrained`` on the
    model's ``config._name_or_path``: a model made in memory has none, and a hub name would load the hub's
    weights, not the model passed in. Save the reference (``ref_model``, else the model as passed in) to a
    temporary folder and point the name there while TRL loads it."""
    needs = (
        getattr(args, "beta", 0.0) != 0.0
        and isinstance(model, nn.Module)
        and not is_peft_model(model)
        and peft_config is None
    )
    if not needs:
        if ref_model is not None:
            raise ValueError(
                "ref_model is used only for full fine-tuning with beta > 0 (GRPO's default beta is 0: no "
                "reference; with PEFT the reference is the model with its adapter off)."
            )
        yield
        return
    config = model.config
    original = getattr(config, "_name_or_path", "")
    with tempfile.TemporaryDirectory(prefix="keel-grpo-reference-") as folder:
        unwrap_model(ref_model if ref_model is not None else model).save_pretrained(folder)
        config._name_or_path = folder
        try:
            yield
        finally:
            config._name_or_path = original


class InterventionGRPOTrainer(InterventionTrainerMixin, GRPOTrainer):
    """GRPO with an :class:`interventions.InterventionSet` in the passes each intervention's phases name:
    ``train`` (scoring and loss forwards of the policy), ``reference`` (beta > 0), ``generate`` (sampling,
    one hook call for the prefill and one per generated token).

    ``ref_model``: the reference for ``beta > 0`` with full fine-tuning (default: the model as passed in;
    TRL would reload it by name). ``interventions``, ``intervention_reference_model`` and
    ``projection_monitor``: as in :class:`trainers.InterventionSFTTrainer`.
    """

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: InterventionGRPOConfig | None = None,
        *pargs,
        ref_model=None,
        interventions=None,
        intervention_reference_model=None,
        projection_monitor=None,
        **kwargs,
    ):
        if not callable(getattr(GRPOTrainer, GENERATION_SEAM, None)):
            raise RuntimeError(
                f"keel's GRPO trainer switches interventions to phase 'generate' around GRPOTrainer."
                f"{GENERATION_SEAM}, which this TRL does not have: install trl>=1.16,<1.17 (pyproject.toml)."
            )
        check_datasets(train_dataset=kwargs.get("train_dataset"), eval_dataset=kwargs.get("eval_dataset"))
        specs = parse_interventions(
            interventions if interventions is not None else getattr(args, "interventions", None)
        )
        check_vllm_interventions(specs, bool(getattr(args, "use_vllm", False)), model)
        with loadable_reference(model, ref_model, args, kwargs.get("peft_config")):
            super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        self._init_interventions(interventions, intervention_reference_model, projection_monitor)
        self.intervention_passes = PassRouter(
            self.intervention_set,
            self.model,
            ref_model=self.ref_model,
            reference_source=self.intervention_reference,
            capture_per_call=True,
        )

    def _generate_single_turn(self, *args, **kwargs):
        # TRL has no public generation seam: this private method is the one call that samples (HF generate,
        # continuous batching or vLLM), checked to exist at __init__.
        with self.intervention_passes.generating(self.model):
            return super()._generate_single_turn(*args, **kwargs)
