"""Preparing the net: the net the initialization runs, with one image input and no sinks.

Data layers (Data, ImageData, MemoryData, ...) become one Input of the images' shape; loss,
accuracy, softmax and other sinks that nothing reads are dropped, so that the net's outputs are
the blobs that stage 3's random top gradient is set on. The original data layer's transform
parameters and source are kept for reading the sample.

Besides the images, the Input may keep the auxiliary inputs the tool can fill itself
(:data:`AUX_INPUTS`): Faster R-CNN's ``im_info``, one row ``[height, width, 1.0]`` per image of
the network input (py-faster-rcnn's convention: the images are the net's input size, scale 1).
Any other input a kept layer reads is one error naming it.

Layers inside the net whose outputs carry no gradient back (a Python proposal layer, whose
``rois`` only ROIPooling's second bottom reads) are heads too: they stay, since later layers read
their outputs, but get ``propagate_down: false`` on every bottom. Both engines then make their
inputs net outputs, on which stage 3's random top gradient goes
(:func:`caffe_utils.engine.numpy_net.net_outputs`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import numpy as np

from caffe_utils.errors import PrototxtError
from caffe_utils.layout import AFFINE_TYPES
from caffe_utils.magic.scale_rules import TERMINAL
from caffe_utils.schema import pb2_of

DATA_LAYERS = ("Data", "ImageData", "MemoryData", "HDF5Data", "WindowData", "DummyData", "Input")
#: layers the method ends at: no backward in Caffe, or not a function of the weights
HEADS = {"DetectionOutput", "DetectionEvaluate", "ArgMax", "PriorBox"}
#: outputs that depend only on blob shapes
SHAPE_ONLY = {"PriorBox"}
#: inputs besides the images that the tool fills itself: name -> (per-image shape, what it holds)
AUX_INPUTS = {"im_info": ((3,), "[height, width, scale 1.0] of the network input per image")}
#: bottoms that carry no gradient, by layer type (ROIPooling's rois)
NO_GRADIENT_BOTTOMS = {"ROIPooling": {1}, "PSROIPooling": {1}}


@dataclass
class PreparedNet:
    net_param: object          # the NetParameter to build the engine net from
    input_name: str
    input_shape: Tuple[int, int, int]  # C, H, W
    transform_param: object    # TransformationParameter of the original data layer (or None)
    data_source: Optional[str] = None  # source of the original data layer, if any
    data_root: Optional[str] = None
    heads: List[str] = field(default_factory=list)  # layers dropped (or cut) as heads the method ends at
    #: auxiliary inputs kept beside the images (:data:`AUX_INPUTS`): name -> per-image shape
    aux_inputs: Dict[str, Tuple[int, ...]] = field(default_factory=dict)

    def aux_values(self, name: str, n: int) -> np.ndarray:
        """``n`` rows of auxiliary input ``name`` for images of the net's input size: for
        ``im_info``, ``[H, W, 1.0]`` each (py-faster-rcnn's rows: height, width, scale)."""
        if name != "im_info":
            raise KeyError(name)
        _, h, w = self.input_shape
        return np.tile(np.array([h, w, 1.0], np.float32), (n, 1))


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


def needs_image_shape(net_param) -> bool:
    """Whether :func:`prepare_net` needs ``image_shape``: the net's first data layer does not
    tell its image size."""
    first = next((lp for lp in net_param.layer if lp.type in DATA_LAYERS), None)
    return first is not None and _fix_shape(first) is None


def prepare_net(net_param, image_shape: Optional[Tuple[int, int, int]] = None) -> PreparedNet:
    """The net the initialization runs: data layers become one Input, loss/softmax sinks and
    heads go.

    ``image_shape`` (C, H, W) is needed when the net's data layer does not tell its crop size.
    """
    lps = list(net_param.layer)
    data = [lp for lp in lps if lp.type in DATA_LAYERS]
    if not data:
        raise PrototxtError("the net has no input: add an Input layer (or input/input_shape) for the images")
    first = data[0]
    name, chw = _image_input(first, image_shape)
    source = root = None
    if first.type == "ImageData":
        source, root = first.image_data_param.source, first.image_data_param.root_folder or None
    elif first.type == "Data":
        source = first.data_param.source
    kept, heads = _without_sinks_and_heads([lp for lp in lps if lp.type not in DATA_LAYERS])
    aux = _aux_inputs(data, name, {b for lp in kept for b in lp.bottom})
    out = pb2_of(net_param).NetParameter()
    out.name = net_param.name
    out.state.CopyFrom(net_param.state)
    inp = out.layer.add(name=first.name, type="Input")
    inp.top.append(name)
    inp.input_param.shape.add().dim.extend([1, *chw])
    for a, shape in aux.items():
        inp.top.append(a)
        inp.input_param.shape.add().dim.extend([1, *shape])
    for lp in kept:
        out.layer.add().CopyFrom(lp)
    heads.extend(_cut_heads(out.layer))
    if not any(lp.type in AFFINE_TYPES for lp in kept):
        raise PrototxtError("the net has no Convolution, InnerProduct or Deconvolution layer to initialize")
    tp = first.transform_param if first.HasField("transform_param") else None
    return PreparedNet(out, name, chw, tp, source, root, heads, aux)


def _image_input(first, image_shape: Optional[Tuple[int, int, int]]) -> Tuple[str, Tuple[int, int, int]]:
    """The images' blob name and (C, H, W), from the first data layer or ``image_shape``."""
    if not len(first.top):
        raise PrototxtError(f"data layer '{first.name}' has no top")
    name = first.top[0]
    shape = _fix_shape(first)
    if shape is not None and len(shape) != 4:
        raise PrototxtError(f"input '{name}' has shape {shape}; magic-init needs images (N, C, H, W)")
    chw = tuple(shape[1:]) if shape is not None else image_shape
    if chw is None:
        raise PrototxtError(f"data layer '{first.name}' ({first.type}) does not tell its image size; "
                            "give --input-shape C,H,W, an Input layer or a transform_param crop_size")
    if min(chw) <= 0:
        raise PrototxtError(f"input '{name}' of layer '{first.name}' has channels, height, width {tuple(chw)}; "
                            "all three must be positive")
    return name, tuple(int(d) for d in chw)


def _without_sinks_and_heads(layers: List) -> Tuple[List, List[str]]:
    """``layers`` without the sinks (loss, accuracy, softmax, silence...) and heads (detection
    outputs, priors...) whose tops nothing needs, repeatedly; and the heads' names.

    A head cannot be differentiated (Caffe has no backward for DetectionOutput) or computes only
    from shapes (PriorBox, and layers that combine only such outputs): stage 3's random top
    gradient goes on the heads' differentiable inputs instead, which become the net's outputs."""
    produced_by = {t: lp for lp in layers for t in lp.top}
    shape_only: Set[str] = set()
    for lp in layers:
        if lp.type in SHAPE_ONLY or (len(lp.bottom) and all(
                b in produced_by and produced_by[b].name in shape_only for b in lp.bottom)):
            shape_only.add(lp.name)
    heads: List[str] = []
    while True:
        consumed = {b for lp in layers for b in lp.bottom}
        drop = [lp for lp in layers if (lp.type in TERMINAL or lp.type in HEADS or lp.name in shape_only)
                and not (set(lp.top) & consumed)]
        if not drop:
            return layers, heads
        heads.extend(lp.name for lp in drop if lp.type in HEADS or lp.name in shape_only)
        layers = [lp for lp in layers if lp not in drop]


def _input_top_shape(lp, k: int) -> Optional[Tuple[int, ...]]:
    """The shape data layer ``lp`` declares for its top ``k`` (an Input's k-th, or only, shape)."""
    shapes = lp.input_param.shape if lp.type == "Input" else ()
    if not len(shapes):
        return None
    return tuple(shapes[k if len(shapes) > 1 and k < len(shapes) else 0].dim)


def _aux_inputs(data: List, image: str, needed: Set[str]) -> Dict[str, Tuple[int, ...]]:
    """The inputs besides the images ``image`` that kept layers read (``needed``), with their
    per-image shapes; an input the tool cannot fill (not in :data:`AUX_INPUTS`, or of another
    shape than it fills) is one :class:`PrototxtError` naming it."""
    aux: Dict[str, Tuple[int, ...]] = {}
    unknown: List[str] = []
    for lp in data:
        for k, top in enumerate(lp.top):
            if top == image or top not in needed or top in aux:
                continue
            if top not in AUX_INPUTS:
                unknown.append(top)
                continue
            per_image, what = AUX_INPUTS[top]
            shape = _input_top_shape(lp, k)
            if lp.type != "Input" or (shape is not None and tuple(shape[1:]) != per_image):
                raise PrototxtError(f"input '{top}' of layer '{lp.name}' ({lp.type}) has shape {shape}; magic-init "
                                    f"fills '{top}' as an Input of shape (N, {', '.join(map(str, per_image))}): "
                                    f"{what}")
            aux[top] = per_image
    if unknown:
        raise PrototxtError(f"layers need input(s) {sorted(unknown)} besides the images '{image}'; magic-init "
                            f"feeds only images (and {', '.join(AUX_INPUTS)}): remove those layers or use a deploy net")
    return aux


def _cut_heads(layers) -> List[str]:
    """Mark the layers whose outputs carry no gradient back (each reader reads them at a
    :data:`NO_GRADIENT_BOTTOMS` position: a proposal layer feeding ROIPooling's rois) with
    ``propagate_down: false`` on every bottom; their names.

    Their backward would pass nothing (a proposal layer has none), so the gradient of their
    inputs starts there: the engines make those inputs net outputs, and stage 3's random top
    gradient goes on them as on any output."""
    lps = list(layers)
    cut: List[str] = []
    for i, lp in enumerate(lps):
        if lp.type in AFFINE_TYPES or lp.type in DATA_LAYERS or not len(lp.top) or not len(lp.bottom):
            continue
        readers = [_readers(lps, i, t) for t in lp.top]  # an unread top (a proposal's scores) counts as none
        if any(readers) and all(k in NO_GRADIENT_BOTTOMS.get(r.type, ()) for rs in readers for r, k in rs):
            cut.append(lp.name)
            del lp.propagate_down[:]
            lp.propagate_down.extend([False] * len(lp.bottom))
    return cut


def _readers(lps: List, i: int, blob: str) -> List[Tuple[object, int]]:
    """(layer, bottom index) of every layer after ``lps[i]`` that reads its top ``blob``, up to
    the layer that writes ``blob`` again (an in-place reader included)."""
    found: List[Tuple[object, int]] = []
    for lp in lps[i + 1:]:
        found.extend((lp, k) for k, b in enumerate(lp.bottom) if b == blob)
        if blob in lp.top:
            break
    return found
