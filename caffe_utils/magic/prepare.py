"""Preparing the net: the net the initialization runs, with one image input and no sinks.

Data layers (Data, ImageData, MemoryData, ...) become one Input of the images' shape; loss,
accuracy, softmax and other sinks that nothing reads are dropped, so that the net's outputs are
the blobs that stage 3's random top gradient is set on. The original data layer's transform
parameters and source are kept for reading the sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Set, Tuple

from caffe_utils.errors import PrototxtError
from caffe_utils.layout import AFFINE_TYPES
from caffe_utils.magic.scale_rules import TERMINAL
from caffe_utils.schema import pb2_of

DATA_LAYERS = ("Data", "ImageData", "MemoryData", "HDF5Data", "WindowData", "DummyData", "Input")
#: layers the method ends at: no backward in Caffe, or not a function of the weights
HEADS = {"DetectionOutput", "DetectionEvaluate", "ArgMax", "PriorBox"}
#: outputs that depend only on blob shapes
SHAPE_ONLY = {"PriorBox"}


@dataclass
class PreparedNet:
    net_param: object          # the NetParameter to build the engine net from
    input_name: str
    input_shape: Tuple[int, int, int]  # C, H, W
    transform_param: object    # TransformationParameter of the original data layer (or None)
    data_source: Optional[str] = None  # source of the original data layer, if any
    data_root: Optional[str] = None
    heads: List[str] = field(default_factory=list)  # layers dropped as heads the method ends at


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
    out = pb2_of(net_param).NetParameter()
    out.name = net_param.name
    out.state.CopyFrom(net_param.state)
    inp = out.layer.add(name=first.name, type="Input")
    inp.top.append(name)
    inp.input_param.shape.add().dim.extend([1, *chw])
    other_inputs = [t for lp in data for t in lp.top if t != name]
    kept, heads = _without_sinks_and_heads([lp for lp in lps if lp.type not in DATA_LAYERS])
    needs = {b for lp in kept for b in lp.bottom}
    missing = sorted(needs & set(other_inputs))
    if missing:
        raise PrototxtError(f"layers need input(s) {missing} besides the images '{name}'; "
                            "magic-init feeds only images: remove those layers or use a deploy net")
    for lp in kept:
        out.layer.add().CopyFrom(lp)
    if not any(lp.type in AFFINE_TYPES for lp in kept):
        raise PrototxtError("the net has no Convolution, InnerProduct or Deconvolution layer to initialize")
    tp = first.transform_param if first.HasField("transform_param") else None
    return PreparedNet(out, name, chw, tp, source, root, heads)


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
