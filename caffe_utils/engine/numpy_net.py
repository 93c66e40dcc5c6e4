"""The numpy engine's net: builds a Caffe net from a prototxt and runs it forward and backward
with the layer implementations of :mod:`caffe_utils.layers`, pycaffe-style.

``Net(prototxt, phase, weights)`` behaves like ``caffe.Net``: ``net.blobs`` (ordered name ->
:class:`Blob` with ``data``/``diff``), ``net.params`` (ordered layer name -> list of blobs, only
layers with parameters), ``net.layers``, ``net.inputs``/``net.outputs``,
``forward(start=, end=)``, ``backward(start=, end=)``, ``reshape()``, ``save()``, ``copy_from()``:
the :class:`~caffe_utils.engine.protocol.EngineNet` interface.

Semantics that follow Caffe:

* layers run in prototxt order, which must be a topological order;
* in-place layers (top == bottom) share the blob; when an earlier layer still needs the old
  contents for its backward pass (Caffe's implicit Split case), the in-place layer writes a
  new blob instead, which gives the same numbers;
* a blob read by several layers receives the sum of their gradients;
* backward always reaches the inputs (``force_backward``) and computes every parameter diff;
  bottom diffs are zeroed by the pass, parameter diffs accumulate until
  :meth:`clear_param_diffs`, as in Caffe; a layer run in place gets a copy of its top diff and
  a zeroed bottom diff, unless it turns the diff into its bottom diff where it lies
  (:meth:`~caffe_utils.layers.base.Layer.backward_in_place`: ReLU, Dropout, BatchNorm with
  stored statistics, Scale);
* a loss layer's top diff holds its loss weight, so ``backward()`` from a loss works as in Caffe;
* ``outputs`` are Caffe's net outputs and, after them, the blobs that only bottoms with
  ``propagate_down: false`` read (:func:`net_outputs`): a head's inputs, where the gradient starts;
* parameters are created with the layers' fillers, then overwritten by ``weights`` (matched by
  layer name); parameters shared by ``param { name: ... }`` are one blob.

Limits: random streams (fillers, Dropout) are numpy's, not Caffe's. A net whose blobs and
parameters (data and diff) would need more than ``max_bytes`` (default: the machine's RAM), or a
blob over Caffe's 2^31-1 elements, is refused while building, naming the layer.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from caffe_utils import caffemodel, netio
from caffe_utils.engine import physical_memory
from caffe_utils.errors import PrototxtError
from caffe_utils.fillers import fill
from caffe_utils.layers import create_layer
from caffe_utils.layers.base import Blob, BlobShapeError, Layer
from caffe_utils.layers.data import FedDataLayer
from caffe_utils.layout import AFFINE_TYPES

# layer type -> (parameter message field, filler fields in blob order); missing filler -> constant 0
_FILLERS = {
    "Convolution": ("convolution_param", ("weight_filler", "bias_filler")),
    "Deconvolution": ("convolution_param", ("weight_filler", "bias_filler")),
    "DepthwiseConvolution": ("convolution_param", ("weight_filler", "bias_filler")),
    "ConvolutionDepthwise": ("convolution_param", ("weight_filler", "bias_filler")),
    "InnerProduct": ("inner_product_param", ("weight_filler", "bias_filler")),
    "Embed": ("embed_param", ("weight_filler", "bias_filler")),
    "PReLU": ("prelu_param", ("filler",)),
    "Scale": ("scale_param", ("filler", "bias_filler")),
    "Bias": ("bias_param", ("filler",)),
    "Normalize": ("norm_param", ("scale_filler",)),
}
# Caffe's defaults when the filler is not given at all
_DEFAULT_FILL = {("PReLU", 0): 0.25, ("Scale", 0): 1.0, ("Normalize", 0): 1.0}


class _TopView:
    """Top blob handed to an in-place layer's backward: shared data, a private copy of the diff."""

    __slots__ = ("data", "diff")

    def __init__(self, data: np.ndarray, diff: np.ndarray) -> None:
        self.data = data
        self.diff = diff

    @property
    def shape(self):
        return self.data.shape

    @property
    def count(self) -> int:
        return int(self.data.size)


