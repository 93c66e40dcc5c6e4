"""The paper's Figure 1 for any net: per-layer change rates (a) and their coefficient of
variation within each layer (b), one line per model, layers on the x axis, log scale.

Needs matplotlib (``pip install -e .[plot]``); without it :func:`plot_rates` raises
:class:`~caffe_utils.errors.MagicInitError` saying so. Writes the PNG atomically
(an :class:`~caffe_utils.errors.OutputError` when it cannot).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Tuple

from caffe_utils.errors import MagicInitError
from caffe_utils.outputs import atomic_file

Series = Tuple[str, Dict[str, float], Dict[str, float]]  # (label, rate per layer, CV per layer)


class PlotError(MagicInitError):
    """matplotlib is missing or the plot's folder does not exist."""


def plot_rates(series: Sequence[Series], path: str, title: str = "", atomic: bool = True) -> None:
    """Draw (a) change rate and (b) its coefficient of variation per layer for each series.

    ``atomic=False`` writes ``path`` directly (a path from :meth:`OutputSet.stage`)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotError("plotting needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from exc
    dest = Path(path)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise PlotError(f"plot directory '{parent}' does not exist; create it or choose another --plot path")
    layers = list(series[0][1]) if series else []
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 0.35 * len(layers) + 4), 4.2))
    for label, rates, cvs in series:
        xs = [i for i, n in enumerate(layers) if n in rates]
        axes[0].plot(xs, [rates[layers[i]] for i in xs], marker="o", label=label)
        axes[1].plot(xs, [cvs.get(layers[i], float("nan")) for i in xs], marker="o", label=label)
    for ax, what in zip(axes, ("(a) average change rate", "(b) coefficient of variation of the change rate")):
        ax.set_yscale("log")
        ax.set_title(what, fontsize=10)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=90, fontsize=7 if len(layers) > 20 else 9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_file(dest, "wb", atomic=atomic, fix="choose another --plot path") as fh:
            fig.savefig(fh, format="png", dpi=110)
    finally:
        plt.close(fig)
