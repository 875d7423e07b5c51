"""Data baselines: the defences that change the training data instead of the model or the loss.

Two of the baselines EM defences are compared against (Kaczer et al.) act on the data, and are labelled
so wherever they appear (help texts, the run record's ``script`` section, a line on stderr when
``keel train`` applies them):

- ``inoculation_prompt``: a system prompt added to every training example (inoculation prompting: the
  narrow behaviour is "explained" by the prompt, so less of it generalises). It is added to the training
  split only: never to the eval split, and ``keel eval`` never adds it (its prompts are the question
  file's, with the question's own ``system`` or ``--system_prompt``; nothing is read from the training
  run). A row that has a system message gets the inoculation prompt before it (``PROMPT\\n\\n<its own>``).
  Conversational rows only: ``messages`` (SFT) or a list-of-messages ``prompt`` (prompt/completion, DPO,
  GRPO).
- ``interleave: {data: FILE, fraction: 0.05}``: benign examples from a second dataset (a file, folder or
  hub id, as ``dataset_name``; same columns as the training data) make up ``fraction`` of the training
  set: for ``n`` training rows, the whole number ``k`` of benign rows whose share ``k / (n + k)`` is
  nearest the fraction (``k ~ fraction * n / (1 - fraction)``), so the share is the fraction itself
  whenever it can be (95 rows at 0.05: 5 benign, 100 in all). The benign rows are drawn without replacement (seeded; a file with fewer rows than
  needed is cycled through reshuffled copies) and placed at evenly spaced positions.

Python: :func:`add_inoculation_prompt`, :func:`interleave_benign`, or :func:`apply_data_baselines` with a
config holding the two keys (``keel train``'s script arguments mix in :class:`DataBaselineArguments`).
Interleaving comes first, so with both the benign rows get the prompt too (every training example has it).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from interventions.serialization import KeelInputError, from_dict, read_config_value

from . import load_dataset_any

WHAT = "data baseline"
LABEL = "data baseline (changes the training data)"
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataBaselineError(KeelInputError):
    """A data baseline that cannot be applied as configured; the message says what to change."""


@dataclass
class InterleaveConfig:
    """``data``: the benign dataset (file, folder or hub id); ``fraction``: its share of the training set,
    in (0, 1); ``split``: which split of ``data`` (default ``train``)."""

    data: str | None = None
    fraction: float | None = None
    split: str = "train"

    def __post_init__(self) -> None:
        if not isinstance(self.data, (str, Path)) or not str(self.data).strip():
            raise DataBaselineError(
                f"interleave.data must name the benign dataset (a file or hub id), got {self.data!r}."
            )
        self.data = str(self.data)
        if Path(self.data).suffix in _FILE_SUFFIXES and not Path(self.data).exists():
            raise DataBaselineError(f"interleave.data: {self.data}: no such file.")
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1 or not math.isfinite(f):
            raise DataBaselineError(f"interleave.fraction must be a number in (0, 1) (e.g. 0.05), got {f!r}.")
        self.fraction = float(f)


def parse_interleave(value) -> InterleaveConfig | None:
    """A mapping, an :class:`InterleaveConfig`, or a string: an inline YAML/JSON mapping or a YAML file."""
    if value is None or isinstance(value, InterleaveConfig):
        return value
    what, value = read_config_value(value, "interleave", error=DataBaselineError)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DataBaselineError(f"{what}: expected a mapping {{data: FILE, fraction: 0.05}}, got {value!r}.")
    return from_dict(InterleaveConfig, value, what, error=DataBaselineError)


@dataclass
class DataBaselineArguments:
    """``keel train``'s data-baseline keys; mixed into its script arguments, validated at parse time."""

    inoculation_prompt: str | None = field(
        default=None,
        metadata={
            "help": "Data baseline (changes the training data): a system prompt added to every training example "
            "(inoculation prompting), never to the eval split; keel eval never adds it."
        },
    )
    interleave: dict | str | None = field(
        default=None,
        metadata={
            "help": "Data baseline (changes the training data): {data: FILE, fraction: 0.05} makes benign rows of "
            "FILE exactly that fraction of the training set (rounded to a whole example), evenly interleaved."
        },
    )

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        prompt = self.inoculation_prompt
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise DataBaselineError(f"inoculation_prompt must be a non-empty string, got {prompt!r}.")
        self.interleave = parse_interleave(self.interleave)


# ---- inoculation -----------------------------------------------------------------------------------