def _create_layer(i: int, lp, phase: int, names_seen: Set[str]) -> Layer:
    """The layer for LayerParameter ``lp`` (the ``i``-th), after Caffe's checks of its name and
    of its numbers of bottoms and tops."""
    if not lp.name:
        raise PrototxtError(f"layer {i} (type '{lp.type}') has no name; give every layer a unique name")
    if lp.name in names_seen:
        raise PrototxtError(f"two layers are named '{lp.name}'; layer names must be unique")
    names_seen.add(lp.name)
    layer = create_layer(lp, phase)
    if layer.num_bottom is not None and len(lp.bottom) != layer.num_bottom:
        raise PrototxtError(f"layer '{lp.name}' ({lp.type}) needs {layer.num_bottom} bottom(s), "
                            f"has {len(lp.bottom)}")
    if layer.num_top is not None and len(lp.top) != layer.num_top:
        raise PrototxtError(f"layer '{lp.name}' ({lp.type}) needs {layer.num_top} top(s), "
                            f"has {len(lp.top)}")
    return layer


@dataclass
class _Wiring:
    """What building a net keeps between layers: the blob each name holds now, which layers
    read each blob (by id), the layer names seen, shared parameters and the bytes used."""
    current: Dict[str, Blob] = field(default_factory=dict)
    readers: Dict[int, List[int]] = field(default_factory=dict)
    names_seen: Set[str] = field(default_factory=set)
    shared: Dict[str, Tuple[str, Blob]] = field(default_factory=dict)
    used: int = 0

    def bottoms(self, i: int, lp) -> List[Blob]:
        """The bottom blobs of layer ``i``, each recorded as read by it."""
        bottoms: List[Blob] = []
        for b in lp.bottom:
            if b not in self.current:
                raise PrototxtError(f"layer '{lp.name}' uses bottom '{b}' before any layer produces it; "
                                    "reorder the prototxt so producers come first, or fix the name")
            blob = self.current[b]
            bottoms.append(blob)
            self.readers.setdefault(id(blob), []).append(i)
        return bottoms

    def tops(self, i: int, lp) -> Tuple[List[Blob], List[bool]]:
        """The top blobs of layer ``i`` and whether each is computed in place (the bottom's blob).
        An in-place top that an earlier layer still reads becomes a new blob (Caffe's implicit
        Split case): that reader's backward needs the old contents."""
        tops: List[Blob] = []
        inplace: List[bool] = []
        for t in lp.top:
            if t in lp.bottom:
                blob = self.current[t]
                others = [r for r in self.readers.get(id(blob), []) if r != i]
                if others:
                    blob = Blob(blob.shape)  # earlier readers still need the old contents
                    inplace.append(False)
                else:
                    inplace.append(True)
            else:
                if t in self.current:
                    raise PrototxtError(f"top '{t}' of layer '{lp.name}' is produced by more than one layer; "
                                        "rename one of them (only in-place layers may reuse a name)")
                blob = Blob()
                inplace.append(False)
            self.current[t] = blob
            self.readers[id(blob)] = []
            tops.append(blob)
        return tops, inplace


def _never_consumed(net_param) -> List[str]:
    """Caffe's net outputs: blobs produced and not read by any later layer, in order."""
    available: "OrderedDict[str, None]" = OrderedDict()
    for lp in net_param.layer:
        for b in lp.bottom:
            available.pop(b, None)
        for t in lp.top:
            available[t] = None
    return list(available)


def gradient_starts(net_param) -> List[str]:
    """Blobs no later layer backpropagates into: produced by a layer other than an Input and
    read only at bottoms with ``propagate_down: false`` (the inputs of heads such as a proposal
    layer, see :mod:`caffe_utils.magic.prepare`). Their gradient starts there, as a net
    output's does; in net order."""
    starts: "OrderedDict[str, bool]" = OrderedDict()  # blob -> still read only without propagation
    for lp in net_param.layer:
        for k, b in enumerate(lp.bottom):
            if b in starts:
                starts[b] = starts[b] and k < len(lp.propagate_down) and not lp.propagate_down[k]
        for t in lp.top:
            if t not in lp.bottom and lp.type != "Input":
                starts.pop(t, None)
                starts[t] = True
    read = {b for lp in net_param.layer for b in lp.bottom}
    return [b for b, only in starts.items() if only and b in read]


