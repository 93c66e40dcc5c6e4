"""Shared pieces of the project's click commands (``magic_init.py``, ``scripts/measure_stat.py``).

* :class:`OneLineCommand`: every error is one line on stderr, ``PROG: error: ...``, with exit
  status 2 for bad options and 1 for other user errors (click's own format spends three lines
  on usage, hint and error).
* :func:`signals_as_interrupts`: SIGTERM and SIGHUP arrive as :class:`Interrupted`, a
  ``KeyboardInterrupt``, so that every stage cleans up on the way out exactly as for Ctrl-C.
* Option validators (click callbacks) that raise ``click.BadParameter``.
* :func:`sample_options`: the image, batch, seed and engine options that both commands share,
  built from :class:`~caffe_utils.pipeline.SampleSpec` and :class:`~caffe_utils.magic.InitOptions`.

No algorithm code lives here.
"""
from __future__ import annotations

import dataclasses
import functools
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import click

from caffe_utils.engine import ENGINES, resolve_engine
from caffe_utils.errors import EngineError
from caffe_utils.magic import InitOptions
from caffe_utils.pipeline import RunConfig, SampleSpec


def positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be positive, got {value}")
    return value


def non_negative(ctx, param, value):
    if value is not None and value < 0:
        raise click.BadParameter(f"must be 0 or more, got {value}")
    return value


def seed_range(ctx, param, value):
    if value is not None and not 0 <= value < 2 ** 32:
        raise click.BadParameter(f"must be between 0 and 2**32 - 1, got {value}")
    return value


def damping_range(ctx, param, value):
    if not 0 < value <= 1:
        raise click.BadParameter(f"must be in (0, 1] (a fraction of the solved rescaling), got {value}")
    return value


def check_gpu(engine: str, gpu: Optional[int]) -> None:
    """Refuse ``--gpu`` for an engine that runs on the CPU as a bad option (exit 2), before any
    work. The rule is :func:`resolve_engine`'s, which library callers meet as an EngineError."""
    if gpu is None:
        return
    try:
        concrete = resolve_engine(engine)
    except EngineError:
        return  # e.g. --engine caffe without pycaffe: the run reports that itself
    try:
        resolve_engine(concrete, gpu)
    except EngineError as exc:
        raise click.BadParameter(str(exc), param_hint="'--gpu'") from None


def shape_triple(ctx, param, value):
    """``C,H,W`` as three positive ints."""
    if value is None:
        return None
    try:
        dims = tuple(int(v) for v in value.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) <= 0:
        raise click.BadParameter(f"must be three positive integers C,H,W such as 3,224,224, got '{value}'")
    return dims


def _sample_option(*decls: str, **kwargs) -> Callable:
    """A click option for the :class:`SampleSpec` field that the last of ``decls`` names."""
    spec = {f.name: f for f in dataclasses.fields(SampleSpec)}[decls[-1].lstrip("-").replace("-", "_")]
    return click.option(*decls, default=spec.default, show_default=True, help=spec.metadata["help"], **kwargs)


_SHARED_OPTIONS = (
    _sample_option("-d", "--data"),
    _sample_option("--root", type=click.Path(exists=True, file_okay=False)),
    _sample_option("-n", "--images", type=int, callback=positive),
    click.option("--batch-size", default=InitOptions.batch_size, show_default=True, type=int, callback=positive,
                 help="Images per forward and backward pass."),
    _sample_option("--mean"),
    _sample_option("--scale", type=float),
    _sample_option("--resize", type=int, callback=positive),
    _sample_option("--input-shape", metavar="C,H,W", callback=shape_triple),
    click.option("--engine", default=RunConfig.engine, show_default=True, type=click.Choice(ENGINES),
                 help="auto: pycaffe when importable, else the built-in numpy engine."),
    click.option("--gpu", default=None, type=int, callback=non_negative, help="GPU id (pycaffe with CUDA only)."),
    click.option("--seed", default=InitOptions.seed, show_default=True, type=int, callback=seed_range,
                 help="Random seed: the same seed, inputs and engine give bit-identical results."),
)


def sample_options(command: Callable) -> Callable:
    """Add the options both commands share: -d/--data, --root, -n/--images, --mean, --scale and
    --resize reach ``command`` as one ``sample`` (a :class:`SampleSpec`), --batch-size, --seed,
    --engine and --gpu as themselves; --gpu is checked against the engine (:func:`check_gpu`)."""
    names = [f.name for f in dataclasses.fields(SampleSpec)]

    @functools.wraps(command)
    def with_sample(**kwargs):
        sample = SampleSpec(**{name: kwargs.pop(name) for name in names})
        check_gpu(kwargs["engine"], kwargs["gpu"])
        return command(sample=sample, **kwargs)

    for option in reversed(_SHARED_OPTIONS):
        with_sample = option(with_sample)
    return with_sample


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, delivered like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


def signal_name(exc: KeyboardInterrupt) -> str:
    return signal.Signals(exc.signum if isinstance(exc, Interrupted) else signal.SIGINT).name


def exit_status(exc: KeyboardInterrupt) -> int:
    """128 + the signal number, as a shell reports a process killed by that signal."""
    return 128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into :class:`Interrupted` inside the block (main thread only)."""
    saved = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            saved[sig] = signal.signal(sig, _raise_interrupted)
    except ValueError:  # not the main thread: leave the handlers alone
        pass
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def ignore_interrupts_at_exit() -> None:
    """Ignore Ctrl-C from here on. Called once the command has finished (its outputs written or
    its one error line printed): a SIGINT that arrived later, while the interpreter shuts down
    and joins the engine's worker threads, raised KeyboardInterrupt there and printed a
    traceback ("Exception ignored in: <module 'threading'>"), seen once in
    tests/test_hostile.py's signal test on 2026-12-07."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class OneLineCommand(click.Command):
    """A click command whose every error is one line on stderr: ``PROG: error: ...``.

    ``prog`` (a keyword of ``click.command``) is the program name used in those lines. A usage
    error names the option and ends with a pointer to ``--help``.
    """

    def __init__(self, *args, prog: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prog = prog

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        prog = self.prog or prog_name or self.name
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            click.echo(f"{prog}: error: {exc.format_message()} (see '{prog} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"{prog}: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo(f"{prog}: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)
