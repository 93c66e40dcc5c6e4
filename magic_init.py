#!/usr/bin/env python3
"""magic-init: data-dependent initialization of Caffe networks (Krähenbühl et al., ICLR 2016).

    magic_init.py net.prototxt -o init.caffemodel -d 'images/*.jpg'

A thin click layer over :mod:`caffe_utils.pipeline`: it validates options, shows progress on
stderr, prints the per-layer table, and turns the library's user errors into one line on stderr
with a non-zero exit.
"""
from __future__ import annotations

import sys
from typing import Optional

import click

from caffe_utils.clitools import (OneLineCommand, damping_range, exit_status, non_negative, positive, seed_range,
                                  signal_name, signals_as_interrupts)
from caffe_utils.magic import INIT_TYPES
from caffe_utils.engine import ENGINES
from caffe_utils.pipeline import MIN_IMAGES, RunConfig

PROG = "magic_init.py"


class _Progress:
    """Progress bars on stderr (one line per stage when stderr is not a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.stage: Optional[str] = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.tty:
            width = 30
            fill = int(width * done / max(total, 1))
            end = "\n" if done >= total else ""
            click.echo(f"\r{stage:<14} [{'#' * fill}{'.' * (width - fill)}] {done}/{total}", err=True, nl=False)
            if end:
                click.echo("", err=True)
        elif stage != self.stage:
            click.echo(f"{stage} ...", err=True)
        self.stage = stage


@click.command(cls=OneLineCommand, prog=PROG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("prototxt", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the initialized caffemodel.")
@click.option("-w", "--weights", type=click.Path(exists=True, dir_okay=False),
              help="Start from these weights; layers that have weights keep them.")
@click.option("-d", "--data", help="Images: a glob, a folder, a Caffe image list or an LMDB "
              "[default: the source of the net's data layer].")
@click.option("--root", type=click.Path(exists=True, file_okay=False), help="Root folder for image-list paths.")
@click.option("-n", "--images", default=RunConfig.images, show_default=True, type=int, callback=positive,
              help="Number of sample images; with fewer usable ones (at least "
                   f"{MIN_IMAGES}) they are reused with other random crops and a warning.")
@click.option("--batch-size", default=RunConfig.batch_size, show_default=True, type=int, callback=positive)
@click.option("--mean", default=None, help="Mean to subtract: 'B,G,R' values or a .binaryproto "
              "[default: the data layer's, else 104,117,123].")
@click.option("--scale", default=None, type=float, help="Multiply inputs by this after mean subtraction "
              "[default: the data layer's, else 1].")
@click.option("--resize", default=None, type=int, callback=positive,
              help="Resize images to this square size before cropping [default: 256 or the crop size].")
@click.option("-t", "--init", "init", default=RunConfig.init, show_default=True, type=click.Choice(INIT_TYPES),
              help="Weight initialization (pca/zca/kmeans/rand for convolutions; others use gaussian).")
@click.option("--no-within", is_flag=True, help="Skip the within-layer normalization.")
@click.option("--no-between", is_flag=True, help="Skip the between-layer scale adjustment.")
@click.option("--beta", default=RunConfig.beta, show_default=True, type=float, help="Mean of every output channel.")
@click.option("--iterations", default=RunConfig.iterations, show_default=True, type=int, callback=non_negative,
              help="Between-layer iterations (stops early when every rate is within 1%).")
@click.option("--damping", default=RunConfig.damping, show_default=True, type=float, callback=damping_range,
              help="Between-layer damping alpha: each round moves every layer's log change rate this "
                   "fraction of the way to the common target (1 = one full step).")
@click.option("--zero-classifier", is_flag=True, help="Set the last affine layer to zero (paper 4.5).")
@click.option("--reinit", multiple=True, metavar="LAYER", help="Re-initialize this layer even if it has weights.")
@click.option("--reinit-all", is_flag=True, help="Re-initialize every layer.")
@click.option("--engine", default=RunConfig.engine, show_default=True, type=click.Choice(ENGINES),
              help="auto: pycaffe when importable, else the built-in numpy engine.")
@click.option("--gpu", default=None, type=int, callback=non_negative, help="GPU id (pycaffe with CUDA only).")
@click.option("--seed", default=RunConfig.seed, show_default=True, type=int, callback=seed_range,
              help="Random seed: same seed, inputs and engine give a bit-identical output.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@click.option("--mem-limit", default=RunConfig.mem_limit_mb, show_default=True, type=int, callback=positive,
              help="MB of cached activations and patches.")
@click.option("--force", is_flag=True, help="Allow the output to replace the input weights.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw the change rates and their variation before and after into this PNG (needs matplotlib).")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no table.")
def cli(prototxt, output, weights, data, root, images, batch_size, mean, scale, resize, init, no_within,
        no_between, beta, iterations, damping, zero_classifier, reinit, reinit_all, engine, gpu, seed,
        report_path, mem_limit, force, plot_path, quiet):
    """Initialize the Caffe net PROTOTXT from sample images and write OUTPUT."""
    from caffe_utils.errors import MagicInitError
    from caffe_utils.outputs import OutputSet
    from caffe_utils.pipeline import RunConfig, format_report, run

    if gpu is not None and engine == "numpy":
        raise click.BadParameter("the numpy engine runs on the CPU; drop --gpu or use --engine caffe",
                                 param_hint="'--gpu'")
    cfg = RunConfig(prototxt=prototxt, output=output, weights=weights, data=data, root=root, images=images,
                    batch_size=batch_size, mean=mean, scale=scale, resize=resize, init=init,
                    within=not no_within, between=not no_between, beta=beta, iterations=iterations,
                    damping=damping, zero_classifier=zero_classifier, reinit=reinit, reinit_all=reinit_all,
                    engine=engine, gpu=gpu, seed=seed, report=report_path, mem_limit_mb=mem_limit, force=force,
                    plot=plot_path)
    outputs = OutputSet()
    try:
        with signals_as_interrupts():
            result = run(cfg, progress=_Progress(quiet),
                         warn=lambda m: click.echo(f"warning: {m}", err=True), outputs=outputs)
    except MagicInitError as exc:
        raise click.ClickException(str(exc)) from None
    except MemoryError:
        raise click.ClickException("out of memory; lower --batch-size, -n/--images or --mem-limit, or use a "
                                   "machine with more memory") from None
    except KeyboardInterrupt as exc:
        what = f"{output} was written before it" if outputs.committed else "no output written"
        click.echo(f"{PROG}: interrupted ({signal_name(exc)}); {what}", err=True)
        sys.exit(exit_status(exc))
    if not quiet:
        click.echo(format_report(result))
    click.echo(f"wrote {output}", err=True)


def main() -> None:
    cli(prog_name=PROG)


if __name__ == "__main__":
    main()