def net_outputs(net_param) -> List[str]:
    """The blobs the random top gradient of the method goes on: Caffe's net outputs
    (:func:`_never_consumed`), then the :func:`gradient_starts`."""
    outs = _never_consumed(net_param)
    return outs + [b for b in gradient_starts(net_param) if b not in outs]


class Net:
    """A Caffe net run by the numpy engine (see module docstring)."""

    engine = "numpy"

    def __init__(self, net: Union[str, Path, object], phase: Union[int, str] = netio.TEST,
                 weights: Optional[Union[str, Path]] = None, *, level: int = 0,
                 stages: Sequence[str] = (), input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                 seed: int = 0, max_bytes: Optional[int] = None, fill_weights: bool = True) -> None:
        """``fill_weights`` False leaves the weights (first blob) of the affine layers zero
        instead of drawing their ``weight_filler``: for a caller that loads or fills every one
        of them (the initialization), which saves drawing them twice."""
        if isinstance(phase, str):
            phase = netio.PHASES[phase.upper()]
        self.phase = phase
        self.net_param = netio.read_net(net, phase, level, stages)
        self._rng = np.random.RandomState(seed)
        self._fill_weights = fill_weights
        self.blobs: "OrderedDict[str, Blob]" = OrderedDict()
        self.params: "OrderedDict[str, List[Blob]]" = OrderedDict()
        self.layers: List[Layer] = []
        self._layer_names: List[str] = []
        self._bottoms: List[List[Blob]] = []
        self._tops: List[List[Blob]] = []
        self.bottom_names: "OrderedDict[str, List[str]]" = OrderedDict()
        self.top_names: "OrderedDict[str, List[str]]" = OrderedDict()
        self._inplace: List[List[bool]] = []
        self._loss_weights: List[List[float]] = []
        self.inputs: List[str] = []
        #: compute diffs of the net's input blobs in backward (Caffe's force_backward); turning
        #: it off skips e.g. the first convolution's costly bottom gradient
        self.input_diffs = True
        #: when a dict, forward and backward add every layer's seconds in it under (layer name,
        #: "forward" or "backward"), as ``caffe time`` reports them (scripts/bench_engine.py --layers)
        self.layer_times: Optional[Dict[Tuple[str, str], float]] = None
        #: blob name -> its own data array while :meth:`bind_data` lends it another
        self._own_data: Dict[str, np.ndarray] = {}
        #: the most bytes the blobs (data and diff) and parameters may take; checked while building
        self.max_bytes = physical_memory() if max_bytes is None else int(max_bytes)
        self._build(input_shapes or {})
        if weights is not None:
            self.copy_from(weights)

    # ------------------------------------------------------------------ construction
    def _build(self, input_shapes: Mapping[str, Sequence[int]]) -> None:
        if not len(self.net_param.layer):
            raise PrototxtError("the net has no layers (after applying the phase's include/exclude rules)")
        wiring = _Wiring()
        for i, lp in enumerate(self.net_param.layer):
            self._add_layer(i, lp, input_shapes, wiring)
        self.outputs = net_outputs(self.net_param)
        self._index = {n: i for i, n in enumerate(self._layer_names)}
        self._set_loss_diffs()

    def _add_layer(self, i: int, lp, input_shapes: Mapping[str, Sequence[int]], wiring: "_Wiring") -> None:
        """Create layer ``i``, connect it to the blobs built so far, set it up and record it."""
        layer = _create_layer(i, lp, self.phase, wiring.names_seen)
        bottoms = wiring.bottoms(i, lp)
        tops, inplace = wiring.tops(i, lp)
        for t, blob in zip(lp.top, tops):
            self.blobs[t] = blob
        self._setup_layer(layer, lp, bottoms, tops, input_shapes)
        wiring.used = self._check_memory(layer, tops, inplace, wiring.used)
        if isinstance(layer, FedDataLayer):
            self.inputs.extend(t for t in lp.top if t not in self.inputs)
        self._fill_params(layer)
        self._share_params(layer, lp, wiring.shared)
        self.layers.append(layer)
        self._layer_names.append(lp.name)
        self._bottoms.append(bottoms)
        self._tops.append(tops)
        self.bottom_names[lp.name] = list(lp.bottom)
        self.top_names[lp.name] = list(lp.top)
        self._inplace.append(inplace)
        self._loss_weights.append(self._layer_loss_weights(layer, lp))
        if layer.blobs:
            self.params[lp.name] = layer.blobs

    def _setup_layer(self, layer: Layer, lp, bottoms: List[Blob], tops: List[Blob],
                     input_shapes: Mapping[str, Sequence[int]]) -> None:
        """Caffe's ``SetUp`` of one layer, with the caller's input shapes for data and Input layers."""
        if isinstance(layer, FedDataLayer):
            layer.given_shapes = [tuple(input_shapes[t]) if t in input_shapes else None for t in lp.top]
        if lp.type == "Input":
            self.inputs.extend(lp.top)
        try:
            layer.setup(bottoms, tops)
            if lp.type == "Input":
                for t, blob in zip(lp.top, tops):
                    if t in input_shapes:
                        blob.reshape(input_shapes[t])
            layer.reshape(bottoms, tops)
        except BlobShapeError as exc:
            raise layer.error(f"{exc}; make the input or the layer's output smaller") from exc

    def _check_memory(self, layer: Layer, tops: List[Blob], inplace: List[bool], used: int) -> int:
        """``used`` plus the bytes of ``layer``'s new tops and parameters; a clean error naming the
        layer when that passes :attr:`max_bytes` (checked before the net writes to them: numpy's
        zero-filled arrays take no memory until written)."""
        new = [t for t, same in zip(tops, inplace) if not same] + list(layer.blobs)
        used += sum(2 * b.data.nbytes for b in new)
        if self.max_bytes and used > self.max_bytes:
            shapes = ", ".join(str(b.shape) for b in new)
            raise layer.error(f"the net's blobs need {used / 2 ** 30:.2f} GiB up to this layer (its blobs: "
                              f"{shapes}), over the {self.max_bytes / 2 ** 30:.2f} GiB limit; make the "
                              "input, the batch or the layer's output smaller")
        return used

    def _layer_loss_weights(self, layer: Layer, lp) -> List[float]:
        n = len(lp.top)
        if len(lp.loss_weight) and len(lp.loss_weight) != n:
            raise PrototxtError(f"layer '{lp.name}' has {len(lp.loss_weight)} loss_weight values for "
                                f"{n} tops; give one per top")
        if len(lp.loss_weight):
            return list(lp.loss_weight)
        return [layer.loss_weight_default(k) for k in range(n)]

    def _set_loss_diffs(self) -> None:
        for tops, weights in zip(self._tops, self._loss_weights):
            for t, w in zip(tops, weights):
                if w:
                    t.diff[...] = w

    def _fill_params(self, layer: Layer) -> None:
        spec = _FILLERS.get(layer.type)
        for j, blob in enumerate(layer.blobs):
            if j == 0 and not self._fill_weights and layer.type in AFFINE_TYPES:
                continue  # zero, as allocated
            filler = None
            if spec is not None and j < len(spec[1]):
                msg = getattr(layer.param, spec[0])
                if msg.HasField(spec[1][j]):
                    filler = getattr(msg, spec[1][j])
            if filler is None:
                default = _DEFAULT_FILL.get((layer.type, j), 0.0)
                blob.data[...] = default
            else:
                try:
                    fill(filler, blob.shape, self._rng, out=blob.data)  # drawn into the blob: no temporary
                except PrototxtError as exc:
                    raise layer.error(f"{spec[1][j]}: {exc}") from exc

    def _share_params(self, layer: Layer, lp, shared: Dict[str, Tuple[str, Blob]]) -> None:
        for j, spec in enumerate(lp.param):
            if j >= len(layer.blobs) or not spec.name:
                continue
            if spec.name in shared:
                owner, blob = shared[spec.name]
                mine = layer.blobs[j]
                strict = spec.share_mode == spec.STRICT
                if (mine.shape != blob.shape) if strict else (mine.count != blob.count):
                    raise PrototxtError(f"layer '{lp.name}' shares param '{spec.name}' with layer '{owner}' "
                                        f"but their shapes differ ({mine.shape} vs {blob.shape})")
                layer.blobs[j] = blob
            else:
                shared[spec.name] = (lp.name, layer.blobs[j])

    # ------------------------------------------------------------------ pycaffe-like API
    @property
    def layer_names(self) -> List[str]:
        return list(self._layer_names)

    @property
    def layer_types(self) -> List[str]:
        return [l.type for l in self.layers]

    def _range(self, start: Optional[str], end: Optional[str]) -> Tuple[int, int]:
        try:
            s = 0 if start is None else self._index[start]
            e = len(self.layers) - 1 if end is None else self._index[end]
        except KeyError as exc:
            raise PrototxtError(f"no layer named '{exc.args[0]}' in the net") from exc
        return s, e

    def reshape(self) -> None:
        """Propagate input shapes through every layer (after changing an input blob's shape)."""
        for layer, bottoms, tops in zip(self.layers, self._bottoms, self._tops):
            layer.reshape(bottoms, tops)
        self._set_loss_diffs()

    def forward(self, start: Optional[str] = None, end: Optional[str] = None,
                blobs: Iterable[str] = (), **inputs: np.ndarray) -> Dict[str, np.ndarray]:
        """Run layers ``start``..``end`` (inclusive); returns the outputs like pycaffe."""
        for name, arr in inputs.items():
            if name not in self.inputs:
                raise PrototxtError(f"'{name}' is not an input of the net (inputs: {self.inputs})")
            if tuple(arr.shape) != self.blobs[name].shape:
                raise PrototxtError(f"input '{name}' has shape {tuple(arr.shape)}, "
                                    f"the net expects {self.blobs[name].shape}; reshape the input blob first")
            self.blobs[name].data[...] = arr
        s, e = self._range(start, end)
        for i in range(s, e + 1):
            self.layers[i].reshape(self._bottoms[i], self._tops[i])
            self._call(i, "forward", self.layers[i].forward, self._bottoms[i], self._tops[i])
        self._set_loss_diffs()
        outs = set(self.outputs) | set(blobs)
        if end is not None:
            outs = set(self.top_names[self._layer_names[e]]) | set(blobs)
        return {n: self.blobs[n].data for n in outs}

    def backward(self, start: Optional[str] = None, end: Optional[str] = None,
                 diffs: Iterable[str] = (), **top_diffs: np.ndarray) -> Dict[str, np.ndarray]:
        """Backpropagate from layer ``end`` down to layer ``start`` (pycaffe's argument names:
        ``start`` is where the backward pass starts, i.e. the *last* layer)."""
        for name, arr in top_diffs.items():
            self.blobs[name].diff[...] = arr
        # pycaffe: backward(start=A, end=B) runs from layer A down to layer B
        lo, hi = self._range(end, start)
        zeroed = set()
        input_blobs = [self.blobs[n] for n in self.inputs]
        for i in range(hi, lo - 1, -1):
            layer, bottoms, tops = self.layers[i], self._bottoms[i], self._tops[i]
            lp = self.net_param.layer[i]
            pd = [layer.can_propagate(k) and (k >= len(lp.propagate_down) or lp.propagate_down[k])
                  and (self.input_diffs or bottoms[k] not in input_blobs)
                  for k in range(len(bottoms))]
            if pd == [True] and self._inplace[i] == [True] and layer.in_place_backward:
                self._call(i, "backward", layer.backward_in_place, bottoms[0])  # turns the diff where it lies
                zeroed.add(id(bottoms[0]))
                continue
            call_tops: List = list(tops)
            inplace_ids = set()
            for k, t in enumerate(tops):
                if self._inplace[i][k]:
                    call_tops[k] = _TopView(t.data, t.diff.copy())
                    inplace_ids.add(id(t))
            for k, b in enumerate(bottoms):
                # an in-place bottom's diff holds the top diff (copied above): always restart it
                if pd[k] and (id(b) not in zeroed or id(b) in inplace_ids):
                    b.diff[...] = 0
                    zeroed.add(id(b))
            self._call(i, "backward", layer.backward, call_tops, pd, bottoms)
        outs = set(self.inputs) | set(diffs)
        return {n: self.blobs[n].diff for n in outs}

    def _call(self, i: int, kind: str, method: Callable[..., None], *args) -> None:
        """Run layer ``i``'s ``method``; with ``layer_times`` on, add its seconds there."""
        if self.layer_times is None:
            method(*args)
            return
        start = time.perf_counter()
        method(*args)
        key = (self._layer_names[i], kind)
        self.layer_times[key] = self.layer_times.get(key, 0.0) + time.perf_counter() - start

    def set_data(self, name: str, data: np.ndarray) -> None:
        """Set blob ``name``'s data (e.g. to restore activations before ``forward(start=...)``)."""
        self.blobs[name].data[...] = data

    def expect_backward(self, follows: bool) -> None:
        """Tell the layers whether backward passes follow the forward passes from now on (see
        :meth:`Layer.expect_backward`): without, max pooling does a quarter of its work; a
        backward pass stays correct either way."""
        for layer in self.layers:
            layer.expect_backward(follows)

    def bind_data(self, name: str, array: np.ndarray) -> bool:
        """Make ``array`` blob ``name``'s data until :meth:`unbind_data` (the blob's own array is
        kept for then): a layer writing the blob writes there, and one reading it reads there.
        False, and nothing changed, unless ``array`` is C-contiguous float32 of the blob's shape."""
        blob = self.blobs[name]
        if array.shape != blob.data.shape or array.dtype != np.float32 or not array.flags.c_contiguous:
            return False
        self._own_data.setdefault(name, blob.data)
        blob.data = array
        return True

    def unbind_data(self) -> None:
        """Give every bound blob its own array back, holding the bound array's values; the
        layers whose tops share a bottom's data (Split, Reshape...) then share the own arrays
        again (:meth:`reshape`)."""
        if not self._own_data:
            return
        for name, own in self._own_data.items():
            blob = self.blobs[name]
            if blob.data is not own:
                own[...] = blob.data
                blob.data = own
        self._own_data = {}
        self.reshape()

    def clear_param_diffs(self) -> None:
        """Zero every parameter diff. One that is zero already is not written: a diff no backward
        has touched (a layer's with ``param_propagate_down`` off, as stage 3's InnerProduct
        layers) then keeps its pages unmapped (CaffeNet's fc6-fc8: 234 MB)."""
        for blobs in self.params.values():
            for b in blobs:
                if b.diff.any():
                    b.diff[...] = 0

    def param_shapes(self) -> "OrderedDict[str, List[Tuple[int, ...]]]":
        return OrderedDict((n, [b.shape for b in bl]) for n, bl in self.params.items())

    def set_lrn_alphas(self, alphas: Mapping[str, float]) -> None:
        """Set LRN layers' ``alpha`` (float32, as the prototxt field stores it)."""
        for name, alpha in netio.set_lrn_alphas(self.net_param, alphas).items():
            self.layers[self._index[name]].set_alpha(alpha)

    def copy_from(self, weights: Union[str, Path]) -> None:
        """Load parameters from a caffemodel, matching layers by name (as ``Net.copy_from``)."""
        targets = OrderedDict((n, [b.data for b in bl]) for n, bl in self.params.items())
        for _ in caffemodel.copy_caffemodel_into(weights, targets):  # streams from the file into the blobs
            pass

    def save(self, path: Union[str, Path]) -> None:
        """Write the net's parameters as a caffemodel (atomically)."""
        caffemodel.write_caffemodel(path, self.net_param,
                               OrderedDict((n, [b.data for b in bl]) for n, bl in self.params.items()))