def _with_system(messages: list[dict], prompt: str, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataBaselineError(f"inoculation_prompt: {where} is not a list of chat messages: {messages!r}.")
    first = messages[0]
    if first.get("role") == "system":
        content = first.get("content")
        if not isinstance(content, str):
            raise DataBaselineError(
                f"inoculation_prompt: {where} starts with a system message whose content is not text: {content!r}."
            )
        return [{**first, "content": f"{prompt}\n\n{content}"}, *messages[1:]]
    system = {**{k: None for k in first}, "role": "system", "content": prompt}  # same keys: one Arrow struct
    return [system, *messages]


def add_inoculation_prompt(dataset, prompt: str):
    """``dataset`` with system prompt ``prompt`` at the start of every row's conversation (``messages``, or a
    conversational ``prompt``); a row's own system message follows it in the same message."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataBaselineError(f"inoculation_prompt must be a non-empty string, got {prompt!r}.")
    columns = list(dataset.column_names or [])
    key = "messages" if "messages" in columns else "prompt" if "prompt" in columns else None
    if key is None:
        raise DataBaselineError(
            f"inoculation_prompt needs conversational rows, with `messages` or a list-of-messages `prompt` "
            f"(this dataset has columns {columns}): a system prompt has no place in plain text."
        )

    def add(row):
        value = row[key]
        if isinstance(value, str):
            raise DataBaselineError(
                f"inoculation_prompt needs conversational rows: `{key}` is plain text here ({value[:60]!r}); give "
                "it as a list of messages."
            )
        return {key: _with_system(value, prompt, f"`{key}`")}

    return dataset.map(add)


# ---- interleaving ----------------------------------------------------------------------------------


def benign_count(n: int, fraction: float) -> int:
    """How many benign rows make up ``fraction`` of ``n`` training rows plus themselves (nearest whole row)."""
    k = fraction * n / (1 - fraction)
    lower = math.floor(k)
    # of the two whole counts around k, the one whose share of the total is nearer the fraction
    return min((lower, lower + 1), key=lambda c: (abs(c / (n + c) - fraction), c))


def interleave_benign(train, benign, fraction: float, seed: int = 0):
    """``train`` with benign rows of ``benign`` interleaved so they are ``fraction`` of the result (see the
    module docstring). Returns ``(dataset, k)``; ``benign`` must have ``train``'s columns (extra ones are
    dropped) and compatible types."""
    from datasets import concatenate_datasets

    for name, data in (("the training data", train), ("interleave.data", benign)):
        if not hasattr(data, "__len__"):
            raise DataBaselineError(
                f"interleave cannot count the rows of {name} (a streaming dataset): load it whole."
            )
    n, available = len(train), len(benign)
    if available == 0:
        raise DataBaselineError("interleave.data holds no rows.")
    k = benign_count(n, fraction)
    if k == 0:
        return train, 0
    missing = [c for c in train.column_names if c not in benign.column_names]
    if missing:
        raise DataBaselineError(
            f"interleave.data lacks the training data's columns {missing} (it has {benign.column_names}); the benign "
            "rows must be in the same format."
        )
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(available) for _ in range(-(-k // available))])[:k]
    chosen = benign.select_columns(train.column_names).select(order.tolist())
    try:
        chosen = chosen.cast(train.features)
    except (ValueError, TypeError) as err:
        raise DataBaselineError(
            f"interleave.data's rows do not match the training data's types: {err}"
        ) from None
    total = n + k
    benign_at = {math.floor((i + 0.5) * total / k) for i in range(k)}
    indices, t, b = [], 0, n
    for position in range(total):
        if position in benign_at:
            indices.append(b)
            b += 1
        else:
            indices.append(t)
            t += 1
    return concatenate_datasets([train, chosen]).select(indices), k


# ---- both, as keel train applies them --------------------------------------------------------------


def apply_data_baselines(train, config, seed: int = 0, load=None, log=None):
    """The training dataset with ``config``'s data baselines applied (interleaving, then the inoculation
    prompt); ``config`` is anything with ``inoculation_prompt`` / ``interleave`` (missing keys: none).
    ``load(name, split)`` loads the benign dataset (default: :func:`keel.loading.load_dataset_any`);
    ``log(text)`` reports what was done (default: stderr), labelled as changing the data."""
    prompt = getattr(config, "inoculation_prompt", None)
    interleave = parse_interleave(getattr(config, "interleave", None))
    if prompt is None and interleave is None:
        return train
    log = log or (lambda text: print(text, file=sys.stderr))
    if interleave is not None:
        benign = (load or _load)(interleave.data, interleave.split)
        n = len(train) if hasattr(train, "__len__") else None
        train, k = interleave_benign(train, benign, interleave.fraction, seed=seed)
        log(
            f"{LABEL}: interleaved {k} benign rows of {interleave.data} among {n} training rows "
            f"({k / (n + k):.4f} of {n + k}; asked {interleave.fraction})."
        )
    if prompt is not None:
        train = add_inoculation_prompt(train, prompt)
        log(f"{LABEL}: inoculation prompt added to every training example (not to evaluation): {prompt!r}.")
    return train


def _load(name: str, split: str):
    return load_dataset_any(name, split=split)
