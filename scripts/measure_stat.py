#!/usr/bin/env python3
"""Measure a net's per-layer change rates and activation statistics (the paper's §4.1, Figure 1).

    python scripts/measure_stat.py NET.prototxt -w A.caffemodel [-w B.caffemodel ...] -d SOURCE
                                   [--json FILE] [--plot FILE.png]

For each caffemodel, on the same images and the same random Gaussian top gradients: the change
rate C_k of every affine layer, its coefficient of variation across the layer's input columns,
the activation mean and std and the coefficient of variation of the channels' std, and the
flatness max_k C_k / min_k C_k. A thin click layer over :func:`caffe_utils.pipeline.measure_models`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from caffe_utils.clitools import OneLineCommand, sample_options  # noqa: E402  (after the sys.path line above)
from caffe_utils.pipeline import MeasureConfig  # noqa: E402


@click.command(cls=OneLineCommand, prog="measure_stat.py", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("prototxt", type=click.Path(exists=True, dir_okay=False))
@click.option("-w", "--weights", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="A caffemodel to measure (repeat to compare several).")
@sample_options
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Write the figures as JSON.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Draw Figure 1 (a) and (b) for every caffemodel into this PNG (needs matplotlib).")
def cli(prototxt, weights, sample, batch_size, engine, gpu, seed, json_path, plot_path):
    """Print per-layer change rates and activation statistics of PROTOTXT with each caffemodel."""
    from caffe_utils.errors import MagicInitError
    from caffe_utils.pipeline import format_measurement, measure_models, write_json_atomic
    from caffe_utils.plots import plot_rates

    cfg = MeasureConfig(prototxt=prototxt, weights=list(weights), sample=sample, batch_size=batch_size, seed=seed,
                        engine=engine, gpu=gpu)
    try:
        models, used, engine_used = measure_models(cfg, warn=lambda m: click.echo(f"warning: {m}", err=True))
        click.echo(format_measurement(models))
        click.echo(f"\nengine: {engine_used}; images: {used}")
        if json_path:
            write_json_atomic(json_path, {"prototxt": prototxt, "engine": engine_used, "images": used,
                                          "models": [m.to_dict() for m in models]})
        if plot_path:
            plot_rates([(Path(m.weights).name, {n: s.rate for n, s in m.layers.items()},
                         {n: s.column_cv for n, s in m.layers.items()}) for m in models], plot_path,
                       title=Path(prototxt).name)
    except MagicInitError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{exc.filename or ''}: {exc.strerror}") from None


if __name__ == "__main__":
    cli(prog_name="measure_stat.py")
