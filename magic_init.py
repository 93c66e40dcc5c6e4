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

from caffe_utils.clitools import (OneLineCommand, damping_range, exit_status, ignore_interrupts_at_exit,
                                  non_negative, positive, sample_options, signal_name, signals_as_interrupts)
from caffe_utils.magic import INIT_TYPES, InitOptions
from caffe_utils.pipeline import RunConfig

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
@sample_options
@click.option("-t", "--init", "init", default=InitOptions.init, show_default=True, type=click.Choice(INIT_TYPES),
              help="Weight initialization (pca/zca/kmeans/rand for convolutions; others use gaussian).")
@click.option("--no-within", is_flag=True, help="Skip the within-layer normalization.")
@click.option("--no-between", is_flag=True, help="Skip the between-layer scale adjustment.")
@click.option("--beta", default=InitOptions.beta, show_default=True, type=float, help="Mean of every output channel.")
@click.option("--iterations", default=InitOptions.iterations, show_default=True, type=int, callback=non_negative,
              help="Between-layer rounds: solves of the rate model, each corrected by one measured pass when "
                   "the net has LRN/Sigmoid/TanH-like layers (stops early when every rate is within 1%, or "
                   "after the first measured pass within its standard error (over the calibration batches, or "
                   "where larger over the pass's own), or "
                   "after a round that was undone).")
@click.option("--damping", default=InitOptions.damping, show_default=True, type=float, callback=damping_range,
              help="Fraction of each round's solved rescaling (in log scale) that is applied "
                   "(1 = all of it).")
@click.option("--zero-classifier", is_flag=True, help="Set the last affine layer to zero (paper 4.5).")
@click.option("--reinit", multiple=True, metavar="LAYER", help="Re-initialize this layer even if it has weights.")
@click.option("--reinit-all", is_flag=True, help="Re-initialize every layer.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@click.option("--mem-limit", default=InitOptions.mem_limit >> 20, show_default=True, type=int, callback=positive,
              help="MB of cached activations and patches.")
@click.option("--force", is_flag=True, help="Allow the output to replace the input weights.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw the change rates and their variation before and after into this PNG (needs matplotlib).")
@click.option("--fp16", is_flag=True, help="Store the output's weights as FP16 (OpenCV's raw_data: half the size; "
              "OpenCV loads it, BVLC Caffe does not) [default: float32].")
@click.option("--output-prototxt", type=click.Path(dir_okay=False),
              help="Also write the net here, with the alpha of its LRN layers rescaled along with their "
                   "inputs; the between-layer stage can then undo a rescaling through LRN exactly, and "
                   "OUTPUT computes its function only with this net [default: LRN stays as it is].")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no table.")
def cli(prototxt, output, weights, sample, batch_size, engine, gpu, seed, init, no_within, no_between, beta,
        iterations, damping, zero_classifier, reinit, reinit_all, report_path, mem_limit, force, plot_path, fp16,
        output_prototxt, quiet):
    """Initialize the Caffe net PROTOTXT from sample images and write OUTPUT."""
    options = InitOptions(init=init, within=not no_within, between=not no_between, beta=beta, iterations=iterations,
                          damping=damping, zero_classifier=zero_classifier, reinit=tuple(reinit),
                          reinit_all=reinit_all, batch_size=batch_size, mem_limit=mem_limit << 20, seed=seed)
    _run(RunConfig(prototxt=prototxt, output=output, weights=weights, sample=sample, options=options, engine=engine,
                   gpu=gpu, report=report_path, force=force, plot=plot_path, fp16=fp16,
                   output_prototxt=output_prototxt), quiet)


def _run(cfg: RunConfig, quiet: bool) -> None:
    """Run ``cfg`` with progress on stderr and the table on stdout; user errors, running out of
    memory and interrupts become one line on stderr."""
    from caffe_utils.errors import MagicInitError
    from caffe_utils.outputs import OutputSet
    from caffe_utils.pipeline import format_report, run

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
        what = f"{cfg.output} was written before it" if outputs.committed else "no output written"
        click.echo(f"{PROG}: interrupted ({signal_name(exc)}); {what}", err=True)
        sys.exit(exit_status(exc))
    if not quiet:
        click.echo(format_report(result))
    click.echo(f"wrote {cfg.output}" + (f" and {cfg.output_prototxt}" if cfg.output_prototxt else ""), err=True)


def main() -> None:
    try:
        cli(prog_name=PROG)
    finally:
        ignore_interrupts_at_exit()


if __name__ == "__main__":
    main()
