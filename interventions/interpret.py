"""Reading a direction: top activating token windows on a corpus (both signs) and projection histograms.

CAFT picks principal components by hand after reading, for each component and each sign, the tokens
whose activations project most strongly on it; this module produces that reading as a markdown report.
Selection is by row index afterwards: ``Direction.select(rows)`` records it in the metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .direction import Direction, DirectionError
from .extraction.core import ActivationExtractor, collect_pooled
from .sites import hidden_size


class TopActivations(ActivationExtractor):
    """Streams per-token projections on each row of a direction, keeping the ``top_k`` largest and
    smallest (value, example, position) per row; memory is ``O(k * top_k)`` beyond one batch."""

    method = "inspect"

    def __init__(self, direction: Direction, top_k: int = 20, layer: int | None = None, **kwargs):
        layer = direction.layer if layer is None else layer
        if layer is None:
            raise DirectionError("The direction records no layer; pass layer=... to inspect it.")
        super().__init__(layers=layer, site=direction.site, pooling="all", **kwargs)
        self.direction = direction
        self.top_k = top_k
        k = direction.k
        # side 0: max (positive sign), side 1: min (negative sign, stored negated)
        self.values = torch.full((2, k, 0), float("-inf"))
        self.examples = torch.zeros((2, k, 0), dtype=torch.long)
        self.positions = torch.zeros((2, k, 0), dtype=torch.long)

    def step(self, group, batch, acts):
        (x,) = acts["model"].values()
        if x.shape[0] == 0:
            return
        proj = (x @ self.direction.vectors.to(x.device).T).cpu()  # [n, k]
        example, position = batch.token_coords()
        both = torch.stack([proj.T, -proj.T])  # [2, k, n]
        n = both.shape[-1]
        values = torch.cat([self.values, both], -1)
        examples = torch.cat([self.examples, example.cpu().expand(2, self.direction.k, n)], -1)
        positions = torch.cat([self.positions, position.cpu().expand(2, self.direction.k, n)], -1)
        top = values.topk(min(self.top_k, values.shape[-1]), dim=-1)
        self.values = top.values
        self.examples = examples.gather(-1, top.indices)
        self.positions = positions.gather(-1, top.indices)

    def results(self) -> list[dict]:
        """Per row: ``{"row", "max": [(value, example, position)], "min": [...]}``, strongest first."""
        out = []
        for row in range(self.direction.k):
            entry = {"row": row}
            for side, name, sign in ((0, "max", 1.0), (1, "min", -1.0)):
                entry[name] = [
                    (sign * float(v), int(e), int(p))
                    for v, e, p in zip(
                        self.values[side, row], self.examples[side, row], self.positions[side, row]
                    )
                ]
            out.append(entry)
        return out


def top_activations(
    model: nn.Module,
    examples: Sequence[dict],
    direction: Direction,
    top_k: int = 20,
    layer: int | None = None,
    batch_size: int = 16,
    **kwargs,
) -> list[dict]:
    """Top ``top_k`` max and min projections of pooled tokens on each direction row (see TopActivations)."""
    direction.check_usable(hidden_size(model))
    ex = TopActivations(direction, top_k=top_k, layer=layer, batch_size=batch_size, **kwargs)
    ex.collect(examples, model)
    return ex.results()


def _token_text(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([token_id]) if tokenizer is not None else f"<{token_id}>"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎").replace("`", "'")


def token_window(tokenizer, input_ids: Sequence[int], position: int, before: int = 8, after: int = 2) -> str:
    """Tokens around ``position``, the token itself marked as ``**[[tok]]**``."""
    start, stop = max(0, position - before), min(len(input_ids), position + after + 1)
    parts = []
    for i in range(start, stop):
        text = _token_text(tokenizer, int(input_ids[i]))
        parts.append(f"**[[{text}]]**" if i == position else text)
    return "".join(parts)


def markdown_report(
    direction: Direction,
    results: list[dict],
    examples: Sequence[dict],
    tokenizer=None,
    before: int = 8,
    after: int = 2,
    histogram: str | None = None,
) -> str:
    """One section per row, a table of windows per sign; pick rows afterwards with ``Direction.select``."""
    lines = [
        f"# Direction report: {direction.method} at {direction.site} layer {direction.layer}",
        "",
        f"- model: `{direction.model_id}`; k = {direction.k}; d_model = {direction.d_model}; "
        f"normalization: {direction.normalization}",
        f"- source: `{direction.source}`",
        "- keep components with `Direction.select([...])` or `keel extract inspect ... --select 0,3` "
        "(the selection is stored in the metadata).",
        "",
    ]
    if histogram:
        lines += [f"![projection histograms]({histogram})", ""]
    variance = direction.extra.get("explained_variance_ratio")
    for entry in results:
        row = entry["row"]
        title = f"## Row {row}"
        if variance and row < len(variance):
            title += f" (explained variance ratio {variance[row]:.3f})"
        lines += [title, ""]
        for name, label in (
            ("max", "positive side: largest projections"),
            ("min", "negative side: smallest"),
        ):
            lines += [f"### {label}", "", "| projection | example | window |", "|---:|---:|---|"]
            for value, example, position in entry[name]:
                window = token_window(tokenizer, examples[example]["input_ids"], position, before, after)
                lines.append(f"| {value:.3f} | {example} | {window} |")
            lines.append("")
    return "\n".join(lines)


def projection_histograms(
    model: nn.Module,
    datasets: dict[str, Sequence[dict]],
    direction: Direction,
    path: str | Path,
    layer: int | None = None,
    pooling: str = "mean",
    batch_size: int = 16,
    bins: int = 30,
    max_rows: int = 12,
    **kwargs,
) -> dict[str, list[float]]:
    """PNG of the per-example projections of each data set on each row; returns their means per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer = direction.layer if layer is None else layer
    if layer is None:
        raise DirectionError("The direction records no layer; pass layer=... .")
    direction.check_usable(hidden_size(model))
    projections = {}
    for name, examples in datasets.items():
        pooled = collect_pooled(
            model, examples, layer, site=direction.site, pooling=pooling, batch_size=batch_size, **kwargs
        )[layer]
        projections[name] = pooled @ direction.vectors.T
    rows = min(direction.k, max_rows)
    cols = min(rows, 4)
    nrows = -(-rows // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for row in range(rows):
        ax = axes[row // cols][row % cols]
        for name, proj in projections.items():
            ax.hist(proj[:, row].numpy(), bins=bins, alpha=0.5, label=name)
        ax.set_title(f"row {row} (layer {layer})")
        ax.set_xlabel("projection")
    for extra_ax in axes.flat[rows:]:
        extra_ax.axis("off")
    axes[0][0].legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {name: proj.mean(0).tolist() for name, proj in projections.items()}


def inspect_direction(
    model: nn.Module,
    direction: Direction,
    corpus: Sequence[dict],
    out_dir: str | Path,
    tokenizer=None,
    compare: dict[str, Sequence[dict]] | None = None,
    top_k: int = 20,
    before: int = 8,
    after: int = 2,
    batch_size: int = 16,
    **kwargs,
) -> Path:
    """Write ``report.md`` (top windows per row and sign) and, given ``compare``, ``histograms.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = top_activations(model, corpus, direction, top_k=top_k, batch_size=batch_size, **kwargs)
    histogram = None
    if compare:
        projection_histograms(
            model, compare, direction, out_dir / "histograms.png", batch_size=batch_size, **kwargs
        )
        histogram = "histograms.png"
    report = markdown_report(direction, results, corpus, tokenizer, before, after, histogram)
    path = out_dir / "report.md"
    path.write_text(report)
    return path
