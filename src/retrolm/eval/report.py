"""Markdown tables and matplotlib plots for evaluation reports (written next to the config that produced them)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from retrolm.core.io import atomic_path


def fmt(x: float | int | None, digits: int = 4) -> str:
    """A number for a table: ints with separators, floats to ``digits`` significant decimals, NaN as '–'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def change(gain: float | None) -> str:
    """A relative gain in bits per byte shown as the change it is ('+3.0%' for a 3% loss), '–' where there is none
    (NaN in memory, null in a JSON file)."""
    if gain is None or math.isnan(gain):
        return "–"
    return f"{-gain:+.1%}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; numbers are formatted with :func:`fmt`."""
    cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_lines(
    path: str | Path,
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str = "bits per byte",
    title: str = "",
    hlines: dict[str, float] | None = None,
    logx: bool = False,
    log2x: bool = False,
    secondary: tuple[str, Sequence[float]] | None = None,
    points: dict[str, tuple[float, float]] | None = None,
) -> None:
    """One line per series over ``x``; ``hlines`` are constant references (e.g. retrieval off, a baseline);
    ``secondary`` = (label, values) drawn on a right-hand axis (e.g. the share of chunks at each alpha);
    ``points`` = label → (x, y) single markers (e.g. the database plus noise)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", label=name)
    for i, (name, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, linestyle="--", color=f"C{len(series) + i}", label=name)
    for i, (name, (px, py)) in enumerate((points or {}).items()):
        color = f"C{len(series) + len(hlines or {}) + i}"
        ax.plot([px], [py], marker="*", markersize=12, linestyle="none", color=color, label=name)
    if logx or log2x:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_xscale("log", base=2 if log2x else 10)
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
        if log2x:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if secondary is not None:
        ax2 = ax.twinx()
        ax2.plot(x, secondary[1], color="gray", alpha=0.5, linestyle=":", label=secondary[0])
        ax2.set_ylabel(secondary[0])
        ax2.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    _save(fig, Path(path))
    plt.close(fig)
