"""What every keel trainer adds to its TRL parent: an InterventionSet switched on around the right passes.

Only public seams are overridden (``train``, ``training_step``, ``prediction_step``, ``evaluate``,
``log``, and ``compute_loss`` for the regularisers of :mod:`trainers.regularisers`). Hooks are registered
once per ``train()``/``evaluate()`` call and switched by phase; the token masks come from the batch
(``labels != -100`` is the completion), never from tensor indices. A projection monitor
(``projection_monitor``, see :mod:`trainers.monitoring`) runs from a callback after optimizer steps and
logs through ``log``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from interventions import Intervention, InterventionSet
from interventions.reference import (
    REFERENCE_KEYS,
    ReferenceKeyCollator,
    ReferenceKeyError,
    ReferenceSource,
    example_key,
    frozen_copy,
    is_peft_model,
)
from interventions.tracking import (
    intervention_tags,
    record_direction_lineage,
    start_run,
    use_direction_files,
    write_run_record,
)

from .console import use_readable_console
from .distributed import check_distributed_setup
from .monitoring import ProjectionMonitor, examples_from_dataset, parse_projection_monitor, tokenize_rows
from .passes import PassRouter
from .regularisers import RegulariserSet

logger = logging.getLogger(__name__)


class DirectionLineageCallback(TrainerCallback):
    """Once the W&B run exists (``WandbCallback`` starts it at train begin), record which direction
    artifacts this run used, so W&B lineage links directions to fine-tunes."""

    def __init__(self, refs: list[str]):
        self.refs = refs

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and "wandb" in (args.report_to or []):
            record_direction_lineage(self.refs)


class ReferenceStateCallback(TrainerCallback):
    """Saves the reference source's state (resample_ablate's generator) into every checkpoint folder, so
    ``train(resume_from_checkpoint=...)`` continues with the same row shifts as an uninterrupted run."""

    def __init__(self, source: ReferenceSource):
        self.source = source

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                self.source.save(folder)


class ProjectionMonitorCallback(TrainerCallback):
    """Runs the trainer's projection monitor at train begin (step 0, or the step a resumed run starts at, when
    due) and after every optimizer step it is due (multiples of ``every`` and the last step)."""

    def __init__(self, trainer: InterventionTrainerMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._monitor_train_begin()

    def on_step_end(self, args, state, control, **kwargs):
        monitor = self.trainer.projection_monitor
        if monitor is not None and monitor.due(state.global_step, state.max_steps):
            # DefaultFlowCallback (first in the list) has decided whether this step logs: merge into that
            # entry, or log the measurement as an entry of its own at this step.
            self.trainer._monitor_measure(log_now=not control.should_log)


def check_datasets(**datasets) -> None:
    """An empty dataset would surface deep inside TRL as a bare StopIteration: name it here instead."""
    for name, dataset in datasets.items():
        if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError(f"{name} is empty (0 rows): give it examples, or leave it out.")


class InterventionTrainerMixin:
    """Mix into a TRL trainer before the trainer class: ``class X(InterventionTrainerMixin, SFTTrainer)``."""

    intervention_set: InterventionSet
    # DPO/GRPO: switches the set to each pass's phase (reference, generate; trainers.passes). None for SFT.
    intervention_passes: PassRouter | None = None
    projection_monitor: ProjectionMonitor | None = None
    _monitor_pending: dict[str, float] | None = None
    # Whether this trainer's training batches are the model's own inputs, one row per dataset example (SFT),
    # so that a precomputed reference can be keyed by example (intervention_reference='precomputed').
    precomputed_reference_supported: bool = False
    # 'live' or 'precomputed': how reference_ablate / resample_ablate get the starting model's values
    reference_mode: str = "live"
    _reference_precompute_pending: bool = False

    def _init_interventions(self, interventions, reference_model=None, projection_monitor=None) -> None:
        specs = interventions if interventions is not None else getattr(self.args, "interventions", None)
        layers_path = getattr(self.args, "intervention_layers_path", None)
        self.intervention_set = InterventionSet(self.model, specs or [], layers_path=layers_path)
        self.intervention_reference: ReferenceSource | None = None
        self.regularisers = RegulariserSet.from_args(self.args, self.model, layers_path)
        if self.intervention_set.needs_reference or (self.regularisers and self.regularisers.needs_reference):
            self.reference_mode = self._reference_mode(reference_model, projection_monitor)
            if self.reference_mode == "precomputed":
                self.intervention_reference = ReferenceSource.for_precompute(
                    self.model, reference_model, seed=self.args.seed, layers_path=layers_path
                )
                self.data_collator = ReferenceKeyCollator(self.data_collator)
                self._reference_precompute_pending = True
            else:
                self.intervention_reference = ReferenceSource.for_model(
                    self.model, reference_model, seed=self.args.seed, layers_path=layers_path
                )
            self.add_callback(ReferenceStateCallback(self.intervention_reference))
        if self.regularisers is not None:
            self.regularisers.bind(self, self.intervention_reference)
        refs = [i.wandb_artifact for i in self.intervention_set.interventions if i.wandb_artifact]
        if refs:
            self.add_callback(DirectionLineageCallback(refs))
        self._init_projection_monitor(projection_monitor)
        use_readable_console(self)

    # --- precomputed reference (intervention_reference='precomputed') --------------------------------
    def _reference_mode(self, reference_model, projection_monitor) -> str:
        """'precomputed' when asked for and every training batch can find its rows; else 'live', with a
        warning that says why when precomputed was asked for."""
        if getattr(self.args, "intervention_reference", "live") != "precomputed":
            return "live"
        reasons = []
        if not self.precomputed_reference_supported:
            reasons.append(
                f"{type(self).__name__}'s batches are not one model input per dataset example (DPO pairs, "
                "GRPO's generated completions)"
            )
        if self.regularisers is not None and self.regularisers.needs_reference:
            reasons.append(
                "a regulariser (kl, ldifs, blocking) runs the reference forward on every batch anyway"
            )
        if any(getattr(o, "padding_free", False) for o in (self.args, self, self.data_collator)):
            reasons.append(
                "padding-free batches (padding_free, or packing with the bfd strategies) flatten several "
                "examples into one row"
            )
        dataset = self.train_dataset
        if (
            dataset is None
            or not hasattr(dataset, "__len__")
            or isinstance(dataset, torch.utils.data.IterableDataset)
        ):
            reasons.append(
                "the training dataset has no length (an iterable dataset): no pass over it before training"
            )
        elif len(dataset) and "input_ids" not in dataset[0]:
            reasons.append("the training dataset's rows have no input_ids to key them by")
        monitor = (
            projection_monitor
            if projection_monitor is not None
            else getattr(self.args, "projection_monitor", None)
        )
        if monitor is not None and reference_model is None and not is_peft_model(self.model):
            reasons.append(
                "the projection monitor runs the reference operators on its own examples, which needs the live "
                "reference model"
            )
        if not reasons:
            return "precomputed"
        message = (
            "intervention_reference='precomputed' falls back to the live reference (a reference forward per "
            f"batch; same values): {'; '.join(reasons)}."
        )
        logger.warning(message)
        warnings.warn(message, stacklevel=3)
        return "live"

    def precompute_reference(self) -> float | None:
        """Run the precomputed reference's one-off pass now (``train()`` runs it when it has not run yet);
        returns its seconds, or None when there is nothing to precompute (live reference, or done already)."""
        if not self._reference_precompute_pending:
            return None
        self._precompute_reference()
        return self.intervention_reference.precompute_seconds

    def _precompute_reference(self) -> None:
        """The one-off pass: the starting model over the first epoch's training batches (same order, padding and
        composition as training will see them, so the values equal the live pass's bit for bit), then over any
        example that epoch leaves out (other processes' shards, a dropped last batch) and the evaluation data
        when an intervention reads the reference in ``eval``. Batches that cannot be keyed: back to live."""
        source = self.intervention_reference
        start = time.perf_counter()
        pad = self._monitor_pad_id()
        try:
            # the sampler's draws (and anything random) must not move the RNG training starts from
            with torch.random.fork_rng(devices=[]):
                loader = self.get_train_dataloader()
                for sampler in (
                    loader,
                    getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None),
                ):
                    if hasattr(sampler, "set_epoch"):
                        sampler.set_epoch(0)  # what train() sets for the first epoch
                extend_to = self._longest_train_row() if self._reads_padding() else None
                # training runs the model accelerate prepares under its mixed-precision autocast: so does the live
                # pass of a PEFT policy with adapters off (a frozen copy or a model of your own is not prepared)
                autocast = None
                if source.model is self.model and not source.starting_model and self.accelerator.native_amp:
                    autocast = self.accelerator.autocast
                settings = dict(pad_token_id=pad, extend_to=extend_to, autocast=autocast)
                source.precompute(self.intervention_set, loader, **settings)
                source.precompute(self.intervention_set, self._unseen_train_batches(), **settings)
                if any("eval" in op.spec.phases for op in self.intervention_set.reference_ops()):
                    for dataset in self._eval_datasets():
                        source.precompute(
                            self.intervention_set, self.get_eval_dataloader(dataset), autocast=autocast
                        )
        except ReferenceKeyError as err:
            message = f"intervention_reference='precomputed' falls back to the live reference: the batches hold {err}."
            logger.warning(message)
            warnings.warn(message, stacklevel=3)
            source.table = None
            self.reference_mode = "live"
            if source.starting_model:  # the frozen copy the live path reads
                source.model, source.starting_model = frozen_copy(self.model), False
        source.precompute_seconds = time.perf_counter() - start
        source.release()
        self._reference_precompute_pending = False
        if source.table is not None:
            logger.info(
                "Precomputed reference: %d examples, %.1f MB, %d forwards in %.2fs",
                len(source.table),
                source.table.nbytes / 2**20,
                source.precompute_passes,
                source.precompute_seconds,
            )

    def _reads_padding(self) -> bool:
        """resample_ablate reads another row's values, at that row's padding positions too."""
        return any(op.spec.op.resample for op in self.intervention_set.reference_ops())

    def _longest_train_row(self) -> int:
        longest = max(len(ids) for ids in self.train_dataset["input_ids"]) if len(self.train_dataset) else 0
        multiple = getattr(self.data_collator, "pad_to_multiple_of", None)
        if multiple:
            longest = -(-longest // multiple) * multiple
        return longest

    def _unseen_train_batches(self):
        """Batches (the trainer's batch size and collator) of the training examples not in the table yet."""
        table, dataset = self.intervention_reference.table, self.train_dataset
        unseen = [i for i in range(len(dataset)) if example_key(dataset[i]) not in table]
        if not unseen:
            return []
        return torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, unseen),
            batch_size=self.args.per_device_train_batch_size,
            collate_fn=self.data_collator,
        )

    def _eval_datasets(self) -> list:
        if self.eval_dataset is None:
            return []
        if isinstance(self.eval_dataset, dict):
            return list(self.eval_dataset)  # get_eval_dataloader takes the name
        return [self.eval_dataset]

    # --- projection monitoring ---------------------------------------------------------------------
    def _init_projection_monitor(self, monitor) -> None:
        """``monitor`` (a ProjectionMonitor, config or mapping) overrides ``args.projection_monitor``."""
        if monitor is None:
            monitor = getattr(self.args, "projection_monitor", None)
        if monitor is None:
            self.projection_monitor = None
            return
        if not isinstance(monitor, ProjectionMonitor):
            monitor = ProjectionMonitor.from_config(parse_projection_monitor(monitor))
        layers_path = getattr(self.args, "intervention_layers_path", None)
        monitor.bind(self.model, layers_path)  # a bad direction fails here, before training starts
        if monitor.batches is None:
            monitor.set_examples(self._monitor_examples(monitor), pad_token_id=self._monitor_pad_id())
        self.projection_monitor = monitor
        self.add_callback(ProjectionMonitorCallback(self))

    def _monitor_examples(self, monitor: ProjectionMonitor) -> list[dict]:
        rows = monitor.load_rows()
        args = self.args
        if rows is not None:
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            if tokenizer is None:
                raise ValueError(
                    "projection_monitor.data needs the trainer's processing_class to tokenize it."
                )
            return tokenize_rows(
                rows,
                tokenizer,
                chat_template=getattr(self, "chat_template", None),
                assistant_only_loss=bool(getattr(args, "assistant_only_loss", False)),
                # the setting as given (None: prompt rows are prompt-completion data, as TRL would treat
                # them), not the trainer's, which TRL resolves from the train dataset's format
                completion_only_loss=getattr(args, "completion_only_loss", None),
                max_length=getattr(args, "max_length", None),
                truncation_mode=getattr(args, "truncation_mode", "keep_start"),
                where=monitor.config.data or "projection_monitor rows",
            )
        dataset = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()))
        if dataset is None:
            raise ValueError(
                "projection_monitor has no data and the trainer no dataset: set projection_monitor.data."
            )
        return examples_from_dataset(dataset, monitor.config.max_examples)

    def _monitor_pad_id(self) -> int:
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        for pad in (
            getattr(self.data_collator, "pad_token_id", None),
            getattr(tokenizer, "pad_token_id", None),
        ):
            if isinstance(pad, int):
                return pad
        return 0  # padding is masked out: any id will do

    def _monitor_path(self) -> Path:
        return Path(self.args.output_dir) / ProjectionMonitor.FILE_NAME

    def _monitor_train_begin(self) -> None:
        self._monitor_pending = None
        if self.projection_monitor is None:
            return
        step = self.state.global_step
        if self.is_world_process_zero():
            self.projection_monitor.truncate_log(self._monitor_path(), before_step=step)
        if self.projection_monitor.due(step, self.state.max_steps):
            self._monitor_measure(log_now=True)

    def _monitor_measure(self, log_now: bool) -> None:
        """Measure at the current step (every process measures the whole monitor set: same weights and data,
        same numbers, no collective to match), write the curve file on the main process, and log."""
        monitor, step = self.projection_monitor, self.state.global_step
        values = monitor.measure(
            self.model, self.intervention_set, step, reference=self.intervention_reference
        )
        if self.is_world_process_zero():
            monitor.append_log(self._monitor_path(), step, values, epoch=self.state.epoch)
        metrics = {f"{monitor.PREFIX}{key}": value for key, value in values.items()}
        if self._monitor_pending:  # never flushed (should not happen): do not lose it
            Trainer.log(self, self._monitor_pending)
        self._monitor_pending = None
        if log_now:
            # An entry of its own at this step, through Trainer.log (not the subclasses' log, which would
            # drain the training metrics they average between logging steps).
            Trainer.log(self, metrics)
        else:
            self._monitor_pending = metrics

    @property
    def interventions(self) -> list[Intervention]:
        return self.intervention_set.interventions

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        check_distributed_setup(
            self
        )  # FSDP/DeepSpeed asked for but accelerate runs DDP: raise (distributed.py)
        if resume_from_checkpoint and self.intervention_reference is not None:
            folder = resume_from_checkpoint
            if folder is True:
                folder = get_last_checkpoint(self.args.output_dir)
            if folder and not self.intervention_reference.load(folder):
                warnings.warn(
                    f"{folder} holds no {ReferenceSource.STATE_FILE} (saved by an older keel?): resample_ablate "
                    "continues with fresh row shifts, so the resumed run will not equal an uninterrupted one.",
                    stacklevel=2,
                )
        self.precompute_reference()
        self._start_wandb_run()
        with self.intervention_set, self._passes(), self._regularising():
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def _start_wandb_run(self) -> None:
        """keel's W&B conventions (interventions.tracking) for the run TRL's WandbCallback then reuses:
        project, group, job_type train, tags, a readable name, direction files as artifacts, and the run's
        identity in ``output_dir/wandb_run.json`` for the evaluation that follows."""
        args = self.args
        if "wandb" not in (args.report_to or []) or not self.is_world_process_zero():
            return
        specs = self.intervention_set.interventions
        run = start_run(
            args.output_dir,
            "train",
            config=args.to_dict(),
            name=args.run_name
            if args.run_name not in (None, args.output_dir)
            else Path(args.output_dir).name,
            project=getattr(args, "wandb_project", None),
            group=getattr(args, "wandb_group", None),
            tags=[*intervention_tags(specs), *(getattr(args, "wandb_tags", None) or [])],
        )
        paths = sorted(
            {str(s.direction_path) for s in specs if s.direction_path and s.direction_path.is_file()}
        )
        use_direction_files(run, paths)
        write_run_record(args.output_dir, run)

    def evaluate(self, *args, **kwargs):
        with self.intervention_set, self._passes():
            return super().evaluate(*args, **kwargs)

    def _passes(self):
        return self.intervention_passes if self.intervention_passes is not None else contextlib.nullcontext()

    def _set_batch(self, inputs) -> None:
        self.intervention_set.set_batch(
            attention_mask=inputs.get("attention_mask"),
            labels=inputs.get("labels"),
            completion_mask=inputs.get("completion_mask"),
        )

    def _set_reference(self, inputs, phase: str, keys=None) -> None:
        """For reference_ablate / resample_ablate: the reference's pass over this batch, before the policy's
        (or, with a precomputed reference, the batch's rows of the table: ``keys``)."""
        if self.regularisers is not None and phase == "train":  # one pass serves both
            self.regularisers.reference_pass(self.intervention_set, phase, inputs)
        elif self.intervention_reference is not None:
            self.intervention_reference.capture(self.intervention_set, phase, keys=keys, **inputs)

    @staticmethod
    def _pop_keys(inputs):
        """The batch without the rows' reference keys (ReferenceKeyCollator's entry), and the keys."""
        if isinstance(inputs, Mapping) and REFERENCE_KEYS in inputs:
            inputs = dict(inputs)
            return inputs, inputs.pop(REFERENCE_KEYS)
        return inputs, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The backward (and gradient checkpointing's recompute) runs inside this call, so the hooks'
        # phase, masks and reference activations cover forward and backward alike. GRPO's inputs are prompts
        # (generation runs inside the step): its passes set their own masks (trainers.passes).
        inputs, keys = self._pop_keys(inputs)
        if isinstance(inputs, Mapping):
            self._set_batch(inputs)
            self._set_reference(inputs, "train", keys)
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
        inputs, keys = self._pop_keys(inputs)
        if isinstance(inputs, Mapping):
            self._set_batch(inputs)
            self._set_reference(inputs, "eval", keys)
        with self.intervention_set.phase("eval"):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._monitor_pending and self.model.training:
            logs.update(self._monitor_pending)  # measured at this step, just before this log
            self._monitor_pending = None
        prefix = "interventions/" if self.model.training else "eval_interventions/"
        # Under DDP every process measured its own shard: sum the raw sums so the logged means cover the
        # global batch (log runs on every process at the same step).
        acc = self.accelerator
        logs.update(
            self.intervention_set.pop_metrics(
                prefix=prefix,
                sum_over_processes=lambda t: acc.reduce(t.to(acc.device), reduction="sum").cpu(),
                processes=acc.num_processes,
            )
        )
        for op in self.intervention_set.ops:
            if op.spec.schedule is not None and self.model.training:
                logs[f"{prefix}{op.spec.name}/L{op.layer}/coefficient"] = op.coefficient
        if self.regularisers is not None and self.model.training:
            logs.update(
                self.regularisers.pop_metrics(
                    sum_over_processes=lambda t: acc.reduce(t.to(acc.device), reduction="sum").cpu(),
                    processes=acc.num_processes,
                )
            )
        super().log(logs, start_time)

    # --- regularisers: extra loss terms beside the task loss (trainers/regularisers.py) ---------------
    regularisers: RegulariserSet | None = None

    def _regularising(self):
        """Registers the regularisers' read-only hooks for a ``train()`` (after the interventions' own, so
        they read what the next layer sees)."""
        return self.regularisers if self.regularisers is not None else contextlib.nullcontext()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The task loss is the parent trainer's; in training the regularisers add their weighted terms (the
        # policy's activations recorded during that very forward).
        if self.regularisers is None or not self.model.training:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        parent = super().compute_loss
        return self.regularisers.compute_loss(self, parent, model, inputs, return_outputs, num_items_in_batch)
