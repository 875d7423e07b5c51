"""Projection monitoring: the persona-vector "fine-tuning shift" as a curve over training.

Every ``every`` optimizer steps (and at the start and the end of training) a :class:`ProjectionMonitor`
runs the model, without gradients and in eval mode, over a fixed monitor set and measures the mean
projection of the activations at configured sites and layers onto configured directions: once with the
trainer's interventions on (phase ``"train"``) and once with them off. The trainer logs the numbers
like any other metric (``monitor/<name>/L<layer>/on``, ``/off``, ``/abs_on``, ``/abs_off``) and appends
each measurement to ``<output_dir>/projection_monitor.jsonl``.

What is measured, exactly: each direction is orthonormalised (one row: scaled to unit norm); at each
monitored token the coordinates ``h @ u`` of the activation ``h`` are taken; ``on``/``off`` is their
token-weighted mean over the whole monitor set (signed) and ``abs_on``/``abs_off`` the mean of
``|h @ u|`` (averaged over the rows of a multi-row direction, as the intervention diagnostics do). A
direction with ``k > 1`` rows logs one signed mean per row (``.../c<j>/on``). Monitored tokens are the
real (attention-masked) tokens, or with ``tokens: last`` each row's last real token (for prompt rows:
the position just before the answer).

The monitor never changes training: no gradients, no random numbers (eval mode, and a reference
source's generator is restored), the model's train/eval flags restored module by module, its hooks
removed in ``finally``, and the intervention set's phase, masks, step, coefficients, reference
activations and diagnostics (``collect_stats`` / its statistics) left as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interventions import (
    Intervention,
    InterventionSet,
    decoder_layers,
    hidden_size,
    register_site_hook,
    resolve_layers,
    unwrap_model,
)
from interventions.operators import projection
from interventions.serialization import KeelInputError, from_dict, read_config_value, read_jsonl

MONITOR_TOKENS = ("all", "last")
WHAT = "projection_monitor"


# ---- configuration ---------------------------------------------------------------------------------


@dataclass
class MonitoredDirection:
    """One monitored direction: ``name`` (used in the logged keys), ``direction`` (a path, ``random:SEED[:K]``,
    ``wandb:...``, a :class:`Direction` or a tensor), ``site`` and ``layers`` (``None``: the direction's own
    layer), and optionally ``direction_layer`` / ``components`` with the meaning they have in interventions."""

    name: str | None = None
    direction: Any = None
    site: str = "resid_post"
    layers: Any = None
    direction_layer: int | None = None
    components: list[int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise KeelInputError(
                f"{WHAT}: every monitored direction needs a `name` (it names the logged keys), got {self.name!r}."
            )
        if "/" in self.name:
            raise KeelInputError(f"{WHAT}: direction name {self.name!r} must not contain '/'.")
        try:
            # The operator is never applied: the spec is how directions, sites and layers are validated and
            # resolved exactly as for interventions (and a direction file is read once).
            self._spec = Intervention(
                "project_out",
                self.direction,
                site=self.site,
                layers=self.layers,
                direction_layer=self.direction_layer,
                components=self.components,
                name=self.name,
            )
        except KeelInputError as err:
            raise KeelInputError(f"{WHAT}: direction {self.name!r}: {err}") from None

    @property
    def spec(self) -> Intervention:
        """The resolution spec (not a dataclass field, so not a recipe key)."""
        return self._spec

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "direction": self._spec.to_dict()["direction"],
            "site": self.site,
            "layers": self.layers,
            "direction_layer": self.direction_layer,
            "components": self.components,
        }


@dataclass
class ProjectionMonitorConfig:
    """The ``projection_monitor`` recipe key.

    ``directions``: a list of mappings (:class:`MonitoredDirection`: name, direction, site, layers).
    ``every``: measure after every ``every`` optimizer steps (and at the start and the last step).
    ``data``: a JSONL file of chat rows (``{"messages": [...]}``), prompt rows (``{"prompt": ...}`` or
    ``{"question": ...}``, optionally with ``completion``/``answer``) or ``{"text": ...}`` rows, tokenized with
    the trainer's tokenizer and chat template; ``None``: the first ``max_examples`` rows of the eval dataset if
    there is one, else of the train dataset, as the trainer tokenized them.
    ``max_examples``: size of the monitor set. ``batch_size``: rows per monitor forward.
    ``tokens``: ``all`` (every real token) or ``last`` (each row's last real token).
    """

    directions: list[Any] = field(default_factory=list)
    every: int = 10
    data: str | None = None
    max_examples: int = 32
    batch_size: int = 8
    tokens: str = "all"

    def __post_init__(self) -> None:
        if not isinstance(self.directions, (list, tuple)) or not self.directions:
            raise KeelInputError(
                f"{WHAT}.directions must be a non-empty list of mappings with keys name, direction, site, "
                f"layers; got {self.directions!r}."
            )
        self.directions = [
            d if isinstance(d, MonitoredDirection) else _direction_entry(d, i)
            for i, d in enumerate(self.directions)
        ]
        names = [d.name for d in self.directions]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise KeelInputError(
                f"{WHAT}: direction names must be unique; {duplicates} appear more than once."
            )
        for key in ("every", "max_examples", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KeelInputError(f"{WHAT}.{key} must be a positive integer, got {value!r}.")
        if self.tokens not in MONITOR_TOKENS:
            raise KeelInputError(
                f"{WHAT}.tokens must be one of {', '.join(MONITOR_TOKENS)}, got {self.tokens!r}."
            )
        if self.data is not None:
            if not isinstance(self.data, (str, Path)):
                raise KeelInputError(f"{WHAT}.data must be the path of a JSONL file, got {self.data!r}.")
            if not Path(self.data).is_file():
                raise KeelInputError(f"{WHAT}.data: {self.data}: no such file.")
            self.data = str(self.data)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["directions"] = [d.to_dict() for d in self.directions]
        return out


def _direction_entry(data, index: int) -> MonitoredDirection:
    return from_dict(MonitoredDirection, data, f"{WHAT}.directions[{index}]")


def parse_projection_monitor(value) -> ProjectionMonitorConfig | None:
    """The config from a mapping, a :class:`ProjectionMonitorConfig`, or a string: an inline YAML/JSON
    mapping or the path of a YAML/JSON file holding one (optionally under the key ``projection_monitor``).
    ``None`` means no monitoring. Unknown keys and bad values fail here, at config time."""
    if value is None or isinstance(value, ProjectionMonitorConfig):
        return value
    if isinstance(value, ProjectionMonitor):
        raise KeelInputError(
            f"{WHAT}: a ProjectionMonitor object goes to the trainer (projection_monitor=...), not into the config; "
            "the config takes a mapping."
        )
    what, value = read_config_value(value, WHAT, key=WHAT, sole_key=True)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise KeelInputError(f"{what}: expected a mapping with keys directions, every, ..., got {value!r}.")
    return from_dict(ProjectionMonitorConfig, value, what)


# ---- monitor data ----------------------------------------------------------------------------------


def _as_list(x) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def examples_from_dataset(dataset, n: int) -> list[dict]:
    """The first ``n`` examples of a tokenized dataset (rows with ``input_ids``, optionally ``labels``);
    packed rows (``seq_lengths``) are split back into their examples, which must not attend to each other."""
    out: list[dict] = []
    for row in dataset:
        if "input_ids" not in row:
            raise KeelInputError(
                f"{WHAT}: the dataset rows have no input_ids (keys {sorted(row)}); give {WHAT}.data, a JSONL file."
            )
        ids = _as_list(row["input_ids"])
        labels = _as_list(row["labels"]) if row.get("labels") is not None else None
        lengths = _as_list(row["seq_lengths"]) if row.get("seq_lengths") is not None else [len(ids)]
        start = 0
        for length in lengths:
            segment = {"input_ids": ids[start : start + length]}
            if labels is not None:
                segment["labels"] = labels[start : start + length]
            start += length
            if segment["input_ids"]:
                out.append(segment)
            if len(out) >= n:
                return out
    return out


def _chat_ids(tokenizer, messages, chat_template, **kwargs) -> dict:
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    out = {k: _as_list(v) for k, v in encoded.items()}
    if out["input_ids"] and isinstance(out["input_ids"][0], list):  # processors add a batch dimension
        out = {k: v[0] for k, v in out.items()}
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tokenize_rows(
    rows: Iterable[dict],
    tokenizer,
    chat_template: str | None = None,
    assistant_only_loss: bool = False,
    completion_only_loss: bool | None = None,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    where: str = f"{WHAT}.data",
) -> list[dict]:
    """Monitor examples (``input_ids`` and ``labels``, -100 outside the completion, as an SFT trainer would
    build them) from chat rows, prompt rows (a string prompt becomes a user message under the chat template,
    with the generation prompt), ``text`` rows, or already tokenized rows (``input_ids``)."""
    has_template = bool(chat_template or getattr(tokenizer, "chat_template", None))
    out = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise KeelInputError(f"{where}: row {i} is not a mapping: {row!r}.")
        try:
            ids, labels = _tokenize_row(
                row, tokenizer, chat_template, has_template, assistant_only_loss, completion_only_loss
            )
        except KeelInputError as err:
            raise KeelInputError(f"{where}: row {i}: {err}") from None
        except (ValueError, TypeError, KeyError) as err:
            raise KeelInputError(f"{where}: row {i} cannot be tokenized: {err}") from None
        if max_length is not None and len(ids) > max_length:
            cut = slice(-max_length, None) if truncation_mode == "keep_end" else slice(None, max_length)
            ids, labels = ids[cut], labels[cut]
        if not ids:
            raise KeelInputError(f"{where}: row {i} tokenizes to no tokens.")
        out.append({"input_ids": ids, "labels": labels})
    return out


def _tokenize_row(row, tokenizer, chat_template, has_template, assistant_only_loss, completion_only_loss):
    if "input_ids" in row:
        ids = _as_list(row["input_ids"])
        return ids, _as_list(row["labels"]) if row.get("labels") is not None else list(ids)
    if "messages" in row:
        encoded = _chat_ids(
            tokenizer, row["messages"], chat_template, return_assistant_tokens_mask=assistant_only_loss
        )
        ids = encoded["input_ids"]
        mask = encoded.get("assistant_masks") if assistant_only_loss else None
        return ids, list(ids) if mask is None else [t if m else -100 for t, m in zip(ids, mask)]
    prompt_key = next((k for k in ("prompt", "question") if k in row), None)
    if prompt_key is None:
        if "text" in row:
            ids = _as_list(tokenizer(row["text"])["input_ids"])
            return ids, list(ids)
        raise KeelInputError(
            f"has none of the keys messages, prompt, question, text, input_ids (keys: {sorted(row)})."
        )
    prompt = row[prompt_key]
    completion = row.get("completion" if prompt_key == "prompt" else "answer")
    if isinstance(prompt, list) or (has_template and isinstance(prompt, str)):
        prompt_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        prompt_ids = _chat_ids(tokenizer, prompt_msgs, chat_template, add_generation_prompt=True)["input_ids"]
        if completion is None:
            ids = prompt_ids
        else:
            completion_msgs = (
                completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            )
            ids = _chat_ids(tokenizer, prompt_msgs + completion_msgs, chat_template)["input_ids"]
    else:
        prompt_ids = _as_list(tokenizer(prompt)["input_ids"])
        ids = prompt_ids if completion is None else _as_list(tokenizer(prompt + completion)["input_ids"])
    if completion_only_loss is False:
        return ids, list(ids)
    n_prompt = _common_prefix(prompt_ids, ids)
    return ids, [-100] * n_prompt + ids[n_prompt:]


def batches_from_examples(examples: Sequence[dict], batch_size: int, pad_token_id: int = 0) -> list[dict]:
    """Right-padded batches: ``input_ids``, ``attention_mask`` and ``completion_mask`` (``labels != -100``;
    every real token when an example has no labels). A last batch of one row joins the one before it
    (``resample_ablate`` needs two rows)."""
    chunks = [list(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2].extend(chunks.pop())
    batches = []
    for chunk in chunks:
        T = max(len(e["input_ids"]) for e in chunk)
        input_ids = torch.full((len(chunk), T), pad_token_id, dtype=torch.long)
        attention = torch.zeros(len(chunk), T, dtype=torch.long)
        completion = torch.zeros(len(chunk), T, dtype=torch.bool)
        for r, e in enumerate(chunk):
            n = len(e["input_ids"])
            input_ids[r, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
            attention[r, :n] = 1
            labels = e.get("labels")
            completion[r, :n] = True if labels is None else torch.tensor(labels) != -100
        batches.append({"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion})
    return batches


# ---- the monitor -----------------------------------------------------------------------------------


@dataclass
class _Target:
    name: str
    site: str
    layer: int
    basis: torch.Tensor  # [k, d], orthonormal

    def key(self) -> str:
        return f"{self.name}/L{self.layer}"


class ProjectionMonitor:
    """Measures the mean projection of a model's activations onto directions, interventions on and off.

    Python API::

        monitor = ProjectionMonitor([{"name": "evil", "direction": "evil.safetensors", "layers": [12]}], every=20)
        trainer = InterventionSFTTrainer(..., projection_monitor=monitor)

    The trainer fills in the monitor set (``data``, or its eval/train dataset) unless ``batches`` are given
    (dicts of ``input_ids``/``attention_mask`` tensors, optionally ``completion_mask``), and binds the
    directions to its model. Standalone: ``monitor.set_examples(...)``, ``monitor.bind(model)``, then
    ``monitor.measure(model, intervention_set, step)``.
    """

    FILE_NAME = "projection_monitor.jsonl"
    PREFIX = "monitor/"

    def __init__(
        self,
        directions: Sequence[dict | MonitoredDirection],
        every: int = 10,
        data: str | Path | Sequence[dict] | None = None,
        max_examples: int = 32,
        batch_size: int = 8,
        tokens: str = "all",
        batches: Sequence[dict] | None = None,
    ):
        rows = None if data is None or isinstance(data, (str, Path)) else list(data)
        self.config = ProjectionMonitorConfig(
            directions=list(directions),
            every=every,
            data=None if rows is not None else data,
            max_examples=max_examples,
            batch_size=batch_size,
            tokens=tokens,
        )
        self.rows = rows  # in-memory monitor rows (Python API), tokenized like data
        self.batches: list[dict] | None = None if batches is None else [self._check_batch(b) for b in batches]
        self.layers_path: str | None = None
        self.tokens_measured = 0
        self._targets: list[_Target] | None = None
        self._device_batches: dict = {}

    @classmethod
    def from_config(cls, config: ProjectionMonitorConfig | dict | str) -> ProjectionMonitor:
        config = parse_projection_monitor(config)
        return cls(
            config.directions,
            every=config.every,
            data=config.data,
            max_examples=config.max_examples,
            batch_size=config.batch_size,
            tokens=config.tokens,
        )

    @property
    def every(self) -> int:
        return self.config.every

    @property
    def targets(self) -> list[_Target]:
        if self._targets is None:
            raise RuntimeError("ProjectionMonitor.bind(model) first: its directions are not resolved yet.")
        return self._targets

    def due(self, step: int, max_steps: int | None = None) -> bool:
        """Whether training step ``step`` gets a measurement: multiples of ``every`` and the last step."""
        return step % self.every == 0 or (bool(max_steps) and step >= max_steps)

    # --- data --------------------------------------------------------------------------------------
    @staticmethod
    def _check_batch(batch: dict) -> dict:
        if "input_ids" not in batch:
            raise KeelInputError(f"{WHAT}: a monitor batch needs input_ids (got keys {sorted(batch)}).")
        ids = torch.as_tensor(batch["input_ids"])
        mask = torch.as_tensor(batch.get("attention_mask", torch.ones_like(ids)))
        out = {"input_ids": ids, "attention_mask": mask}
        completion = batch.get("completion_mask")
        out["completion_mask"] = mask.bool() if completion is None else torch.as_tensor(completion).bool()
        return out

    def set_examples(self, examples: Sequence[dict], pad_token_id: int = 0) -> None:
        """Build the fixed monitor batches from tokenized examples (``input_ids``, optional ``labels``)."""
        examples = list(examples)[: self.config.max_examples]
        if not examples:
            raise KeelInputError(f"{WHAT}: the monitor set is empty; give data with at least one row.")
        self.batches = batches_from_examples(examples, self.config.batch_size, pad_token_id)
        self._device_batches = {}

    def load_rows(self) -> list[dict] | None:
        """The configured monitor rows (``data`` file or in-memory rows), at most ``max_examples``; None when
        the monitor set is to come from the trainer's dataset."""
        if self.rows is not None:
            rows = self.rows
        elif self.config.data is not None:
            rows = read_jsonl(self.config.data)
        else:
            return None
        return list(rows[: self.config.max_examples])

    # --- directions --------------------------------------------------------------------------------
    def bind(self, model: nn.Module, layers_path: str | None = None) -> None:
        """Resolve every direction against ``model``: layers, width, orthonormal basis."""
        num_layers = len(decoder_layers(model, layers_path))
        d_model = hidden_size(model)
        targets = []
        for entry in self.config.directions:
            spec = entry.spec
            try:
                layer_spec = spec.layers if spec.layers is not None else spec.default_layers(d_model)
                by_layer = spec.directions_by_layer(resolve_layers(layer_spec, num_layers), d_model)
                for layer, direction in by_layer.items():
                    direction.check_usable(d_model)
                    targets.append(_Target(entry.name, spec.site, layer, direction.orthonormalized().vectors))
            except ValueError as err:  # SpecError, DirectionError and layer errors
                raise KeelInputError(f"{WHAT}: direction {entry.name!r}: {err}") from None
        self.layers_path = layers_path
        self._targets = targets

    # --- measuring ---------------------------------------------------------------------------------
    def _batches_on(self, device: torch.device) -> list[dict]:
        if self.batches is None:
            raise RuntimeError("ProjectionMonitor has no monitor set: call set_examples() (or give batches).")
        if device not in self._device_batches:
            self._device_batches = {device: [self._prepared(b, device) for b in self.batches]}
        return self._device_batches[device]

    def _prepared(self, batch: dict, device: torch.device) -> dict:
        mask = batch["attention_mask"].bool()
        if self.config.tokens == "last":
            positions = torch.arange(mask.shape[1]).expand_as(mask)
            last = torch.where(mask, positions, -1).max(dim=1).values
            monitored = torch.zeros_like(mask)
            rows = last >= 0
            monitored[rows.nonzero().flatten(), last[rows]] = True
        else:
            monitored = mask
        return {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
            "completion_mask": batch["completion_mask"].to(device),
            "monitored": monitored.to(device),
        }

    @staticmethod
    def _intervenes(iset: InterventionSet, step: int) -> bool:
        return any("train" in op.spec.phases and op.spec.coefficient_at(step) != 0.0 for op in iset.ops)

    @torch.no_grad()
    def measure(
        self, model: nn.Module, intervention_set: InterventionSet | None = None, step: int = 0, reference=None
    ) -> dict[str, float]:
        """One measurement: ``{"<name>/L<layer>/on": ..., "/off", "/abs_on", "/abs_off"}`` (signed keys per row,
        ``.../c<j>/on``, for a direction of several rows). ``on`` runs ``intervention_set`` in phase ``"train"``
        with its coefficients at ``step``; when nothing would act at that step, ``on`` equals ``off`` and is not
        run twice. ``reference``: the :class:`~interventions.ReferenceSource` for reference operators."""
        iset = intervention_set
        if self._targets is None:
            self.bind(model, iset.layers_path if iset is not None else None)
        batches = self._batches_on(_device_of(model))
        active = iset is not None and self._intervenes(iset, step)
        if active and iset.needs_reference_in("train") and reference is None:
            raise RuntimeError(
                "The interventions read a reference model's pass (reference_ablate/resample_ablate): give "
                "measure() the trainer's ReferenceSource (reference=...)."
            )
        passes = [("on", "train"), ("off", None)] if active else [("off", None)]
        forward_kwargs = _forward_kwargs(model)
        state: dict = {}
        sums: dict[str, dict[int, list]] = {}
        with contextlib.ExitStack() as stack:
            stack.enter_context(_eval_mode(model))
            if iset is not None:
                stack.enter_context(
                    iset
                )  # attached first, so its hooks run before the monitor's: "on" is after them
                stack.enter_context(_preserved_set(iset, step))
            if reference is not None:
                stack.enter_context(_preserved_reference(reference))
            for index, target in enumerate(self.targets):
                fn = self._recorder(index, target, state)
                handle = register_site_hook(model, target.site, target.layer, fn, self.layers_path)
                stack.callback(handle.remove)
            for label, phase in passes:
                state["acc"] = sums[label] = {}
                for batch in batches:
                    state["mask"] = batch["monitored"]
                    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                    switch = contextlib.nullcontext()
                    if iset is not None:
                        iset.set_batch(
                            attention_mask=batch["attention_mask"], completion_mask=batch["completion_mask"]
                        )
                        if phase is not None and reference is not None:
                            reference.capture(iset, phase, **inputs)
                        switch = iset.phase(phase)
                    with switch:
                        model(**inputs, **forward_kwargs)
        if not active:
            sums["on"] = sums["off"]
        return self._summarise(sums)

    @staticmethod
    def _recorder(index: int, target: _Target, state: dict):
        cache: dict = {}

        def record(h: torch.Tensor) -> None:
            mask = state["mask"]
            if mask.shape != h.shape[:2]:
                mask = mask[:, -h.shape[1] :]
                if mask.shape != h.shape[:2]:
                    raise RuntimeError(
                        f"Monitor mask {tuple(mask.shape)} does not match activations {tuple(h.shape[:2])} at "
                        f"{target.site} layer {target.layer}."
                    )
            if h.device not in cache:
                cache[h.device] = target.basis.to(h.device)
            coords = projection(h.detach(), cache[h.device])[mask]  # [tokens, k], float32
            acc = state["acc"].get(index)
            signed, absolute, count = (
                coords.sum(0).double(),
                coords.abs().mean(-1).sum().double(),
                coords.shape[0],
            )
            if acc is None:
                state["acc"][index] = [signed, absolute, count]
            else:
                acc[0], acc[1], acc[2] = acc[0] + signed, acc[1] + absolute, acc[2] + count
            return None  # read only

        return record

    def _summarise(self, sums: dict[str, dict[int, list]]) -> dict[str, float]:
        out: dict[str, float] = {}
        tokens = 0
        for label in ("on", "off"):
            for index, target in enumerate(self.targets):
                acc = sums[label].get(index)
                if acc is None or acc[2] == 0:
                    continue
                signed, absolute, count = acc[0].cpu().tolist(), float(acc[1]), acc[2]
                tokens = max(tokens, count)
                if len(signed) == 1:
                    out[f"{target.key()}/{label}"] = signed[0] / count
                else:
                    for j, s in enumerate(signed):
                        out[f"{target.key()}/c{j}/{label}"] = s / count
                out[f"{target.key()}/abs_{label}"] = absolute / count
        self.tokens_measured = tokens
        return dict(sorted(out.items()))

    # --- the curve file ----------------------------------------------------------------------------
    @staticmethod
    def truncate_log(path: str | Path, before_step: int) -> None:
        """Keep only the measurements of steps before ``before_step`` (a run starting over at step 0 starts a
        new curve; a resumed run drops what the interrupted run measured after its checkpoint)."""
        path = Path(path)
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < before_step:
                kept.append(line)
        if not kept:
            path.unlink()
            return
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)

    def append_log(
        self, path: str | Path, step: int, values: dict[str, float], epoch: float | None = None
    ) -> None:
        """One line per measurement: ``{"step", "epoch", "tokens", "values": {"<name>/L<layer>/on": ...}}``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        row = {"step": step, "epoch": epoch, "tokens": self.tokens_measured, "values": values}
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    @staticmethod
    def read_log(path: str | Path) -> list[dict]:
        return read_jsonl(path, allow_empty=True)


# ---- helpers ---------------------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _forward_kwargs(model: nn.Module) -> dict:
    """No KV cache; logits at one position only where the model supports it (the monitor reads hidden states,
    and full-vocabulary logits of a whole batch can take gigabytes)."""
    kwargs: dict[str, Any] = {"use_cache": False}
    try:
        params = inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return kwargs


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the block (no dropout, so no random numbers), then every module's flag as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _preserved_set(iset: InterventionSet, step: int):
    """Coefficients at ``step`` and no diagnostics for the block; then the set's state as it was."""
    saved = (iset.collect_stats, iset.context, iset.step)
    ops = [(op, op.coefficient, op.reference) for op in iset.ops]
    iset.collect_stats = False
    iset.set_step(step)
    try:
        yield
    finally:
        iset.collect_stats, iset.context, iset.step = saved
        for op, coefficient, reference in ops:
            op.coefficient, op.reference = coefficient, reference


@contextlib.contextmanager
def _preserved_reference(reference):
    """A reference source's generator (resample_ablate's row shifts) and pass count, restored after."""
    generator = getattr(reference, "generator", None)
    state = generator.get_state() if generator is not None else None
    passes = getattr(reference, "passes", None)
    try:
        yield
    finally:
        if state is not None:
            generator.set_state(state)
        if passes is not None:
            reference.passes = passes


__all__ = [
    "MonitoredDirection",
    "ProjectionMonitor",
    "ProjectionMonitorConfig",
    "batches_from_examples",
    "examples_from_dataset",
    "parse_projection_monitor",
    "tokenize_rows",
]
