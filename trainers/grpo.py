"""InterventionGRPOTrainer: TRL's GRPOTrainer with interventions in training, reference and sampling passes.

One GRPO step samples completions from the policy (phase ``generate``), scores them (the policy without
gradients when TRL needs old log-probs, phase ``train``; the reference when ``beta > 0``, phase
``reference``: the same modules with the adapter off under PEFT, a separate frozen model otherwise) and
then runs the policy's loss forward (phase ``train``). Each intervention acts in the passes its phases
name (:mod:`trainers.passes`): give ``phases: [train, generate]`` for the policy that samples to be the
policy that is optimised; by default (``[train]``) samples come from the model without interventions.

vLLM samples outside the hooked model: with ``use_vllm=True`` an intervention that acts in ``train`` or
``generate`` is refused unless the model's weights already hold it (baked with ``keel bake``, the hooks
changing nothing on the baked model; :func:`check_vllm_interventions`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig
from trl import GRPOConfig, GRPOTrainer

from interventions import Intervention, InterventionSet, parse_interventions, unwrap_model
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


def check_vllm_interventions(
    interventions: Sequence[Intervention], use_vllm: bool, model=None, layers_path: str | None = None
) -> None:
    """Refuse hook interventions that would have to act where vLLM samples (raises KeelInputError).

    vLLM generates from its own copy of the weights, outside the hooked model: an intervention in
    ``generate`` cannot act there, and one in ``train`` would make the samples come from another policy than
    the one optimised (TRL's vLLM importance-sampling correction would treat the difference as sampling noise
    and clip it away). Interventions only in ``reference``/``eval`` are fine. Hooks in ``train``/``generate``
    are accepted on a model whose weights already hold them: baked with ``keel bake`` (``config.keel_baked``)
    and the hooks changing nothing on it, as the hooks ``interventions.bake.equivalent_interventions``
    returns for that bake do. Without ``model`` (config time) only what can never be baked is refused.
    """
    if not use_vllm:
        return
    hooked = [s for s in interventions if set(s.phases) & set(HOOK_PHASES_REFUSED_WITH_VLLM)]
    if not hooked:
        return
    problems = []
    for spec in hooked:
        try:
            # alone a resid_pre hook is not a bake, but with attn_out/mlp_out hooks it is a stream bake's
            # equivalent: judge the rest of it here, and the whole against the model below
            check_bakeable(spec if spec.site != "resid_pre" else dataclasses.replace(spec, site="attn_out"))
        except BakeError as err:
            problems.append(f"  - {_describe(spec)} cannot be baked ({err})")
    if problems:
        _refuse(problems, "train these with use_vllm=False")
    if model is None:
        return  # bakeable: whether the model holds them is checked when the trainer has it
    baked = baked_record(model) if isinstance(model, nn.Module) else _baked_record_of_path(model)
    if not baked:
        _refuse(
            [f"  - {_describe(spec)}" for spec in hooked],
            "bake them into the weights first (keel bake --model M --direction D --output_dir baked), train "
            "the baked model, and keep as hooks only those interventions.bake.equivalent_interventions "
            "returns for that bake (they change nothing on the baked weights and keep the loss forward "
            "equal to what vLLM samples from); or train with use_vllm=False",
        )
    if isinstance(model, nn.Module) and not _hooks_change_nothing(model, hooked, layers_path):
        _refuse(
            [f"  - {_describe(spec)}" for spec in hooked],
            f"they change the logits of this baked model ({len(baked.get('bakes', []))} bake(s) in "
            "config.keel_baked), so they are not what its weights hold: keep as hooks only what "
            "interventions.bake.equivalent_interventions returns for the bake, or use_vllm=False",
        )


def _describe(spec: Intervention) -> str:
    return f"{spec.name!r} ({spec.operator}, phases {spec.phases})"


def _refuse(lines: list[str], fix: str) -> None:
    raise KeelInputError(
        "use_vllm=True samples with vLLM, outside the hooked model, so hook interventions that act in "
        "'train' or 'generate' would make the samples come from another policy than the one optimised:\n"
        + "\n".join(lines)
        + f"\nFix: {fix}."
    )


def _baked_record_of_path(model) -> dict | None:
    try:
        return baked_record(AutoConfig.from_pretrained(model))
    except (OSError, ValueError):
        return None


@torch.no_grad()
def _hooks_change_nothing(model: nn.Module, specs: Sequence[Intervention], layers_path=None) -> bool:
    """Whether ``specs`` as hooks leave the model's logits unchanged (to float rounding) on random tokens."""
    base = unwrap_model(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    device = next(base.parameters()).device
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    iset = InterventionSet(base, [dataclasses.replace(s, phases=["train"]) for s in specs], layers_path)
    was_training = base.training
    base.eval()
    try:
        off = base(input_ids=ids).logits.float()
        with iset, iset.phase("train"):
            on = base(input_ids=ids).logits.float()
    finally:
        base.train(was_training)
    return bool(torch.allclose(on, off, rtol=1e-3, atol=1e-4 * float(off.abs().max()) + 1e-5))


@dataclass
class InterventionGRPOConfig(InterventionArguments, GRPOConfig):
    """``GRPOConfig`` plus keel's settings (:class:`trainers.config.InterventionArguments`); refuses
    ``use_vllm`` with interventions in ``train``/``generate`` that no bake can hold
    (:func:`check_vllm_interventions`; the others are checked against the model by the trainer)."""

    def __post_init__(self):
        super().__post_init__()
        check_vllm_interventions(self.interventions, self.use_vllm)
        if getattr(self, "use_transformers_continuous_batching", False):
            masked = [s.name for s in self.interventions if "generate" in s.phases and s.tokens != "all"]
            if masked:
                raise KeelInputError(
                    f"Interventions {masked} act on prompt or completion tokens while sampling, and continuous "
                    "batching packs several sequences into one pass, where keel cannot tell them apart: use "
                    "tokens: all for them, or use_transformers_continuous_batching=False."
                )


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
        use_vllm = bool(getattr(args, "use_vllm", False))
        layers_path = getattr(args, "intervention_layers_path", None)
        check_vllm_interventions(specs, use_vllm, model, layers_path)  # before TRL starts vLLM
        with loadable_reference(model, ref_model, args, kwargs.get("peft_config")):
            super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        if isinstance(model, str):  # loaded by TRL: now the hooks can be checked against the weights
            check_vllm_interventions(specs, use_vllm, self.model, layers_path)
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
