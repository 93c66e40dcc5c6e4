"""The whole ``magic_init.py`` job as a library call: read the net, sample images, initialize,
write the caffemodel and the report. The CLI only parses options into :class:`RunConfig`.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from caffe_utils import images, magic, measure, netio
from caffe_utils.engine import open_net, resolve_engine
from caffe_utils.errors import DataError, OutputError
from caffe_utils.outputs import OutputSet, atomic_file, direct_file

MIN_IMAGES = 2


@dataclass
class SampleSpec:
    """Which images the net sees and how they are preprocessed, as Caffe's data layer would feed
    them; ``None`` takes the net's data layer's setting. :class:`RunConfig` and
    :class:`MeasureConfig` share it, and the CLIs' image options, defaults and help come from
    its fields (``metadata["help"]``)."""
    data: Optional[str] = field(default=None, metadata={"help": (
        "Images: a glob, a folder, a Caffe image list or an LMDB [default: the source of the net's data layer].")})
    root: Optional[str] = field(default=None, metadata={"help": "Root folder for image-list paths."})
    images: int = field(default=160, metadata={"help": (
        f"Number of sample images; with fewer usable ones (at least {MIN_IMAGES}) they are reused with other "
        "random crops and a warning.")})
    mean: Optional[str] = field(default=None, metadata={"help": (
        "Mean to subtract: 'B,G,R' values or a .binaryproto [default: the data layer's, else 104,117,123 "
        "(its grey value for a 1-channel input)].")})
    scale: Optional[float] = field(default=None, metadata={"help": (
        "Multiply inputs by this after mean subtraction [default: the data layer's, else 1].")})
    resize: Optional[int] = field(default=None, metadata={"help": (
        "Resize images to this square size before cropping [default: 256 or the crop size].")})
    input_shape: Optional[Tuple[int, int, int]] = field(default=None, metadata={"help": (
        "The net's input size C,H,W, for a net whose data layer does not tell it (no crop_size) "
        "[default: the data layer's; with an LMDB, its first Datum's].")})


@dataclass
class RunConfig:
    """One ``magic_init.py`` run. The algorithm's settings, batch size, seed and memory limit
    included, are ``options``: :class:`magic.InitOptions` holds every default, and the CLI shows
    those (one source for every default)."""
    prototxt: str
    output: str
    weights: Optional[str] = None
    sample: SampleSpec = field(default_factory=SampleSpec)
    options: magic.InitOptions = field(default_factory=magic.InitOptions)
    engine: str = "auto"
    gpu: Optional[int] = None
    report: Optional[str] = None
    force: bool = False
    plot: Optional[str] = None
    fp16: bool = False  # store the output's blobs as OpenCV's FP16 raw_data (not loadable by BVLC Caffe)
    #: where to write the net with the LRN alphas stage 3 rescaled (``InitOptions.lrn_alpha``,
    #: which this turns on); without it the LRN layers keep their alpha and stay inexact
    output_prototxt: Optional[str] = None


@dataclass
class RunResult:
    report: magic.InitReport
    engine: str
    images_used: int
    warnings: List[str] = field(default_factory=list)


def _check_target(path: str, option: str) -> Path:
    """``path`` as an output file for ``option``: its folder exists and is writable, it is no folder."""
    out = Path(path)
    if out.is_dir():
        raise OutputError(f"{option} '{out}' is a directory; give a file name such as {out / out.name}")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{option} '{out}': '{parent}' is a file, not a folder; choose another {option} path")
    if not parent.is_dir():
        raise OutputError(f"{option} folder '{parent}' does not exist; create it or choose another {option} path")
    # the output is renamed into place from a file next to it: that file must be creatable
    with OutputSet() as probe:
        try:
            probe.stage(out)
        except OutputError as exc:
            raise OutputError(f"{option} folder '{parent}' is not writable ({exc.reason or exc}); "
                              f"choose another {option} path", reason=exc.reason) from exc
    return out


def _same_file(a: Path, b: Optional[str]) -> bool:
    if not b or not a.exists() or not Path(b).exists():
        return False
    return os.path.samefile(a, b)


def _check_output(cfg: RunConfig) -> None:
    """Refuse, before any work, outputs that cannot be written or would overwrite an input."""
    outs = [(cfg.output, "-o/--output")]
    if cfg.report:
        outs.append((cfg.report, "--report"))
    if cfg.plot:
        outs.append((cfg.plot, "--plot"))
    if cfg.output_prototxt:
        outs.append((cfg.output_prototxt, "--output-prototxt"))
    checked = [(_check_target(path, option), option) for path, option in outs]
    for i, (a, opt_a) in enumerate(checked):
        for b, opt_b in checked[i + 1:]:
            if a.resolve() == b.resolve():
                raise OutputError(f"{opt_a} and {opt_b} are the same file '{a}'; give each its own path")
        if _same_file(a, cfg.prototxt) or (not a.exists() and a.resolve() == Path(cfg.prototxt).resolve()):
            raise OutputError(f"{opt_a} '{a}' is the network definition; choose another {opt_a} path")
        if opt_a != "-o/--output" and _same_file(a, cfg.weights):
            raise OutputError(f"{opt_a} '{a}' is the input weights file; choose another {opt_a} path")
    out = checked[0][0]
    if _same_file(out, cfg.weights) and not cfg.force:
        raise OutputError(f"output '{out}' is the input weights file; choose another -o path "
                          "(or --force to replace it)")


def _mean_for(mean: Optional[str], prepared: magic.PreparedNet,
              base: Path) -> Tuple[Sequence[float], Optional[np.ndarray]]:
    """The ``--mean`` to subtract (values or an image), else the data layer's, else ImageNet's."""
    tp = prepared.transform_param
    if mean is not None:
        spec = mean.strip()
        if spec.endswith(".binaryproto") or Path(spec).is_file():
            return (), netio.read_mean(spec)
        try:
            return tuple(float(v) for v in spec.split(",") if v.strip()), None
        except ValueError as exc:
            raise DataError(f"--mean '{mean}' is neither comma-separated numbers nor a .binaryproto file") from exc
    if tp is not None and tp.mean_file:
        mf = Path(tp.mean_file)
        if not mf.is_absolute() and not mf.exists():
            mf = base / mf
        return (), netio.read_mean(mf)
    if tp is not None and len(tp.mean_value):
        return tuple(tp.mean_value), None
    default = (104.0, 117.0, 123.0)
    if prepared.input_shape[0] == 1:
        # a grey net sees the default BGR mean as the images' grey conversion gives it
        return (float(np.dot(default, images.GREY_WEIGHTS)),), None
    return default, None


def run(cfg: RunConfig, progress: Optional[Callable[[str, int, int], None]] = None,
        warn: Optional[Callable[[str], None]] = None, outputs: Optional[OutputSet] = None) -> RunResult:
    """Run the initialization described by ``cfg``; writes ``cfg.output`` (and the report and plot).

    The output files appear together at the end or not at all (see :mod:`caffe_utils.outputs`);
    pass ``outputs`` to learn afterwards (``outputs.committed``) whether they were written, e.g.
    when a Ctrl-C arrived.
    """
    warnings: List[str] = []

    def note(msg: str) -> None:
        warnings.append(msg)
        if warn:
            warn(msg)

    _check_output(cfg)
    opts = replace(cfg.options, batch_size=_batch_for(cfg.sample.images, cfg.options.batch_size, note),
                   lrn_alpha=cfg.output_prototxt is not None)
    engine = resolve_engine(cfg.engine, cfg.gpu)
    net_param = netio.read_net(cfg.prototxt, netio.TEST)
    prepared = _prepare(net_param, cfg.sample, cfg.prototxt)
    net = _open_prepared(prepared, engine, cfg.gpu, opts.batch_size, opts.seed, fill_weights=False)
    if hasattr(net, "check_backward"):
        net.check_backward()  # the rates are measured backward: refused now, not after stage 2
    loaded = load_weights(net, cfg.weights) if cfg.weights else set()
    sample = load_images(cfg.prototxt, cfg.sample, opts.seed, prepared, note, progress)
    report = magic.initialize(net, prepared, sample.data, opts, loaded, progress)
    for msg in report.warnings:
        note(msg)
    if cfg.output_prototxt and not report.lrn_alphas:
        note(f"no LRN layer's alpha changed, so {cfg.output_prototxt} computes what {cfg.prototxt} does")
    params = {name: [np.asarray(b.data) for b in blobs] for name, blobs in net.params.items()}
    netio.set_lrn_alphas(net_param, report.lrn_alphas)  # the caffemodel's layer definitions too
    with (outputs if outputs is not None else OutputSet()) as outs:
        if progress:
            progress("writing", 0, 1)
        with direct_file(outs.stage(cfg.output), "wb", fix="free space or choose a writable -o path") as fh:
            netio.write_caffemodel_to(fh, net_param, params, "float16" if cfg.fp16 else "float32")
        if cfg.output_prototxt:
            with direct_file(outs.stage(cfg.output_prototxt), "w",
                             fix="free space or choose a writable --output-prototxt path") as fh:
                fh.write(adjusted_prototxt(cfg.prototxt, report.lrn_alphas))
        if cfg.report:
            write_json(outs.stage(cfg.report), {
                "prototxt": str(cfg.prototxt), "output": str(cfg.output), "output_prototxt": cfg.output_prototxt,
                "engine": engine, "images": sample.used,
                "options": {k: getattr(opts, k) for k in ("init", "within", "between", "beta", "iterations",
                                                          "damping", "seed")},
                **report.to_dict()})
        if cfg.plot:
            _draw_plot(outs.stage(cfg.plot), report, Path(cfg.prototxt).name)
        outs.commit()
        if progress:
            progress("writing", 1, 1)
    return RunResult(report, engine, sample.used, warnings)


def _draw_plot(path: str, report: magic.InitReport, title: str) -> None:
    """The change rates and their variation before and after stage 3, as a PNG at ``path``."""
    from caffe_utils.plots import PLOT_FIX, draw_rates
    with direct_file(path, "wb", fix=PLOT_FIX) as fh:
        draw_rates([("before", {l.name: l.rate_before for l in report.layers},
                     {l.name: l.cv_before for l in report.layers}),
                    ("after", {l.name: l.rate_after for l in report.layers},
                     {l.name: l.cv_after for l in report.layers})], fh, title=title)


@dataclass
class MeasureConfig:
    """What :func:`measure_models` measures: ``prototxt`` with each of ``weights`` in turn, on
    ``sample``, in batches of ``batch_size``; ``seed`` draws the crops and the top gradients.
    The defaults are those of a :class:`RunConfig`."""
    prototxt: str
    weights: Sequence[str]
    sample: SampleSpec = field(default_factory=SampleSpec)
    batch_size: int = magic.InitOptions.batch_size
    seed: int = magic.InitOptions.seed
    engine: str = RunConfig.engine
    gpu: Optional[int] = None


@dataclass
class ModelStats:
    weights: str
    layers: "OrderedDict[str, measure.LayerStats]"

    @property
    def flatness(self) -> float:
        return measure.flatness(measure.rates_of(self.layers))

    def to_dict(self) -> dict:
        return {"weights": self.weights, "flatness": self.flatness,
                "layers": [{"name": n, **st.to_dict()} for n, st in self.layers.items()]}


def adjusted_prototxt(prototxt: str, alphas: Mapping[str, float]) -> str:
    """The net ``prototxt`` (all phases, upgraded as Caffe reads it) with the LRN layers named
    in ``alphas`` given those alphas: the definition the rescaled weights compute their
    function with."""
    net = netio.read_net_text(prototxt)
    netio.upgrade_net(net)
    netio.set_lrn_alphas(net, alphas)
    return netio.net_to_text(net)


def measure_models(cfg: MeasureConfig, progress: Optional[Callable[[str, int, int], None]] = None,
                   warn: Optional[Callable[[str], None]] = None) -> Tuple[List[ModelStats], int, str]:
    """Per-layer change rates and activation statistics of the net with each caffemodel, on the
    same images and the same random top gradients; returns (stats per model, images, engine)."""
    engine = resolve_engine(cfg.engine, cfg.gpu)
    prepared = _prepare(netio.read_net(cfg.prototxt, netio.TEST), cfg.sample, cfg.prototxt)
    note = warn or (lambda m: None)
    net = _open_prepared(prepared, engine, cfg.gpu, _batch_for(cfg.sample.images, cfg.batch_size, note), cfg.seed)
    sample = load_images(cfg.prototxt, cfg.sample, cfg.seed, prepared, note, progress)
    out = []
    for i, path in enumerate(cfg.weights):
        if progress:
            progress("measuring", i, len(cfg.weights))
        missing = set(net.params) - load_weights(net, path)
        if missing:
            raise DataError(f"{path} has no weights for layer(s) {sorted(missing)}; measure a caffemodel "
                            "that initializes the whole net")
        out.append(ModelStats(str(path), measure.measure(net, prepared.input_name, sample.data, seed=cfg.seed)))
    if progress:
        progress("measuring", len(cfg.weights), len(cfg.weights))
    return out, sample.used, engine


def format_measurement(models: Sequence[ModelStats]) -> str:
    """One table per caffemodel: the paper's Figure 1 quantities per affine layer."""
    blocks = []
    for m in models:
        rows = [("layer", "change rate", "rate CV", "act mean", "act std", "channel-std CV")]
        for name, st in m.layers.items():
            rows.append((name, _fmt(st.rate), _fmt(st.column_cv), _fmt(st.act_mean), _fmt(st.act_std),
                         _fmt(st.channel_std_cv)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [m.weights, ""] + ["  ".join(cell.ljust(wd) for cell, wd in zip(row, widths)).rstrip()
                                   for row in rows]
        lines.insert(3, "  ".join("-" * wd for wd in widths))
        lines.append(f"flatness (max/min change rate): {_fmt(m.flatness)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _prepare(net_param, spec: SampleSpec, prototxt: str) -> magic.PreparedNet:
    """:func:`magic.prepare_net`, with the input size from ``--input-shape`` or, for an LMDB
    sample, its first Datum, when the net's data layer does not tell it."""
    shape = spec.input_shape
    if shape is None and magic.prepare.needs_image_shape(net_param):
        source = spec.data or next((lp.data_param.source for lp in net_param.layer if lp.type == "Data"), None)
        if source:
            path = Path(source)
            if not spec.data and not path.exists() and (Path(prototxt).parent / path).exists():
                path = Path(prototxt).parent / path
            shape = images.lmdb_image_shape(path)
    return magic.prepare_net(net_param, shape)


def _batch_for(images: int, batch_size: int, note: Callable[[str], None]) -> int:
    """The batch size for a sample of ``images``: ``batch_size``, or the whole sample when it is
    smaller (a batch of repeated images would weigh some of them twice)."""
    if images < batch_size:
        note(f"-n {images} is below --batch-size {batch_size}: using batches of {images} images")
        return images
    return batch_size


def _open_prepared(prepared: magic.PreparedNet, engine: str, gpu: Optional[int], batch_size: int, seed: int,
                   fill_weights: bool = True):
    """The engine net of ``prepared`` with its image input ``batch_size`` deep, and its
    auxiliary inputs (``im_info``) as deep and filled for images of the input size;
    ``fill_weights`` False when the initialization loads or fills every affine layer's weights
    (see :func:`~caffe_utils.engine.open_net`)."""
    c, h, w = prepared.input_shape
    shapes = {prepared.input_name: (batch_size, c, h, w)}
    shapes.update((name, (batch_size, *shape)) for name, shape in prepared.aux_inputs.items())
    net = open_net(prepared.net_param, None, netio.TEST, engine, gpu, input_shapes=shapes, seed=seed,
                   fill_weights=fill_weights)
    for name in prepared.aux_inputs:
        net.set_data(name, prepared.aux_values(name, batch_size))
    return net


def load_images(prototxt: str, spec: SampleSpec, seed: int, prepared: magic.PreparedNet,
                note: Callable[[str], None],
                progress: Optional[Callable[[str, int, int], None]] = None) -> images.Sample:
    """The sample of ``spec.images`` preprocessed images from ``spec.data`` (or the data layer of
    the net ``prototxt``), as Caffe's data layer would feed them to ``prepared``'s input; ``seed``
    draws the images and their crops."""
    c, h, w = prepared.input_shape
    source = spec.data or prepared.data_source
    base = Path(prototxt).parent
    if not source:
        raise DataError("no images: give --data (a folder, a glob such as 'images/*.jpg', an image list or an "
                        "LMDB); the net has no data layer with a source")
    if not spec.data and not Path(source).exists() and (base / source).exists():
        source = str(base / source)
    tp = prepared.transform_param
    mean_values, mean_image = _mean_for(spec.mean, prepared, base)
    scale = spec.scale if spec.scale is not None else (tp.scale if tp is not None else 1.0)
    transform = images.Transform(channels=c, crop_h=h, crop_w=w, resize=spec.resize, mean_values=mean_values,
                                 mean_image=mean_image, scale=scale, mirror=bool(tp.mirror) if tp is not None else False)
    records = images.list_source(source, spec.root or prepared.data_root)
    rng = np.random.RandomState(seed)
    if progress:
        progress("loading images", 0, 1)
    sample = images.load_sample(records, spec.images, transform, rng, min_images=MIN_IMAGES)
    if progress:
        progress("loading images", 1, 1)
    if sample.skipped:
        note(f"skipped {len(sample.skipped)} unreadable image(s) (e.g. {sample.skipped[0]})")
    if sample.reused:
        note(f"only {sample.used} usable image(s) for -n {spec.images}; reusing them with different random crops")
    return sample


def _all_finite(a: np.ndarray) -> bool:
    """No NaN or Inf in ``a``, without a temporary of its size (min and max propagate NaN)."""
    return a.size == 0 or bool(np.isfinite(a.min()) and np.isfinite(a.max()))


def load_weights(net, path: str) -> set:
    """Copy the caffemodel ``path``'s blobs into ``net`` by layer name; the names it set.

    The blobs go straight from the file into the net's parameter arrays
    (:func:`netio.copy_caffemodel_into`), so the peak memory is the net's, not the net's plus
    the file's; shapes are all checked before anything is written."""
    targets = OrderedDict((name, [b.data for b in blobs]) for name, blobs in net.params.items())
    loaded = set()
    filled = netio.copy_caffemodel_into(path, targets)
    try:
        for name in filled:
            if not all(_all_finite(a) for a in targets[name]):
                raise DataError(f"{path}: layer '{name}' holds NaN or Inf values; "
                                "use an intact caffemodel or --reinit that layer")
            loaded.add(name)
    finally:
        filled.close()  # closes the file at once, also when a layer is refused
    return loaded


def append_tsv_row(path, header: Sequence[str], row: Sequence[str]) -> None:
    """Append ``row`` to the TSV results file ``path`` (header first for a new file), atomically."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = dest.read_text() if dest.exists() else "\t".join(header) + "\n"
    with atomic_file(dest, "w") as fh:
        fh.write(old + "\t".join(row) + "\n")


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON to ``path`` itself (a path from :meth:`OutputSet.stage`, which
    renames it into place); OutputError when that fails."""
    with direct_file(path, "w") as fh:
        json.dump(obj, fh, indent=2)


def write_json_atomic(path: str, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file next to it, so that ``path``
    appears complete or not at all; OutputError when that fails."""
    with atomic_file(path, "w") as fh:
        json.dump(obj, fh, indent=2)


def _fmt(v: float, spec: str = ".3g") -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def format_report(result: RunResult) -> str:
    """The per-layer table (the paper's Figure 1 for the user's net) and a summary."""
    r = result.report
    rows = [("layer", "type", "init", "rate before", "rate after", "CV after", "act mean", "act std")]
    for l in r.layers:
        rows.append((l.name, l.type, l.initialized, _fmt(l.rate_before), _fmt(l.rate_after), _fmt(l.cv_after),
                     _fmt(l.act_mean), _fmt(l.act_std)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(wd) for cell, wd in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    lines.append("")
    lines.append(f"change-rate flatness (max/min): {_fmt(r.flatness_before)} before, {_fmt(r.flatness_after)} after "
                 f"{r.iterations} between-layer round(s), {r.passes} of them measured"
                 f"{f' ({r.pass_images} images each)' if r.passes else ''}"
                 f"{' (converged)' if r.converged else ''}")
    for i, rnd in enumerate(r.rounds, 1):
        measured = "" if rnd.flatness_measured is None else f", measured {_fmt(rnd.flatness_measured)}"
        polished = "" if rnd.polished is None else f", polished {_fmt(rnd.polished)}"
        lines.append(f"  round {i}: flatness predicted {_fmt(rnd.flatness_predicted)}{measured}{polished}")
    if r.frozen_layers:
        lines.append(f"not counted in the flatness (lr_mult 0, they do not learn): {', '.join(r.frozen_layers)}")
    if r.pinned_layers:
        lines.append(f"not rescaled (their outputs reach the net's output): {', '.join(r.pinned_layers)}")
    if r.inexact_layers:
        lines.append(f"layers that cannot undo a rescaling exactly: {', '.join(r.inexact_layers)}")
    if r.lrn_alphas:
        lines.append("LRN alpha rescaled with the layer's input (the weights need --output-prototxt's net): "
                     + ", ".join(f"{n} {a:.4g}" for n, a in r.lrn_alphas.items()))
    if r.heads:
        lines.append(f"heads the method ends at (their inputs get the random top gradient): {', '.join(r.heads)}")
    if r.unknown_scale_layers:
        lines.append(f"no scale rule for these layers' types, so nothing reaching them was rescaled: "
                     f"{', '.join(r.unknown_scale_layers)}")
    if r.output_deviation is not None:
        verdict = ("function preserved" if r.function_preserved
                   else "outputs changed: layers above cannot undo a rescaling exactly")
        lines.append(f"output deviation caused by the between-layer stage: {r.output_deviation:.2e} "
                     f"relative ({verdict})")
    lines.append(f"engine: {result.engine}; images: {result.images_used}")
    return "\n".join(lines)
