"""What every stage works on: the net, the options, the sample's batches and the report.

:class:`SampleBatches` runs the sample through the net batch by batch. Stages 1 and 2 visit the
layers in topological order and each needs the real input (or output) of one layer on every
image, so the sample's activations are kept at a checkpoint: the blobs that later layers still
read, stored once they fit in half of ``mem_limit`` (the old checkpoint lives until the new one
is complete). A blob of the new checkpoint that no layer since the old one wrote is the old
checkpoint's array, not a copy (an inception module's input is kept once for all its
branches). A batch then runs from the checkpoint instead of from the images; without one it
is recomputed from the last checkpoint. The stages see only :meth:`SampleBatches.through`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import numpy as np

from caffe_utils.errors import DataError, PrototxtError
from caffe_utils.layout import AFFINE_TYPES
from caffe_utils.magic.options import INIT_TYPES, InitOptions
from caffe_utils.magic.prepare import PreparedNet
from caffe_utils.magic.report import InitReport, LayerReport

Progress = Callable[[str, int, int], None]


def frontier(net, pos: int) -> List[str]:
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


class SampleBatches:
    """The sample in batches of the net's input size, run from the latest affordable checkpoint."""

    def __init__(self, net, input_name: str, sample: np.ndarray, batch: int, mem_limit: int,
                 aux: Optional[Dict[str, np.ndarray]] = None) -> None:
        """``aux``: the auxiliary inputs (``im_info``), one row per image of ``sample``; they
        are fed with the images, batch by batch."""
        self.net = net
        self.names = net.layer_names
        self.n = sample.shape[0]
        self.batch = batch
        self.count = int(math.ceil(self.n / batch))
        pad = self.count * batch - self.n
        # the last batch is filled up by repeating images (fewer images than a batch included)
        padded = np.concatenate([sample, np.resize(sample, (pad,) + sample.shape[1:])]) if pad else sample
        self.mem_limit = mem_limit
        self._pos = 1  # layer 0 is the Input layer
        self._blobs: Dict[str, np.ndarray] = {input_name: padded}
        for name, rows in (aux or {}).items():
            self._blobs[name] = np.concatenate([rows, np.resize(rows, (pad,) + rows.shape[1:])]) if pad else rows
        #: the sample's own arrays (the images and ``aux``), which no checkpoint overwrites
        self._inputs = set(self._blobs)
        self._fresh: Optional[Dict[str, np.ndarray]] = None

    def valid(self, b: int) -> int:
        """How many rows of batch ``b`` are real images (the last batch is padded)."""
        return min(self.batch, self.n - b * self.batch)

    def through(self, upto: int) -> Iterator[int]:
        """For every batch, leave the blobs layer ``upto + 1`` reads and those layer ``upto``
        writes as after layers 0..``upto`` and yield how many of the batch's rows are real
        images (other blobs may hold another batch's values). The blobs layers after ``upto``
        read become the new checkpoint when they fit (see :meth:`checkpointed`)."""
        self._fresh = None
        written = self._written(upto)
        buf = self._start(upto + 1, written)
        stored = [n for n in buf if n in written] if buf is not None else []
        fed = self._fed(upto)
        try:
            for b in range(self.count):
                sl = slice(b * self.batch, (b + 1) * self.batch)
                bound = {}
                for n in stored:  # the layer writing n writes its checkpoint rows where it can
                    rows = buf[n][sl]
                    if self.net.bind_data(n, rows):
                        bound[n] = rows
                self._run(b, upto, fed)
                for n in stored:  # a layer may have replaced a bound array (Split shares its bottom's)
                    if self.net.blobs[n].data is not bound.get(n):
                        buf[n][sl] = self.net.blobs[n].data
                yield self.valid(b)
        finally:
            self.net.unbind_data()
        if buf is not None:
            self._fresh = {n: buf[n] for n in stored}
            self._blobs, self._pos = buf, upto + 1

    def checkpointed(self, name: str) -> Optional[np.ndarray]:
        """Blob ``name`` over the whole sample, when the last :meth:`through` wrote it into its
        checkpoint (a stage that changes a layer's output corrects it there instead of
        re-running)."""
        return None if self._fresh is None else self._fresh.get(name)

    def _written(self, upto: int) -> Set[str]:
        """The blobs layers ``_pos``..``upto`` write (their tops, in-place ones included)."""
        lps = self.net.net_param.layer
        return {t for lp in lps[self._pos:upto + 1] for t in lp.top}

    def _fed(self, upto: int) -> List[str]:
        """The checkpoint's blobs a batch must set in the net: those layers ``_pos``..``upto``
        and the next layer read, and those layer ``upto`` writes (all of them when the
        checkpoint lies past ``upto + 1``)."""
        lps = self.net.net_param.layer
        if upto + 1 < self._pos:
            return list(self._blobs)
        read = {b for lp in lps[self._pos:upto + 2] for b in lp.bottom} | set(lps[upto].top)
        return [n for n in self._blobs if n in read]

    def _run(self, b: int, upto: int, fed: List[str]) -> None:
        sl = slice(b * self.batch, (b + 1) * self.batch)
        for name in fed:
            rows = self._blobs[name][sl]
            if not _same_memory(self.net.blobs[name].data, rows):  # else bound to these rows
                self.net.set_data(name, rows)
        if upto >= self._pos:
            self.net.forward(start=self.names[self._pos], end=self.names[upto])

    def _start(self, pos: int, written: Set[str]) -> Optional[Dict[str, np.ndarray]]:
        """Buffers for a checkpoint at ``pos`` if it fits in memory; the old checkpoint lives
        until the new one is complete, so each may take half the limit. A blob that the layers
        from the old checkpoint up to ``pos`` do not write (``written``) keeps the old
        checkpoint's array."""
        if pos <= self._pos:
            return None
        names = frontier(self.net, pos)
        shapes = [tuple(self.net.blobs[n].data.shape) for n in names]
        if any(not shape or shape[0] != self.batch for shape in shapes):
            return None  # a blob without a row per image (PriorBox's, a Reshape's to a fixed first axis)
        size = sum(int(np.prod(shape[1:])) * 4 * self.count * self.batch for shape in shapes)
        if size > self.mem_limit // 2:
            return None
        return {n: self._blobs[n] if self._keeps(n, shape, n in written) else
                np.empty((self.count * self.batch,) + shape[1:], np.float32)
                for n, shape in zip(names, shapes)}

    def _keeps(self, name: str, shape: Tuple[int, ...], written: bool) -> bool:
        """Whether the new checkpoint takes blob ``name`` (``shape`` per batch) in the old
        checkpoint's array: one that no layer since wrote, or one of this object's own that a
        layer overwrote in place (batch b's rows are fed to the net before batch b's new rows
        replace them, and no other batch reads them); the sample's arrays are never written."""
        old = self._blobs.get(name)
        if old is None:
            return False
        return not written or (name not in self._inputs and old.shape[1:] == shape[1:])


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` and ``b`` are the same elements of the same memory."""
    return (a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


@contextmanager
def param_diffs_off(switches: Iterable[Tuple[object, int]]) -> Iterator[None]:
    """Within the block the numpy engine's layers compute no diff of the parameters
    ``(layer, index)`` (Caffe's ``param_propagate_down`` off); each setting is restored after."""
    saved = [(layer, i, layer.param_propagate_down(i)) for layer, i in switches]
    for layer, i, _ in saved:
        layer.set_param_propagate_down(i, False)
    try:
        yield
    finally:
        for layer, i, value in saved:
            layer.set_param_propagate_down(i, value)


@contextmanager
def forward_only(net) -> Iterator[None]:
    """Within the block no backward pass follows the net's forward passes (stages 1 and 2), so
    the engine may skip what only a backward reads (:meth:`~caffe_utils.engine.protocol.
    EngineNet.expect_backward`); restored after."""
    net.expect_backward(False)
    try:
        yield
    finally:
        net.expect_backward(True)


def affine_param_diffs_only(net) -> ContextManager[None]:
    """Within the block the numpy engine computes no parameter diff of a layer that is not affine
    (Scale's, Bias's, PReLU's): the initialization reads only the affine layers' (stage 3), and an
    in-place Scale then keeps no copy of its input (Caffe's ``temp_``) for a diff nobody reads.
    The layers' settings are restored after; pycaffe's layers are left as they are."""
    return param_diffs_off((layer, i) for layer in getattr(net, "layers", [])
                           if layer.type not in AFFINE_TYPES and hasattr(layer, "set_param_propagate_down")
                           for i in range(len(getattr(layer, "blobs", ()))))


def _check_sample(net, prepared: PreparedNet, sample: np.ndarray, batch_size: int) -> None:
    """The sample must be images of the net's input size, and the net's input (and auxiliary
    inputs, such as ``im_info``) ``batch_size`` deep."""
    want = tuple(prepared.input_shape)
    if sample.ndim != 4 or sample.shape[0] < 1 or tuple(sample.shape[1:]) != want:
        raise DataError(f"the sample has shape {tuple(sample.shape)}; the initialization needs at least one "
                        f"image of shape {want} (N, C, H, W)")
    have = net.blobs[prepared.input_name].data.shape[0]
    if have != batch_size:
        raise DataError(f"the net's input '{prepared.input_name}' holds {have} images, not the batch size "
                        f"{batch_size}; build the net with the options' batch size")
    for name in prepared.aux_inputs:
        have = net.blobs[name].data.shape[0]
        if have != batch_size:
            raise DataError(f"the net's input '{name}' holds {have} rows, not the batch size {batch_size}; "
                            "build the net with a row per image (input_shapes)")


@dataclass
class InitContext:
    """The state the stages share, in place of long argument lists."""
    net: object
    prepared: PreparedNet
    sample: np.ndarray
    opts: InitOptions
    rng: np.random.RandomState
    report: InitReport
    layers: "OrderedDict[str, LayerReport]"
    batches: Optional[SampleBatches]
    progress: Optional[Progress] = None
    positions: Dict[str, int] = field(default_factory=dict)

    @classmethod
    def create(cls, net, prepared: PreparedNet, sample: np.ndarray, opts: InitOptions,
               progress: Optional[Progress]) -> "InitContext":
        """Check the options against the net and set up the report and the batches."""
        if opts.init not in INIT_TYPES:
            raise PrototxtError(f"unknown init type '{opts.init}'; choose one of {', '.join(INIT_TYPES)}")
        _check_sample(net, prepared, sample, opts.batch_size)
        lps = list(net.net_param.layer)
        unknown = sorted(set(opts.reinit) - {lp.name for lp in lps})
        if unknown:
            raise PrototxtError(f"--reinit names layer(s) {unknown} that the net does not have")
        layers = OrderedDict((lp.name, LayerReport(lp.name, lp.type)) for lp in lps if lp.type in AFFINE_TYPES)
        aux = {name: prepared.aux_values(name, sample.shape[0]) for name in prepared.aux_inputs}
        batches = SampleBatches(net, prepared.input_name, sample, opts.batch_size, opts.mem_limit, aux)
        report = InitReport(heads=list(prepared.heads))
        return cls(net, prepared, sample, opts, np.random.RandomState(opts.seed), report, layers, batches, progress,
                   {n: i for i, n in enumerate(net.layer_names)})

    def index(self, lp) -> int:
        """Layer ``lp``'s position in the net."""
        return self.positions[lp.name]

    def tick(self, stage: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(stage, done, total)

    def warn(self, message: str) -> None:
        self.report.warnings.append(message)
