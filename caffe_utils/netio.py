"""Caffe net definitions in: prototxt nets, upgraded and phase-filtered as Caffe does.

* :func:`read_net` parses a prototxt (current or V1 syntax), upgrades it the way Caffe's
  ``UpgradeNetAsNeeded`` does (V1 layers, legacy ``input``/``input_dim``/``input_shape``, data
  transformation fields, BatchNorm param specs) and applies include/exclude rules for a phase.

Weights and mean files (caffemodel, binaryproto) are read and written by
:mod:`caffe_utils.caffemodel`; its functions are also importable from here
(``netio.read_caffemodel``, ``netio.write_caffemodel``, ...), where earlier code finds them.

Limits: V0 nets (pre-2014 ``layer {}`` inside ``layers {}``) are refused with a pointer to Caffe's
``upgrade_net_proto_text`` tool.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

from google.protobuf import text_format

from caffe_utils.caffemodel import (CaffemodelFile, LayerWeights, _layer_without_blobs, copy_caffemodel_into,
                                    legacy_shape, match_weights, parse_caffemodel_bytes, read_caffemodel,
                                    read_mean, shape_compatible, write_caffemodel, write_caffemodel_to,
                                    write_mean)
from caffe_utils.errors import PrototxtError
from caffe_utils.protofiles import V1_TYPE_NAMES, PathLike, read_file
from caffe_utils.schema import caffe_pb2, pb2_of, schemas, unknown_field_error  # noqa: F401 (caffe_pb2: re-export)

__all__ = [
    # prototxt (defined here)
    "TRAIN", "TEST", "PHASES", "V1_TYPE_NAMES", "PrototxtError", "parse_net_text", "read_net_text",
    "upgrade_net", "filter_net", "read_net", "net_to_text", "set_lrn_alphas",
    # weights and mean files (defined in caffe_utils.caffemodel)
    "CaffemodelFile", "LayerWeights", "copy_caffemodel_into", "legacy_shape", "match_weights",
    "parse_caffemodel_bytes", "read_caffemodel", "read_mean", "shape_compatible", "write_caffemodel",
    "write_caffemodel_to",
    "write_mean",
]
# _layer_without_blobs is imported for tests/test_big_models.py, which reads it from here

TRAIN, TEST = 0, 1
PHASES = {"TRAIN": TRAIN, "TEST": TEST}


# ----------------------------------------------------------------------------- prototxt

def _read_text(path: PathLike, what: str, error: type) -> str:
    p = Path(path)
    data = read_file(p, what, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} '{p}' is not a text file (binary data at byte {exc.start}); "
                    "pass a .prototxt, not a .caffemodel") from exc


_NO_FIELD = re.compile(r'Message type "(?:[\w.]*\.)?(\w+)" has no field named "([^"]+)"')


def _parse_with(pb2, text: str):
    """``(net, None)`` parsed with schema ``pb2``, or ``(None, the ParseError)``."""
    net = pb2.NetParameter()
    try:
        text_format.Merge(text, net)
    except text_format.ParseError as exc:
        return None, exc
    return net, None


def _parse_error(source: str, exc: text_format.ParseError) -> PrototxtError:
    """The one-line error for ``exc``: a field no schema has gets its own message."""
    msg = str(exc).strip()
    m = _NO_FIELD.search(msg)
    if m:
        line = exc.GetLine() if exc.GetLine() is not None else 0
        col = exc.GetColumn() if exc.GetColumn() is not None else 0
        return unknown_field_error(source, line, col, m.group(1), m.group(2))
    return PrototxtError(f"{source}:{msg} -- fix the prototxt syntax at that line and column")


def parse_net_text(text: str, source: str = "<string>"):
    """Parse prototxt text into a raw (not yet upgraded) NetParameter.

    Each schema of :func:`~caffe_utils.schema.schemas` is tried in turn (pycaffe's first when it is
    importable), so a net with fork fields that pycaffe's schema lacks is read with the project's;
    the result is a message of the schema that read it. The error reported is the last schema's,
    the project's, which knows the most fields."""
    err: Optional[text_format.ParseError] = None
    for pb2 in schemas():
        net, err = _parse_with(pb2, text)
        if net is not None:
            return net
    assert err is not None
    raise _parse_error(source, err) from err


def read_net_text(path: PathLike):
    """Read a prototxt file into a raw (not yet upgraded) NetParameter."""
    return parse_net_text(_read_text(path, "network definition", PrototxtError), str(path))


def upgrade_net(net) -> bool:
    """Upgrade ``net`` in place the way Caffe's ``UpgradeNetAsNeeded`` does. True if changed."""
    pb2 = pb2_of(net)
    changed = False
    if len(net.layers):
        if len(net.layer):
            raise PrototxtError("the net mixes V1 'layers {}' and current 'layer {}' blocks; "
                                "use one syntax throughout")
        _upgrade_v1_data_transformation(net)
        for v1 in net.layers:
            net.layer.add().CopyFrom(_upgrade_v1_layer(v1, pb2))
        net.ClearField("layers")
        changed = True
    if len(net.input_dim) or len(net.input_shape) or len(net.input):
        _upgrade_net_input(net, pb2)
        changed = True
    for layer in net.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            layer.ClearField("param")
            changed = True
    return changed


