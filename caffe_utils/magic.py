"""The data-dependent initialization of Krähenbühl et al. (ICLR 2016), on any engine net.

Stages, for the affine layers (Convolution, InnerProduct, Deconvolution) in topological order:

1. weights: ``gaussian`` (N(0, 0.01^2)), ``xavier``/``msra`` (Caffe's fillers), ``orthogonal``
   (Saxe et al.), or data-driven on the layer's real input patches (Convolution only; others
   fall back to gaussian): ``pca``, ``zca``, ``kmeans`` (spherical k-means on ZCA-whitened
   patches, Coates & Ng 2012) or ``rand`` (random patches);
2. within-layer (Algorithm 1): output channel i is scaled by 1/sigma_i and its bias set so the
   channel has mean beta and unit variance on the sample;
3. between-layer (Algorithm 2): with a fixed random Gaussian top gradient per image, every
   layer's change rate C_k = sqrt(sum dW_k^2 / sum W_k^2) is measured and layer k is scaled by
   (C_k / C)^(alpha/2), undone downstream (:mod:`caffe_utils.scaling`), until every rate is
   within ``tolerance`` of the target C or ``iterations`` are done. Two refinements make this
   converge in a few rounds where the literal update does not: the scale that a layer inherits
   from the layers feeding it (undone in its input columns) is added to its own, so each round
   moves every log rate by exactly alpha/2 * 2 = alpha of its distance to C on homogeneous nets
   (:func:`scaling.cumulative_log_scales`); and C is the rate that the pinned layers (the
   net's output layers, which cannot be rescaled) reach as well, the geometric mean on
   homogeneous chains (:func:`scaling.reachable_target`). LRN, Sigmoid, TanH... pass a scale
   r as r^d with an effective degree d estimated each round. The paper's alpha = 0.25 belongs
   to its uncoupled update; with this one, alpha = 0.5 closes a 1e6 spread in 10 rounds while
   still damping the error of the degree estimates, so it is the default.

Layers that already have weights keep them unless asked to re-initialize; with nothing to
initialize only stage 3 runs (rescaling a pretrained model). BatchNorm layers without weights
get their statistics from the sample.

Memory stays bounded: the sample's activations are kept only at a checkpoint (the blobs later
layers still need) when they fit in ``mem_limit`` bytes; otherwise they are recomputed from the
last checkpoint, batch by batch. Patches for the data-driven weights are subsampled to fit.

The engine net must have been built from :func:`prepare_net`'s NetParameter (one image input,
no data/loss layers) with the input's batch dimension equal to ``batch_size``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import scipy.linalg
import scipy.sparse

from caffe_utils import measure, scaling
from caffe_utils.measure import channel_stats as _channel_stats
from caffe_utils.measure import flatness as _flatness
from caffe_utils.measure import sq as _sq
from caffe_utils.measure import weight_columns as _columns
from caffe_utils.engine import set_data as _set_input
from caffe_utils.errors import DataError, PrototxtError
from caffe_utils.layers.im2col import im2col_batch, out_shape
from caffe_utils.schema import caffe_pb2

INIT_TYPES = ("gaussian", "pca", "zca", "kmeans", "rand", "xavier", "msra", "orthogonal")
DATA_DRIVEN = ("pca", "zca", "kmeans", "rand")
AFFINE = scaling.AFFINE_TYPES
DATA_LAYERS = ("Data", "ImageData", "MemoryData", "HDF5Data", "WindowData", "DummyData", "Input")

Progress = Callable[[str, int, int], None]


@dataclass
class InitOptions:
    init: str = "kmeans"
    within: bool = True
    between: bool = True
    beta: float = 0.1
    iterations: int = 10
    damping: float = 0.5
    tolerance: float = 0.01
    rate_images: int = 64  # images over which the change rates are calibrated (see _between)
    zero_classifier: bool = False
    reinit: Sequence[str] = ()
    reinit_all: bool = False
    batch_size: int = 16
    mem_limit: int = 1 << 30
    seed: int = 0


@dataclass
class LayerReport:
    name: str
    type: str
    initialized: str = "kept"
    rate_before: float = float("nan")
    rate_after: float = float("nan")
    cv_before: float = float("nan")
    cv_after: float = float("nan")
    act_mean: float = float("nan")
    act_std: float = float("nan")
    channel_std_cv: float = float("nan")
    dead_channels: int = 0


@dataclass
class InitReport:
    layers: List[LayerReport] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False
    flatness_before: float = float("nan")
    flatness_after: float = float("nan")
    #: the fixed batch's flatness after each between-layer round (the last one is flatness_after)
    flatness_rounds: List[float] = field(default_factory=list)
    inexact_layers: List[str] = field(default_factory=list)
    pinned_layers: List[str] = field(default_factory=list)
    output_deviation: Optional[float] = None
    function_preserved: Optional[bool] = None
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v
        return clean(asdict(self))


# ----------------------------------------------------------------------------- net preparation

@dataclass
class PreparedNet:
    net_param: object          # the NetParameter to build the engine net from
    input_name: str
    input_shape: Tuple[int, int, int]  # C, H, W
    transform_param: object    # TransformationParameter of the original data layer (or None)
    data_source: Optional[str] = None  # source of the original data layer, if any
    data_root: Optional[str] = None


def _fix_shape(lp) -> Optional[Tuple[int, ...]]:
    if lp.type == "Input" and len(lp.input_param.shape):
        return tuple(lp.input_param.shape[0].dim)
    if lp.type == "MemoryData":
        p = lp.memory_data_param
        return (p.batch_size, p.channels, p.height, p.width)
    crop = lp.transform_param.crop_size
    if lp.type == "ImageData":
        p = lp.image_data_param
        c = 3 if p.is_color else 1
        if crop:
            return (p.batch_size, c, crop, crop)
        if p.new_height and p.new_width:
            return (p.batch_size, c, p.new_height, p.new_width)
    if lp.type in ("Data", "WindowData") and crop:
        return (1, 3, crop, crop)
    return None


def prepare_net(net_param, image_shape: Optional[Tuple[int, int, int]] = None) -> PreparedNet:
    """The net the initialization runs: data layers become one Input, loss/softmax sinks go.

    ``image_shape`` (C, H, W) is needed when the net's data layer does not tell its crop size.
    """
    pb2 = caffe_pb2()
    lps = list(net_param.layer)
    data = [lp for lp in lps if lp.type in DATA_LAYERS]
    if not data:
        raise PrototxtError("the net has no input: add an Input layer (or input/input_shape) for the images")
    first = data[0]
    if not len(first.top):
        raise PrototxtError(f"data layer '{first.name}' has no top")
    name = first.top[0]
    shape = _fix_shape(first)
    if shape is not None and len(shape) != 4:
        raise PrototxtError(f"input '{name}' has shape {shape}; magic-init needs images (N, C, H, W)")
    chw = tuple(shape[1:]) if shape is not None else image_shape
    if chw is None:
        raise PrototxtError(f"data layer '{first.name}' ({first.type}) does not tell its image size; "
                            "give the net an Input layer or a transform_param crop_size")
    if min(chw) <= 0:
        raise PrototxtError(f"input '{name}' of layer '{first.name}' has channels, height, width {tuple(chw)}; "
                            "all three must be positive")
    source = root = None
    if first.type == "ImageData":
        source, root = first.image_data_param.source, first.image_data_param.root_folder or None
    elif first.type == "Data":
        source = first.data_param.source
    out = pb2.NetParameter()
    out.name = net_param.name
    out.state.CopyFrom(net_param.state)
    inp = out.layer.add(name=first.name, type="Input")
    inp.top.append(name)
    inp.input_param.shape.add().dim.extend([1, *chw])
    other_inputs = [t for lp in data for t in lp.top if t != name]
    kept = [lp for lp in lps if lp.type not in DATA_LAYERS]
    # drop sinks (loss, accuracy, softmax, silence...) whose tops nothing needs, repeatedly
    while True:
        consumed = {b for lp in kept for b in lp.bottom}
        drop = [lp for lp in kept if lp.type in scaling.TERMINAL and not (set(lp.top) & consumed)]
        if not drop:
            break
        kept = [lp for lp in kept if lp not in drop]
    needs = {b for lp in kept for b in lp.bottom}
    missing = sorted(needs & set(other_inputs))
    if missing:
        raise PrototxtError(f"layers need input(s) {missing} besides the images '{name}'; "
                            "magic-init feeds only images: remove those layers or use a deploy net")
    for lp in kept:
        out.layer.add().CopyFrom(lp)
    if not any(lp.type in AFFINE for lp in kept):
        raise PrototxtError("the net has no Convolution, InnerProduct or Deconvolution layer to initialize")
    tp = first.transform_param if first.HasField("transform_param") else None
    return PreparedNet(out, name, tuple(int(d) for d in chw), tp, source, root)


# ----------------------------------------------------------------------------- helpers

def conv_geometry(cp) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    """Caffe's 2-D kernel, pad, stride, dilation from a ConvolutionParameter."""
    def pick(rep, h_field, w_field, default):
        if cp.HasField(h_field) or cp.HasField(w_field):
            return (getattr(cp, h_field), getattr(cp, w_field))
        vals = list(rep)
        if not vals:
            return (default, default)
        return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])
    kernel = pick(cp.kernel_size, "kernel_h", "kernel_w", 0)
    pad = pick(cp.pad, "pad_h", "pad_w", 0)
    stride = pick(cp.stride, "stride_h", "stride_w", 1)
    dil = list(cp.dilation)
    dilation = (1, 1) if not dil else ((dil[0], dil[0]) if len(dil) == 1 else (dil[0], dil[1]))
    return kernel, pad, stride, dilation


