"""The paper's Figure 1 for any net: per-layer change rates (a) and their coefficient of
variation within each layer (b), one line per model, layers on the x axis, log scale.

Needs matplotlib (``pip install -e .[plot]``); without it both functions raise
:class:`~caffe_utils.errors.MagicInitError` saying so. :func:`plot_rates` writes the PNG atomically
(an :class:`~caffe_utils.errors.OutputError` when it cannot); :func:`draw_rates` draws into an
open file, such as a staged output of :class:`~caffe_utils.outputs.OutputSet`.
"""
from __future__ import annotations

from pathlib import Path
from typing import IO, Dict, Sequence, Tuple

from caffe_utils.errors import MagicInitError
from caffe_utils.outputs import atomic_file

Series = Tuple[str, Dict[str, float], Dict[str, float]]  # (label, rate per layer, CV per layer)
PLOT_FIX = "choose another --plot path"  # the end of the error when the PNG cannot be written


class PlotError(MagicInitError):
    """matplotlib is missing or the plot's folder does not exist."""


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotError("plotting needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from exc
    return plt


def draw_rates(series: Sequence[Series], fh: IO[bytes], title: str = "") -> None:
    """Draw (a) change rate and (b) its coefficient of variation per layer for each series, as a
    PNG into the binary file ``fh`` (e.g. a path from :meth:`OutputSet.stage` opened with
    :func:`~caffe_utils.outputs.direct_file`)."""
    plt = _pyplot()
    layers = list(series[0][1]) if series else []
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 0.35 * len(layers) + 4), 4.2))
    try:
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
        fig.savefig(fh, format="png", dpi=110)
    finally:
        plt.close(fig)


def plot_rates(series: Sequence[Series], path: str, title: str = "") -> None:
    """:func:`draw_rates` into the PNG ``path``, through a temporary file next to it so that the
    plot appears complete or not at all."""
    _pyplot()  # no matplotlib: say so before anything else
    dest = Path(path)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise PlotError(f"plot directory '{parent}' does not exist; create it or choose another --plot path")
    with atomic_file(dest, "wb", fix=PLOT_FIX) as fh:
        draw_rates(series, fh, title)