def _upgrade_v1_data_transformation(net) -> None:
    for v1 in net.layers:
        tname = v1.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[v1.type].name
        pname = {"DATA": "data_param", "IMAGE_DATA": "image_data_param",
                 "WINDOW_DATA": "window_data_param"}.get(tname)
        if pname is None or not v1.HasField(pname):
            continue
        p = getattr(v1, pname)
        tp = v1.transform_param
        if p.HasField("scale"):
            tp.scale = p.scale
            p.ClearField("scale")
        if p.HasField("mean_file"):
            tp.mean_file = p.mean_file
            p.ClearField("mean_file")
        if p.HasField("crop_size"):
            tp.crop_size = p.crop_size
            p.ClearField("crop_size")
        if p.HasField("mirror"):
            tp.mirror = p.mirror
            p.ClearField("mirror")


def _upgrade_v1_layer(v1, pb2):
    if v1.HasField("layer"):
        raise PrototxtError(f"layer '{v1.name or v1.layer.name}' uses the V0 format; convert the net "
                            "with Caffe's tools/upgrade_net_proto_text first")
    layer = pb2.LayerParameter()
    enum = v1.DESCRIPTOR.fields_by_name["type"].enum_type
    if v1.HasField("type"):
        tname = enum.values_by_number[v1.type].name
        layer.type = V1_TYPE_NAMES.get(tname, tname)
    layer.name = v1.name
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    layer.blobs.extend(v1.blobs)
    layer.loss_weight.extend(v1.loss_weight)
    n_specs = max(len(v1.param), len(v1.blob_share_mode), len(v1.blobs_lr), len(v1.weight_decay))
    for i in range(n_specs):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    layer_fields = layer.DESCRIPTOR.fields_by_name
    for fd, value in v1.ListFields():
        if fd.name.endswith("_param") and fd.name in layer_fields and fd.name != "param":
            getattr(layer, fd.name).CopyFrom(value)
    return layer


def _upgrade_net_input(net, pb2) -> None:
    has_shape, has_dim = len(net.input_shape) > 0, len(net.input_dim) > 0
    if has_shape or has_dim:
        n = len(net.input)
        if has_shape and len(net.input_shape) != n:
            raise PrototxtError(f"the net has {n} 'input' names but {len(net.input_shape)} "
                                "'input_shape' blocks; give one shape per input")
        if has_dim and not has_shape and len(net.input_dim) != 4 * n:
            raise PrototxtError(f"the net has {n} 'input' names but {len(net.input_dim)} 'input_dim' "
                                "values; give four (num, channels, height, width) per input")
        inp = pb2.LayerParameter(name="input", type="Input")
        for i, name in enumerate(net.input):
            inp.top.append(name)
            shape = inp.input_param.shape.add()
            if has_shape:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i:4 * i + 4])
        layers = [inp] + [pb2.LayerParameter.FromString(l.SerializeToString()) for l in net.layer]
        net.ClearField("layer")
        net.layer.extend(layers)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")


def _state_meets_rule(state, rule) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def filter_net(net, phase: int = TEST, level: int = 0, stages: Sequence[str] = ()):
    """Return a copy of ``net`` with only the layers that Caffe's ``FilterNet`` keeps."""
    pb2 = pb2_of(net)
    state = pb2.NetState()
    state.CopyFrom(net.state)
    state.phase = phase
    state.level = level
    state.stage.extend(s for s in stages if s not in state.stage)
    out = pb2.NetParameter()
    out.CopyFrom(net)
    out.ClearField("layer")
    for layer in net.layer:
        if len(layer.include) and len(layer.exclude):
            raise PrototxtError(f"layer '{layer.name}' has both include and exclude rules; "
                                "Caffe allows only one kind per layer")
        keep = len(layer.include) == 0
        for rule in layer.exclude:
            if _state_meets_rule(state, rule):
                keep = False
        for rule in layer.include:
            if _state_meets_rule(state, rule):
                keep = True
        if keep:
            out.layer.add().CopyFrom(layer)
    out.state.CopyFrom(state)
    return out


def read_net(path_or_net, phase: Union[int, str] = TEST, level: int = 0, stages: Sequence[str] = ()):
    """Read, upgrade and phase-filter a net: what ``caffe.Net(path, phase)`` would build from.

    ``path_or_net`` is a prototxt path or an already parsed NetParameter (which is not modified).
    """
    if isinstance(phase, str):
        phase = PHASES[phase.upper()]
    if isinstance(path_or_net, (str, os.PathLike)):
        net = read_net_text(path_or_net)
    else:
        net = type(path_or_net)()
        net.CopyFrom(path_or_net)
    upgrade_net(net)
    return filter_net(net, phase, level, stages)


def net_to_text(net) -> str:
    return text_format.MessageToString(net)


def set_lrn_alphas(net, alphas: Mapping[str, float]) -> Dict[str, float]:
    """Set ``lrn_param.alpha`` of the LRN layers named in ``alphas`` (every layer of that name,
    whatever its phase rules); the values as stored, in the field's float32, by name."""
    stored: Dict[str, float] = {}
    for lp in net.layer:
        if lp.type == "LRN" and lp.name in alphas:
            lp.lrn_param.alpha = float(alphas[lp.name])
            stored[lp.name] = float(lp.lrn_param.alpha)
    return stored

