"""A readable console: per-layer diagnostics go to W&B and the run's JSON log (``trainer_state.json``),
while the console gets one summary per intervention (or monitored direction): the mean over its layers."""

from __future__ import annotations

import re
from collections import defaultdict

from transformers.trainer_callback import PrinterCallback, ProgressCallback

# <prefix><name>/L<layer>/<stat>, for interventions/, eval_interventions/ and monitor/ keys
_PER_LAYER = re.compile(r"^((?:eval_)?interventions/|monitor/)(.+)/L(\d+)/(.+)$")


def console_logs(logs: dict) -> dict:
    """``logs`` with every per-layer key folded into ``<prefix><name>/<stat>``, the mean over layers."""
    out, folded = {}, defaultdict(list)
    for key, value in logs.items():
        match = _PER_LAYER.match(key)
        if match and isinstance(value, (int, float)):
            prefix, name, _, stat = match.groups()
            folded[f"{prefix}{name}/{stat}"].append(float(value))
        else:
            out[key] = value
    for key, values in folded.items():
        out[key] = sum(values) / len(values)
    return out


class ConsoleProgressCallback(ProgressCallback):
    """transformers' progress bar callback, printing :func:`console_logs` of each log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=console_logs(logs or {}), **kwargs)


class ConsolePrinterCallback(PrinterCallback):
    """transformers' printer (``disable_tqdm``), printing :func:`console_logs` of each log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=console_logs(logs or {}), **kwargs)


def use_readable_console(trainer) -> None:
    """Swap the trainer's console callbacks for the summarising ones (public Trainer methods only)."""
    for plain, readable in (
        (ProgressCallback, ConsoleProgressCallback),
        (PrinterCallback, ConsolePrinterCallback),
    ):
        if trainer.pop_callback(plain) is not None:
            trainer.add_callback(readable)