def _layer_index(net) -> Dict[str, int]:
    return {n: i for i, n in enumerate(net.layer_names)}


def _frontier(net, pos: int) -> List[str]:
    """Blob names produced before layer ``pos`` and read by a layer at or after it."""
    lps = list(net.net_param.layer)
    produced: Set[str] = set()
    for lp in lps[:pos]:
        produced.update(lp.top)
    needed: List[str] = []
    for lp in lps[pos:]:
        for b in lp.bottom:
            if b in produced and b not in needed:
                needed.append(b)
        for t in lp.top:
            if t not in lp.bottom:
                produced.discard(t)
    return needed


class _Runner:
    """Runs the sample through the net in batches from the latest affordable checkpoint."""

    def __init__(self, net, prepared: PreparedNet, sample: np.ndarray, batch: int, mem_limit: int,
                 progress: Optional[Progress]) -> None:
        self.net = net
        self.names = net.layer_names
        self.input = prepared.input_name
        self.n = sample.shape[0]
        self.batch = batch
        self.nb = int(math.ceil(self.n / batch))
        pad = self.nb * batch - self.n
        self.sample = np.concatenate([sample, sample[:pad]]) if pad else sample
        self.mem_limit = mem_limit
        self.ckpt_pos = 1  # layer 0 is the Input layer
        self.ckpt: Dict[str, np.ndarray] = {self.input: self.sample}
        self.progress = progress

    def valid(self, b: int) -> int:
        """How many rows of batch ``b`` are real images (the last batch is padded)."""
        return min(self.batch, self.n - b * self.batch)

    def run(self, b: int, upto: int) -> None:
        """Leave the net's blobs as after layers 0..``upto`` on batch ``b``."""
        sl = slice(b * self.batch, (b + 1) * self.batch)
        for name, arr in self.ckpt.items():
            _set_input(self.net, name, arr[sl])
        if upto >= self.ckpt_pos:
            self.net.forward(start=self.names[self.ckpt_pos], end=self.names[upto])

    def frontier_bytes(self, pos: int) -> int:
        return sum(int(np.prod(self.net.blobs[n].data.shape[1:])) * 4 * self.nb * self.batch
                   for n in _frontier(self.net, pos))

    def start_checkpoint(self, pos: int) -> Optional[Dict[str, np.ndarray]]:
        """Buffers for a checkpoint at ``pos`` if it fits in memory (filled by :meth:`store`).

        The old checkpoint lives until the new one is complete, so each may take half the limit."""
        if pos <= self.ckpt_pos or self.frontier_bytes(pos) > self.mem_limit // 2:
            return None
        return {n: np.empty((self.nb * self.batch,) + tuple(self.net.blobs[n].data.shape[1:]), np.float32)
                for n in _frontier(self.net, pos)}

    def store(self, buf: Optional[Dict[str, np.ndarray]], b: int) -> None:
        if buf is not None:
            sl = slice(b * self.batch, (b + 1) * self.batch)
            for n, arr in buf.items():
                arr[sl] = self.net.blobs[n].data

    def commit(self, buf: Optional[Dict[str, np.ndarray]], pos: int) -> None:
        if buf is not None:
            self.ckpt = buf
            self.ckpt_pos = pos


