"""Reward functions for ``keel train`` with ``trainer: grpo``, and how a recipe names them.

A recipe lists ``reward_funcs``: import paths ``package.module:function`` (TRL's ``package.module.function``
works too) or the name of a function in this module (``length_reward``). TRL calls each as
``f(completions=..., prompts=..., completion_ids=..., **dataset_columns)`` and wants one float (or None:
not scored) per completion; a completion is a string, or a list of chat messages for conversational data.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from interventions.serialization import KeelInputError


def completion_text(completion) -> str:
    """The text of one completion: the string itself, or the content of its last chat message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion:
        last = completion[-1]
        content = last.get("content", "") if isinstance(last, dict) else last
        if isinstance(content, list):  # typed content blocks
            return "".join(b.get("text", "") for b in content if isinstance(b, dict))
        return str(content)
    return ""


def length_reward(completions, target_chars: int = 40, **kwargs) -> list[float]:
    """1.0 for a completion of ``target_chars`` characters, falling linearly to 0.0 at none or at twice as
    many: a smooth signal that varies between samples, for offline smoke runs of the GRPO plumbing."""
    out = []
    for completion in completions:
        n = len(completion_text(completion))
        out.append(max(0.0, 1.0 - abs(n - target_chars) / target_chars))
    return out


def keyword_reward(completions, keywords: Sequence[str] = ("help", "safe"), **kwargs) -> list[float]:
    """The fraction of ``keywords`` a completion contains (case-insensitive)."""
    words = [k.lower() for k in keywords]
    return [sum(w in completion_text(c).lower() for w in words) / len(words) for c in completions]


def resolve_reward(name: str) -> Callable:
    """A reward function from ``module:function``, ``module.function`` or a name in :mod:`keel.rewards`."""
    if not isinstance(name, str) or not name.strip():
        raise KeelInputError(f"A reward function is named by an import path 'module:function', got {name!r}.")
    name = name.strip()
    if ":" in name:
        module_name, _, attr = name.partition(":")
    elif "." in name:
        module_name, _, attr = name.rpartition(".")
    else:
        module_name, attr = __name__, name
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise KeelInputError(
            f"Reward function {name!r}: cannot import module {module_name!r} ({err})."
        ) from None
    func = getattr(module, attr, None)
    if not callable(func):
        known = "length_reward, keyword_reward"
        raise KeelInputError(
            f"Reward function {name!r}: {module_name} has no function {attr!r}. Give 'module:function', "
            f"or one of keel.rewards: {known}."
        )
    return func


def load_reward_funcs(names: Sequence[str] | str | None) -> list[Callable]:
    """Every reward function a recipe names (at least one)."""
    if isinstance(names, str):
        names = [names]
    if not names:
        raise KeelInputError(
            "trainer grpo needs reward_funcs: a list of import paths 'module:function' "
            "(e.g. keel.rewards:length_reward)."
        )
    return [resolve_reward(n) for n in names]