def _gaussian(shape, rng: np.random.RandomState, std: float = 0.01) -> np.ndarray:
    """N(0, std^2) float32 weights, drawn by a PCG64 generator seeded from ``rng`` (float32
    ziggurat: about twice as fast here as RandomState's float64 draws, CaffeNet fc6 0.5-0.75 s
    against 1.3-1.5 s, and no float64 copy of fc6)."""
    gen = np.random.Generator(np.random.PCG64(rng.randint(0, 2 ** 31)))
    w = gen.standard_normal(shape, dtype=np.float32)
    w *= np.float32(std)
    return w


def _orthogonal(shape, rng) -> np.ndarray:
    rows = shape[0]
    cols = int(np.prod(shape[1:]))
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))
    w = q if rows >= cols else q.T
    return w[:rows, :cols].reshape(shape).astype(np.float32)


def _filler(kind: str, shape, rng) -> np.ndarray:
    from caffe_utils.fillers import fill
    return fill(caffe_pb2().FillerParameter(type=kind), shape, rng)


def _whitening(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigen-decomposition of the patch covariance: (eigvals desc (float64), eigvecs (D,D) (float32),
    1/sqrt(l+eps) (float64))."""
    cov = (x @ x.T) / np.float32(x.shape[1])
    # float32 divide-and-conquer: twice as fast as numpy's float64 eigh for D ~ 2000; its error
    # (~1e-7 of the largest eigenvalue) is far below the eps that regularises the small ones
    try:
        lam, u = scipy.linalg.eigh(cov, driver="evd", check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        lam, u = np.linalg.eigh(cov.astype(np.float64))
    lam = lam.astype(np.float64)
    lam, u = lam[::-1].clip(min=0), u[:, ::-1]
    eps = 1e-2 * float(lam.mean()) + 1e-12
    return lam, u, 1.0 / np.sqrt(lam + eps)


def data_driven_weights(kind: str, patches: np.ndarray, k: int, rng: np.random.RandomState,
                        kmeans_iters: int = 10, overwrite: bool = False) -> np.ndarray:
    """``k`` filters (k, D) from patches (D, M), centred, by ``pca``/``zca``/``kmeans``/``rand``.

    With ``overwrite`` a float32 ``patches`` array is centred in place (saves a copy of it)."""
    d, m = patches.shape
    x = patches if overwrite and patches.dtype == np.float32 else patches.astype(np.float32)
    x -= x.mean(axis=1, keepdims=True)
    if kind == "rand":
        idx = rng.choice(m, k, replace=m < k)
        w = x[:, idx].T
        return w / (np.linalg.norm(w, axis=1, keepdims=True) + 1e-12)
    lam, u, inv = _whitening(x)
    if kind == "pca":
        n = min(k, d)
        w = (u[:, :n] * inv[:n]).T
        if k > d:
            extra = rng.standard_normal((k - d, d)) @ (u * inv).T
            w = np.vstack([w, extra / np.sqrt(d)])
        return w
    zca = (u * inv.astype(u.dtype)) @ u.T
    if kind == "zca":
        rows = rng.choice(d, min(k, d), replace=False)
        w = zca[rows]
        if k > d:
            w = np.vstack([w, rng.standard_normal((k - d, d)) @ zca / np.sqrt(d)])
        return w
    # spherical k-means on whitened, unit-length patches (Coates & Ng 2012)
    zca = zca.astype(np.float32)
    xw = x.T @ zca                          # (m, d): a whitened patch per row (zca is symmetric)
    del x
    xw /= np.linalg.norm(xw, axis=1, keepdims=True) + 1e-8
    centers = rng.standard_normal((d, k)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=0, keepdims=True)
    centers = spherical_kmeans(xw, centers, kmeans_iters, rng)
    return centers.T @ zca


def spherical_kmeans(xw: np.ndarray, centers: np.ndarray, iters: int, rng: np.random.RandomState) -> np.ndarray:
    """``iters`` rounds of spherical k-means (Coates & Ng 2012) from unit ``centers`` (d, k) on
    unit patches ``xw`` (m, d): each patch joins the centre with the largest ``|dot|``, each centre
    becomes its old self plus the sum of its members weighted by their dots, renormalised. A
    centre without members is re-seeded with a random patch. Returns the centres (d, k).

    The members' weighted sums are one sparse (k, m) by dense (m, d) product (m*d work) rather
    than a product with a dense (m, k) assignment matrix (m*d*k)."""
    m = xw.shape[0]
    k = centers.shape[1]
    rows = np.arange(m)
    for _ in range(iters):
        s = xw @ centers                          # (m, k)
        best = np.argmax(np.abs(s), axis=1)
        coef = s[rows, best]
        assign = scipy.sparse.csr_matrix((coef, (best, rows)), shape=(k, m))
        new = np.asarray(assign @ xw, dtype=np.float32)   # (k, d)
        norms = np.linalg.norm(new, axis=1)
        empty = norms < 1e-12
        if np.any(empty):  # re-seed empty clusters with random patches
            new[empty] = xw[rng.choice(m, int(empty.sum()), replace=m < empty.sum())]
        centers = new.T + centers
        centers /= np.linalg.norm(centers, axis=0, keepdims=True) + 1e-12
    return centers


def _num_out(lp) -> int:
    return lp.inner_product_param.num_output if lp.type == "InnerProduct" else lp.convolution_param.num_output


def _out_axis_view(lp, w: np.ndarray) -> np.ndarray:
    """Weights as (num_output, fan) rows, regardless of the layer's storage layout (a copy)."""
    if lp.type == "InnerProduct" and lp.inner_product_param.transpose:
        return w.T.copy()
    if lp.type == "Deconvolution":
        g = lp.convolution_param.group
        cin, opg = w.shape[0], w.shape[1]
        return w.reshape(g, cin // g, opg, -1).transpose(0, 2, 1, 3).reshape(g * opg, -1)
    return w.reshape(w.shape[0], -1).copy()


def _scale_rows(lp, blobs, factors: np.ndarray, shift: Optional[np.ndarray]) -> None:
    scaling.scale_output_channels(lp.type, lp, blobs, factors)
    if shift is not None and len(blobs) > 1:
        blobs[1].data[...] += shift.astype(np.float32).reshape(blobs[1].data.shape)


def _is_initialized(blobs) -> bool:
    return any(b.data.any() for b in blobs)  # ndarray.any: no temporary of the blob's size


# ----------------------------------------------------------------------------- main entry

def initialize(net, prepared: PreparedNet, sample: np.ndarray, options: InitOptions,
               loaded: Set[str] = frozenset(), progress: Optional[Progress] = None) -> InitReport:
    """Initialize ``net`` in place (see module docstring); returns the per-layer report.

    ``loaded`` names the layers whose weights came from a caffemodel.
    """
    opts = options
    if opts.init not in INIT_TYPES:
        raise PrototxtError(f"unknown init type '{opts.init}'; choose one of {', '.join(INIT_TYPES)}")
    rng = np.random.RandomState(opts.seed)
    report = InitReport()
    lps = list(net.net_param.layer)
    index = _layer_index(net)
    affine = [lp for lp in lps if lp.type in AFFINE]
    reports = OrderedDict((lp.name, LayerReport(lp.name, lp.type)) for lp in affine)
    reinit = set(opts.reinit)
    unknown = sorted(reinit - {lp.name for lp in lps})
    if unknown:
        raise PrototxtError(f"--reinit names layer(s) {unknown} that the net does not have")
    todo = []
    for lp in lps:
        if lp.type not in AFFINE and lp.type != "BatchNorm":
            continue
        blobs = net.params[lp.name]
        fresh = opts.reinit_all or lp.name in reinit or lp.name not in loaded or not _is_initialized(blobs)
        if fresh:
            todo.append(lp)
    runner = _Runner(net, prepared, sample, opts.batch_size, opts.mem_limit, progress)
    for step, lp in enumerate(todo):
        if progress:
            progress("within-layer", step, len(todo))
        idx = index[lp.name]
        if lp.type == "BatchNorm":
            _init_batchnorm(net, runner, lp, idx)
            continue
        rep = reports[lp.name]
        _init_weights(net, runner, lp, idx, opts, rng, rep, report)
        if opts.within:
            _normalize_within(net, runner, lp, idx, opts, rep, report)
        else:
            buf = runner.start_checkpoint(idx + 1)
            for b in range(runner.nb):
                runner.run(b, idx)
                runner.store(buf, b)
            runner.commit(buf, idx + 1)
    if progress and todo:
        progress("within-layer", len(todo), len(todo))
    del runner
    plan = scaling.build_plan(net)
    report.inexact_layers = list(plan.inexact)
    report.pinned_layers = [n for n in plan.affine if plan.group_of[n] in plan.pinned]
    _between(net, prepared, sample, opts, plan, reports, report, progress)
    if opts.zero_classifier:
        last = affine[-1]
        for b in net.params[last.name]:
            b.data[...] = 0
        reports[last.name].initialized += " (zeroed)"
    report.layers = list(reports.values())
    for name in net.params:
        for b in net.params[name]:
            if b.data.size and not (np.isfinite(b.data.min()) and np.isfinite(b.data.max())):  # NaN propagates
                raise DataError(f"layer '{name}' got non-finite weights; the sample may be degenerate "
                                "(constant images?): use more varied images")
    return report


def _init_batchnorm(net, runner: _Runner, lp, idx: int) -> None:
    """Stored statistics of a BatchNorm layer from the sample (Caffe's unbiased variance)."""
    s1 = s2 = None
    count = 0
    buf = runner.start_checkpoint(idx)
    for b in range(runner.nb):
        runner.run(b, idx - 1)
        runner.store(buf, b)
        a, q, c = _channel_stats(net.blobs[lp.bottom[0]].data, runner.valid(b))
        s1 = a if s1 is None else s1 + a
        s2 = q if s2 is None else s2 + q
        count += c
    runner.commit(buf, idx)
    mean = s1 / count
    var = np.maximum(s2 / count - mean * mean, 0) * (count / max(count - 1, 1))
    blobs = net.params[lp.name]
    blobs[0].data[...] = mean.astype(np.float32)
    blobs[1].data[...] = var.astype(np.float32)
    blobs[2].data[...] = 1.0


def _init_weights(net, runner: _Runner, lp, idx: int, opts: InitOptions, rng, rep: LayerReport,
                  report: InitReport) -> None:
    blobs = net.params[lp.name]
    w = blobs[0].data
    kind = opts.init
    if kind in DATA_DRIVEN and lp.type != "Convolution":
        kind = "gaussian"
        rep.initialized = "gaussian (data-driven init is for convolutions)"
    if kind in DATA_DRIVEN:
        done = _data_driven(net, runner, lp, idx, kind, opts, rng, rep, report)
        if done:
            return
        kind = "gaussian"
    if kind == "gaussian":
        w[...] = _gaussian(w.shape, rng)
    elif kind == "orthogonal":
        rows = _orthogonal((_num_out(lp), w.size // _num_out(lp)), rng)
        blobs[0].data[...] = 0
        _set_rows(lp, blobs[0], rows)
    else:
        w[...] = _filler(kind, w.shape, rng)
    if len(blobs) > 1:
        blobs[1].data[...] = 0
    if rep.initialized == "kept":
        rep.initialized = kind


def _set_rows(lp, blob, rows: np.ndarray) -> None:
    """Write (num_output, fan) rows into the layer's weight blob layout."""
    w = blob.data
    if lp.type == "InnerProduct" and lp.inner_product_param.transpose:
        w[...] = rows.T
    elif lp.type == "Deconvolution":
        g = lp.convolution_param.group
        cin, opg = w.shape[0], w.shape[1]
        w[...] = rows.reshape(g, opg, cin // g, -1).transpose(0, 2, 1, 3).reshape(w.shape)
    else:
        w[...] = rows.reshape(w.shape)


def _data_driven(net, runner: _Runner, lp, idx: int, kind: str, opts: InitOptions, rng,
                 rep: LayerReport, report: InitReport) -> bool:
    cp = lp.convolution_param
    kernel, pad, stride, dilation = conv_geometry(cp)
    groups = cp.group
    bottom = lp.bottom[0]
    shape = net.blobs[bottom].data.shape
    c = shape[1]
    cpg = c // groups
    d = cpg * kernel[0] * kernel[1]
    k = cp.num_output // groups
    oh, ow = out_shape(shape[2:], kernel, pad, stride, dilation)
    total = runner.n * oh * ow
    # enough patches for a regularised covariance (2 per dimension) and k-means (10 per centre:
    # an initialization needs directions, not a converged dictionary), bounded by --mem-limit
    cap = max(1, min(2 * d + 10 * k, 100_000, int(opts.mem_limit // (4 * d * groups * 3))))
    want = min(total, cap)
    per_image = min(int(math.ceil(want / runner.n)), oh * ow)
    patches = np.empty((groups, d, per_image * runner.n), np.float32)
    m = 0
    buf = runner.start_checkpoint(idx)
    for b in range(runner.nb):
        runner.run(b, idx - 1)
        runner.store(buf, b)
        x = net.blobs[bottom].data[:runner.valid(b)]
        for i in range(x.shape[0]):
            cols = im2col_batch(x[i:i + 1], kernel, pad, stride, dilation)  # (C*kh*kw, oh*ow)
            pick = rng.choice(cols.shape[1], per_image, replace=False)
            patches[:, :, m:m + per_image] = cols[:, pick].reshape(groups, d, per_image)
            m += per_image
    runner.commit(buf, idx)
    need = max(d + 1, 4 * k) if kind in ("kmeans", "pca", "zca") else k
    if m < need:
        msg = (f"layer '{lp.name}': only {m} input patches for {kind} with {k} filters of size {d} "
               f"(need {need}); using gaussian weights: give more images (-n) to use {kind}")
        report.warnings.append(msg)
        rep.initialized = f"gaussian (too few patches for {kind})"
        return False
    rows = [data_driven_weights(kind, patches[g, :, :m], k, rng, overwrite=True) for g in range(groups)]
    del patches
    w = np.vstack(rows).astype(np.float32)
    blobs = net.params[lp.name]
    _set_rows(lp, blobs[0], w)
    if len(blobs) > 1:
        blobs[1].data[...] = 0
    rep.initialized = kind
    return True


def _normalize_within(net, runner: _Runner, lp, idx: int, opts: InitOptions, rep: LayerReport,
                      report: InitReport) -> None:
    top = lp.top[0]
    s1 = s2 = None
    count = 0
    buf = runner.start_checkpoint(idx + 1)
    for b in range(runner.nb):
        runner.run(b, idx)
        runner.store(buf, b)
        a, q, c = _channel_stats(net.blobs[top].data, runner.valid(b))
        s1 = a if s1 is None else s1 + a
        s2 = q if s2 is None else s2 + q
        count += c
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean * mean, 0))
    dead = std <= 1e-6 * max(float(std.max()), 1e-30)
    if np.any(dead):
        rep.dead_channels = int(dead.sum())
        report.warnings.append(
            f"layer '{lp.name}': {int(dead.sum())} of {dead.size} output channels are constant on the sample "
            "(dead); they keep their weights and get mean beta: use more varied images or another --init")
    safe = np.where(dead, 1.0, std)
    scale = 1.0 / safe
    blobs = net.params[lp.name]
    if len(blobs) > 1:
        b_old = blobs[1].data.astype(np.float64).reshape(-1)
        new_b = (b_old - mean) * scale + opts.beta
        scaling.scale_output_channels(lp.type, lp, blobs[:1], scale)
        blobs[1].data[...] = new_b.astype(np.float32).reshape(blobs[1].data.shape)
    else:
        scaling.scale_output_channels(lp.type, lp, blobs, scale)
    if buf is not None and top in buf:  # the checkpointed top, corrected without re-running
        t = buf[top]
        shape = (1, -1) + (1,) * (t.ndim - 2)
        if len(blobs) > 1:
            t -= mean.astype(np.float32).reshape(shape)
            t *= scale.astype(np.float32).reshape(shape)
            t += np.float32(opts.beta)
        else:
            t *= scale.astype(np.float32).reshape(shape)
    runner.commit(buf, idx + 1)
    if rep.initialized == "kept":
        rep.initialized = opts.init


# ----------------------------------------------------------------------------- between-layer

def _measure(net, affine_lps, eta: Dict[str, np.ndarray], with_cv: bool = False,
             degree_layers: Sequence[str] = ()) -> Tuple[Dict[str, float], Dict[str, float], Dict[str, float]]:
    """Change rates ``sqrt(|dW|^2 / |W|^2)`` under the fixed random top gradient ``eta``, the
    columns' rate variation (``with_cv``) and the effective degrees of ``degree_layers``."""
    degrees = scaling.forward_estimating_degrees(net, degree_layers)
    for name, e in eta.items():
        net.blobs[name].diff[...] = e
    net.clear_param_diffs()
    net.backward()
    rates = {}
    for lp in affine_lps:
        w = net.params[lp.name][0]
        w2 = _sq(w.data)
        rates[lp.name] = math.sqrt(_sq(w.diff) / w2) if w2 > 0 else float("nan")
    return rates, (_column_cvs(net, affine_lps) if with_cv else {}), degrees


def _column_cvs(net, affine_lps) -> Dict[str, float]:
    """Coefficient of variation of the change rate across each layer's input columns, from
    the parameter diffs of the last measurement."""
    cvs = {}
    for lp in affine_lps:
        cw = _columns(lp, net.params[lp.name][0].diff)
        col = measure.column_energies(cw)
        cvs[lp.name] = float(col.std() / col.mean()) if col.mean() > 0 else float("nan")
    return cvs


def _geomean(values: Sequence[float]) -> float:
    v = [x for x in values if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


def _target(plan: scaling.ScalePlan, rates: Dict[str, float], degrees: Dict[str, float],
            energies: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> float:
    """The common change rate to aim for: the one that the pinned layers (whose output is the
    net's output) reach too (see :func:`scaling.reachable_target`); without pinned layers the
    geometric mean of all rates, which keeps the overall learning speed."""
    log_rates = {}
    for g, members in plan.groups.items():
        cg = _geomean([rates[m] for m in members])
        if math.isfinite(cg) and cg > 0:
            log_rates[g] = math.log(cg)
    t = scaling.reachable_target(plan, log_rates, energies, degrees) if log_rates else None
    return math.exp(t) if t is not None else _geomean(rates.values())


def _energies(net, plan: scaling.ScalePlan, lps) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Per consumer: the gradient and weight energy of each input column (last backward pass)."""
    return {c.layer: (scaling.input_energies(c.layer_type, lps[c.layer], net.params[c.layer][0].diff),
                      scaling.input_energies(c.layer_type, lps[c.layer], net.params[c.layer][0].data))
            for c in plan.consumers}


def _between_batch(net, opts: InitOptions) -> int:
    """The batch for the between-layer stage: --batch-size, or fewer images when the blobs'
    data and diffs would not fit in --mem-limit (the calibration over rate_images keeps the
    rates' estimate from depending on it)."""
    per_image = sum(2 * 4 * int(np.prod(b.data.shape[1:])) for b in net.blobs.values())
    return int(max(1, min(opts.batch_size, opts.mem_limit // max(per_image, 1))))


def _between(net, prepared: PreparedNet, sample: np.ndarray, opts: InitOptions, plan: scaling.ScalePlan,
             reports: "OrderedDict[str, LayerReport]", report: InitReport, progress: Optional[Progress]) -> None:
    lps = {lp.name: lp for lp in net.net_param.layer}
    affine_lps = [lps[n] for n in plan.affine]
    size = _between_batch(net, opts)
    if size < net.blobs[prepared.input_name].data.shape[0]:
        net.blobs[prepared.input_name].reshape(size, *net.blobs[prepared.input_name].data.shape[1:])
        net.reshape()
    batch = sample[:size]
    if batch.shape[0] < size:
        batch = np.concatenate([batch] * int(math.ceil(size / batch.shape[0])))[:size]
    if hasattr(net, "input_diffs"):
        net.input_diffs = False  # the rates need parameter diffs only
    # The rounds re-measure on one batch under one fixed eta (cheap and deterministic), whose
    # rates differ from the expectation over images and gradients by a per-layer factor (conv1's
    # rate depends much on the images). That factor does not change when layers are rescaled,
    # so it is measured once, over up to rate_images images with a fresh eta per batch, and
    # every round's rates are multiplied by it. It is measured first, so that the diffs the
    # first round reads (the columns' gradient energies) are the fixed batch's.
    n_cal = min(int(sample.shape[0]), max(opts.rate_images, opts.batch_size))
    avg = None
    if n_cal > opts.batch_size:
        avg = measure.rates_of(measure.measure(net, prepared.input_name, sample[:n_cal], seed=opts.seed + 2,
                                               layers=[lp.name for lp in affine_lps]))
    _set_input(net, prepared.input_name, batch)
    out_rng = np.random.RandomState(opts.seed + 1)
    eta = {o: out_rng.standard_normal(net.blobs[o].data.shape).astype(np.float32) for o in net.outputs}
    degree_layers = plan.degree_layers
    rates, cvs, degrees = _measure(net, affine_lps, eta, with_cv=True, degree_layers=degree_layers)
    # _measure's forward pass left the outputs as the unscaled net computes them
    before_out = {o: np.array(net.blobs[o].data, np.float64) for o in net.outputs}
    kappa = {n: 1.0 for n in rates}
    if avg is not None:
        kappa = {n: (avg[n] / r if r > 0 and math.isfinite(r) and avg[n] > 0 else 1.0) for n, r in rates.items()}
    rates = {n: r * kappa[n] for n, r in rates.items()}
    for n, r in rates.items():
        reports[n].rate_before, reports[n].cv_before = r, cvs[n]
    report.flatness_before = _flatness(rates)
    groups = plan.groups
    it = 0
    if opts.between:
        for it in range(1, opts.iterations + 1):
            if progress:
                progress("between-layer", it - 1, opts.iterations)
            energies = _energies(net, plan, lps)
            target = _target(plan, rates, degrees, energies)
            if all(abs(r / target - 1) <= opts.tolerance for r in rates.values() if math.isfinite(r) and r > 0):
                report.converged = True
                it -= 1
                break
            own = {}
            for g, members in groups.items():
                cg = _geomean([rates[m] for m in members])
                if g not in plan.pinned and math.isfinite(cg) and cg > 0:
                    own[g] = (opts.damping / 2.0) * math.log(cg / target)
            rho = scaling.cumulative_log_scales(plan, own, energies, degrees)
            scaling.apply_scales(net, plan, {g: math.exp(r) for g, r in rho.items()}, degrees)
            rates, cvs, degrees = _measure(net, affine_lps, eta, degree_layers=degree_layers)
            rates = {n: r * kappa[n] for n, r in rates.items()}
            report.flatness_rounds.append(_flatness(rates))
        else:
            target = _target(plan, rates, degrees, _energies(net, plan, lps))
            report.converged = all(abs(r / target - 1) <= opts.tolerance
                                   for r in rates.values() if math.isfinite(r) and r > 0)
        if progress:
            progress("between-layer", opts.iterations, opts.iterations)
    report.iterations = it
    cvs = _column_cvs(net, affine_lps)
    for n, r in rates.items():
        reports[n].rate_after, reports[n].cv_after = r, cvs[n]
    report.flatness_after = _flatness(rates)
    # activation statistics of every affine layer's output on the batch, read right after the
    # layer runs (before an in-place nonlinearity overwrites it); one forward pass in all
    index = _layer_index(net)
    names = net.layer_names
    start = 1
    for lp in affine_lps:
        idx = index[lp.name]
        net.forward(start=names[start], end=names[idx])
        start = idx + 1
        top = net.blobs[lp.top[0]].data
        a, q, c = _channel_stats(top, top.shape[0])
        mean = a / c
        std = np.sqrt(np.maximum(q / c - mean * mean, 0))
        rep = reports[lp.name]
        rep.act_mean, rep.act_std = float(mean.mean()), float(std.mean())
        rep.channel_std_cv = float(std.std() / std.mean()) if std.mean() > 0 else float("nan")
    if start < len(names):
        net.forward(start=names[start])
    if opts.between:
        # the between-layer stage must not change what the net computes (up to layers that
        # cannot undo a scale exactly): measure it on the batch
        dev = 0.0
        for o in net.outputs:
            ref = before_out[o]
            diff = float(np.max(np.abs(np.asarray(net.blobs[o].data, np.float64) - ref))) if ref.size else 0.0
            dev = max(dev, diff / max(float(np.max(np.abs(ref))), 1e-12))
        report.output_deviation = dev
        report.function_preserved = dev <= 1e-4
    if hasattr(net, "input_diffs"):
        net.input_diffs = True
