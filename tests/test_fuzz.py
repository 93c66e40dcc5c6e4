"""Fuzz tests (hypothesis) of the readers that take user files: prototxt nets, caffemodels, image
lists and image files.

Every input must either work or raise a :class:`caffe_utils.errors.MagicInitError` (the project's
one-line user errors); anything else that escapes (KeyError, ValueError, RecursionError,
MemoryError...) is a bug and fails the test. Memory is bounded: nets are built with a
``max_bytes`` budget of :data:`NET_BYTES`, and decoding images that claim enormous sizes must be
refused before allocating.

The run is bounded for CI (about a minute on two cores) and reproducible (``derandomize``: the same
inputs every run, so a failure is never flaky). A longer, fresh fuzz run by hand::

    MAGIC_INIT_FUZZ_EXAMPLES=1000 MAGIC_INIT_FUZZ_RANDOM=1 python3 -m pytest -q tests/test_fuzz.py

Limits: what is fuzzed is the path the CLI takes up to building the numpy engine net (not the
forward pass or the initialization), the caffemodel reader with weight matching, and image listing,
decoding and preprocessing; LMDB sources are not fuzzed.
"""
from __future__ import annotations

import io
import os
import re
import resource
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Iterator, List, NamedTuple, Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

from caffe_utils import images, magic, netio, wire
from caffe_utils.engine import resolve_engine
from caffe_utils.engine.numpy_net import Net
from caffe_utils.errors import MagicInitError
from caffe_utils.schema import caffe_pb2
from nets import SMALL

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("MAGIC_INIT_FUZZ_EXAMPLES", "500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=os.environ.get("MAGIC_INIT_FUZZ_RANDOM", "") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NET_BYTES = 64 << 20  # blob budget of the fuzzed nets: a bigger net is a clean error, not a big allocation
BATCH = 2
# PIL warns about the corrupt files it is fed; that is expected here
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]


def _expect_clean(fn: Callable[[], object]) -> None:
    """Run ``fn``; a MagicInitError is a clean refusal, every other exception propagates."""
    try:
        fn()
    except MagicInitError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg.strip(), f"error message is not one line: {msg!r}"
        outcome = f"refused: {type(exc).__name__}"
    else:
        outcome = "accepted"
    if currently_in_test_context():
        event(outcome)  # pytest --hypothesis-show-statistics shows the mix


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="magic-init-fuzz-") as d:
        yield Path(d)


# ============================================================================ prototxt

V1_NET = """
name: "v1"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 20 input_dim: 20
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" blobs_lr: 1 blobs_lr: 2
  convolution_param { num_output: 4 kernel_size: 3 stride: 1 } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layers { name: "ip1" type: INNER_PRODUCT bottom: "pool1" top: "ip1" inner_product_param { num_output: 5 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip1" bottom: "label" top: "loss" }
"""

TRAIN_NET = """
name: "train"
layer { name: "data" type: "ImageData" top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 16 mirror: true mean_value: 104 mean_value: 117 mean_value: 123 }
  image_data_param { source: "list.txt" batch_size: 4 new_height: 20 new_width: 20 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 16 scale: 0.5 } data_param { source: "val_lmdb" batch_size: 2 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_h: 3 kernel_w: 5 pad_h: 1 pad_w: 2 dilation: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "prelu1" type: "PReLU" bottom: "conv1" top: "conv1" }
layer { name: "split" type: "Slice" bottom: "conv1" top: "a" top: "b" slice_param { axis: 1 slice_point: 2 } }
layer { name: "cat" type: "Concat" bottom: "b" bottom: "a" top: "cat" }
layer { name: "sum" type: "Eltwise" bottom: "cat" bottom: "cat" top: "sum" eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layer { name: "lrn" type: "LRN" bottom: "sum" top: "lrn" lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL } }
layer { name: "deconv" type: "Deconvolution" bottom: "lrn" top: "up" convolution_param { num_output: 3 kernel_size: 2 stride: 2 group: 3 } }
layer { name: "crop" type: "Crop" bottom: "up" bottom: "data" top: "crop" crop_param { axis: 2 offset: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "crop" top: "ip" inner_product_param { num_output: 7 axis: 1 } }
layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" dropout_param { dropout_ratio: 0.3 } }
layer { name: "flat" type: "Reshape" bottom: "ip" top: "r" reshape_param { shape { dim: 0 dim: -1 dim: 1 } } }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" loss_weight: 1 }
"""

SEEDS = [SMALL, V1_NET, TRAIN_NET, (ROOT / "models" / "fashion" / "deploy.prototxt").read_text()]
# the first inception block of GoogLeNet: Concat of four branches
_GOOGLENET = (ROOT / "models" / "googlenet" / "deploy.prototxt").read_text()
SEEDS.append(_GOOGLENET[:_GOOGLENET.find('name: "inception_3b')].rsplit("layer {", 1)[0])

INTERESTING_INTS = [0, 1, 2, 3, -1, -2, 7, 255, 1 << 15, (1 << 31) - 1, -(1 << 31), (1 << 32) - 1,
                    1 << 32, (1 << 63) - 1, -(1 << 63), 10 ** 20, 10 ** 6, 65536]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
QUOTED = re.compile(r'"[^"\n]*"')
WORD = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")


def _layer_field_names() -> List[str]:
    pb2 = caffe_pb2()
    names = list(pb2.LayerParameter.DESCRIPTOR.fields_by_name)
    names += list(pb2.V1LayerParameter.DESCRIPTOR.fields_by_name)
    names += list(pb2.NetParameter.DESCRIPTOR.fields_by_name)
    names += list(pb2.ConvolutionParameter.DESCRIPTOR.fields_by_name)
    return sorted(set(names))


FIELD_NAMES = _layer_field_names()
ENUM_WORDS = ["MAX", "AVE", "STOCHASTIC", "SUM", "PROD", "TRAIN", "TEST", "LMDB", "CONVOLUTION",
              "RELU", "ACROSS_CHANNELS", "WITHIN_CHANNEL", "true", "false", "inf", "nan", "-inf"]
numbers = st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-(1 << 70), 1 << 70),
                    st.floats(allow_nan=True, allow_infinity=True).map(repr))
identifiers = st.one_of(st.sampled_from(FIELD_NAMES + ENUM_WORDS), st.text(max_size=12))


@st.composite
def mutated_prototxt(draw) -> str:
    """A seed net with a few line edits, number/identifier/string replacements and a truncation."""
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["number", "number", "word", "string", "delete", "duplicate",
                                     "swap", "truncate", "insert"]))
        if kind in ("number", "word", "string"):
            pattern = {"number": NUMBER, "word": WORD, "string": QUOTED}[kind]
            matches = list(pattern.finditer(text))
            if not matches:
                continue
            m = matches[draw(st.integers(0, len(matches) - 1))]
            if kind == "number":
                new = str(draw(numbers))
            elif kind == "word":
                new = draw(identifiers)
            else:
                new = '"' + draw(st.one_of(st.sampled_from(re.findall(r'"([^"\n]*)"', text)),
                                           st.text(max_size=8))).replace('"', "").replace("\\", "") + '"'
            text = text[:m.start()] + new + text[m.end():]
            continue
        lines = text.split("\n")
        i = draw(st.integers(0, len(lines) - 1))
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(draw(st.integers(0, len(lines))), lines[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "insert":
            lines.insert(i, draw(st.sampled_from(FIELD_NAMES)) + ": " + str(draw(numbers)))
        else:
            text = text[:draw(st.integers(0, len(text)))]
            continue
        text = "\n".join(lines)
    return text


# --- structured random nets, from the schema

def _param_field_of(layer_type: str) -> str:
    special = {"ReLU": "relu_param", "PReLU": "prelu_param", "ELU": "elu_param", "LRN": "lrn_param",
               "MVN": "mvn_param", "HDF5Data": "hdf5_data_param", "TanH": "tanh_param",
               "BNLL": None, "AbsVal": None, "Deconvolution": "convolution_param",
               "SoftmaxWithLoss": "softmax_param", "SigmoidCrossEntropyLoss": "loss_param"}
    if layer_type in special:
        return special[layer_type] or ""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", layer_type).lower() + "_param"


LAYER_TYPES = ["Convolution", "Convolution", "InnerProduct", "InnerProduct", "Deconvolution", "Pooling",
               "ReLU", "LRN", "Concat", "Eltwise", "BatchNorm", "Scale", "Bias", "PReLU", "ELU", "Power",
               "Dropout", "Softmax", "SoftmaxWithLoss", "Slice", "Split", "Flatten", "Reshape", "Crop",
               "Tile", "MVN", "Threshold", "Clip", "Sigmoid", "TanH", "Exp", "Log", "AbsVal", "BNLL",
               "Accuracy", "Silence", "EuclideanLoss", "Input", "DummyData", "MemoryData", "Data",
               "ImageData", "Embed", "LSTM", "NoSuchLayer", ""]


_k = st.integers(1, 4)
PLAUSIBLE = {  # parameters that usually work, so that random nets get past the first layer
    "Convolution": st.builds("convolution_param {{ num_output: {} kernel_size: {} stride: {} pad: {} group: {} }}".format,
                             st.integers(1, 8), _k, st.integers(1, 3), st.integers(0, 2), st.sampled_from([1, 1, 2])),
    "Deconvolution": st.builds("convolution_param {{ num_output: {} kernel_size: {} stride: {} }}".format,
                               st.integers(1, 8), _k, st.integers(1, 3)),
    "InnerProduct": st.builds("inner_product_param {{ num_output: {} axis: {} }}".format,
                              st.integers(1, 16), st.sampled_from([1, 1, 1, 2, -1])),
    "Pooling": st.builds("pooling_param {{ pool: {} kernel_size: {} stride: {} global_pooling: {} }}".format,
                         st.sampled_from(["MAX", "AVE"]), _k, st.integers(1, 3), st.sampled_from(["false", "true"])),
    "Concat": st.builds("concat_param {{ axis: {} }}".format, st.integers(-2, 3)),
    "Slice": st.builds("slice_param {{ axis: {} slice_point: {} }}".format, st.integers(0, 3), st.integers(0, 3)),
    "Reshape": st.builds("reshape_param {{ shape {{ dim: 0 dim: {} }} }}".format, st.sampled_from([-1, 0, 2, 3])),
    "Eltwise": st.sampled_from(["eltwise_param { operation: SUM }", "eltwise_param { operation: MAX }",
                                "eltwise_param { operation: PROD coeff: 1 }"]),
    "LRN": st.builds("lrn_param {{ local_size: {} }}".format, st.sampled_from([1, 3, 5])),
}


def _int_strategy(lo: int, hi: int):
    small = st.integers(max(lo, -3), min(hi, 9))
    edge = st.sampled_from([v for v in INTERESTING_INTS if lo <= v <= hi])
    return st.one_of(small, small, edge, st.integers(lo, hi))


def _value_text(draw, fd, depth: int) -> str:
    FD = type(fd)
    if fd.type == FD.TYPE_MESSAGE:
        return "{ " + _message_text(draw, fd.message_type, depth + 1) + " }"
    if fd.type == FD.TYPE_ENUM:
        return draw(st.sampled_from([v.name for v in fd.enum_type.values]))
    if fd.type == FD.TYPE_BOOL:
        return draw(st.sampled_from(["true", "false"]))
    if fd.type == FD.TYPE_STRING:
        return '"' + draw(st.sampled_from(["", "a", "gaussian", "xavier", "constant", "msra", "uniform",
                                           "bilinear", "data", "x"])) + '"'
    if fd.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return repr(draw(st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e-8, 1e30]),
                                   st.floats(allow_nan=True, allow_infinity=True))))
    if fd.type in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return str(draw(_int_strategy(0, (1 << 32) - 1)))
    if fd.type in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return str(draw(_int_strategy(0, (1 << 64) - 1)))
    if fd.type in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return str(draw(_int_strategy(-(1 << 63), (1 << 63) - 1)))
    return str(draw(_int_strategy(-(1 << 31), (1 << 31) - 1)))


def _repeated(fd) -> bool:
    if hasattr(fd, "is_repeated"):  # protobuf >= 6
        return bool(fd.is_repeated)
    return fd.label == fd.LABEL_REPEATED


def _message_text(draw, desc, depth: int) -> str:
    fields = [f for f in desc.fields if depth < 2 or f.type != type(f).TYPE_MESSAGE]
    if not fields:
        return ""
    chosen = draw(st.lists(st.sampled_from(fields), max_size=4))
    parts = []
    for fd in chosen:
        for _ in range(draw(st.integers(1, 4)) if _repeated(fd) else 1):
            sep = " " if fd.type == type(fd).TYPE_MESSAGE else ": "
            parts.append(f"{fd.name}{sep}{_value_text(draw, fd, depth)}")
    return " ".join(parts)


def _one_in(draw, n: int) -> bool:
    """True with probability about 1/n (a middle value: hypothesis favours the bounds)."""
    return draw(st.integers(0, n - 1)) == n // 2


@st.composite
def structured_net(draw) -> str:
    """An Input layer and a few random layers (types, bottoms, tops and parameters from the schema)."""
    pb2 = caffe_pb2()
    lp_fields = pb2.LayerParameter.DESCRIPTOR.fields_by_name
    plausible = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 24), st.integers(1, 24)).map(list)
    wild = st.lists(_int_strategy(-(1 << 63), (1 << 63) - 1), min_size=4, max_size=4) | st.lists(
        st.integers(0, 6), max_size=5)
    dims = draw(wild if _one_in(draw, 8) else plausible)
    shape = " ".join(f"dim: {d}" for d in dims)
    layers = [f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {shape} }} }} }}']
    blobs = ["data"]
    n_layers = draw(st.integers(1, 6))
    affine_at = draw(st.integers(0, n_layers - 1)) if not _one_in(draw, 5) else -1
    for i in range(n_layers):
        ltype = draw(st.sampled_from(LAYER_TYPES if i != affine_at else ["Convolution", "InnerProduct",
                                                                         "Deconvolution"]))
        n_bottom = draw(st.integers(0, 3)) if _one_in(draw, 10) else (
            2 if ltype in ("Concat", "Eltwise", "Crop", "SoftmaxWithLoss", "Accuracy", "EuclideanLoss") else 1)
        bottoms = [draw(st.sampled_from(blobs[-3:] + ["nowhere"])) if _one_in(draw, 20)
                   else draw(st.sampled_from(blobs[-3:])) for _ in range(n_bottom)]
        n_top = draw(st.integers(0, 3)) if _one_in(draw, 10) else 1
        tops = []
        for k in range(n_top):
            if bottoms and _one_in(draw, 4):
                tops.append(bottoms[0])  # in place
            else:
                tops.append(f"b{i}_{k}")
        pfield = _param_field_of(ltype)
        params = []
        if ltype in PLAUSIBLE and not _one_in(draw, 4):
            params.append(draw(PLAUSIBLE[ltype]))
        elif pfield in lp_fields and draw(st.integers(0, 5)):
            params.append(f"{pfield} {{ {_message_text(draw, lp_fields[pfield].message_type, 0)} }}")
        if _one_in(draw, 7):
            extra = draw(st.sampled_from([f for f in lp_fields.values()
                                          if f.name.endswith("_param") or f.name in ("param", "loss_weight",
                                                                                     "propagate_down")]))
            params.append(f"{extra.name}{' ' if extra.type == type(extra).TYPE_MESSAGE else ': '}"
                          f"{_value_text(draw, extra, 0)}")
        name = draw(st.sampled_from(["data", ""])) if _one_in(draw, 16) else f"l{i}"
        text = f'layer {{ name: "{name}" type: "{ltype}" '
        text += " ".join(f'bottom: "{b}"' for b in bottoms) + " " + " ".join(f'top: "{t}"' for t in tops)
        layers.append(text + " " + " ".join(params) + " }")
        blobs.extend(t for t in tops if t not in blobs)
    return "\n".join(layers)


def _build_as_cli(path: Path) -> None:
    """What ``pipeline.run`` does with a prototxt up to the engine net (numpy engine, memory-bounded)."""
    net_param = netio.read_net(str(path), netio.TEST)
    prepared = magic.prepare_net(net_param)
    c, h, w = prepared.input_shape
    assert resolve_engine("numpy") == "numpy"
    Net(prepared.net_param, netio.TEST, None, input_shapes={prepared.input_name: (BATCH, c, h, w)},
        max_bytes=NET_BYTES)


def _check_prototxt(workdir: Path, text: str) -> None:
    path = workdir / "net.prototxt"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _expect_clean(lambda: _build_as_cli(path))


def test_seed_nets_build(workdir: Path) -> None:
    """The unmutated seeds build, so the mutations start from working nets."""
    for text in SEEDS[:2] + SEEDS[3:]:
        path = workdir / "seed.prototxt"
        path.write_text(text)
        _build_as_cli(path)


@FUZZ
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
                      st.lists(st.sampled_from(FIELD_NAMES + ENUM_WORDS + ["{", "}", ":", '"x"', "1", "-1", "\n"]),
                               max_size=60).map(" ".join)))
def test_prototxt_arbitrary_text(workdir: Path, text: str) -> None:
    _check_prototxt(workdir, text)


@FUZZ
@given(text=mutated_prototxt())
def test_prototxt_mutations(workdir: Path, text: str) -> None:
    _check_prototxt(workdir, text)


@FUZZ
@given(text=structured_net())
def test_prototxt_structured(workdir: Path, text: str) -> None:
    _check_prototxt(workdir, text)


def test_prototxt_binary_and_deep_nesting(workdir: Path) -> None:
    """Non-UTF-8 bytes and nesting deep enough to exhaust a recursive parser."""
    path = workdir / "bin.prototxt"
    for data in (b"\xff\xfe\x00layer {", b"layer { " * 100_000, b"name: \"" + b"a" * 1_000_000 + b"\"",
                 b"layer { convolution_param { weight_filler " + b"{ " * 5000):
        path.write_bytes(data)
        _expect_clean(lambda: _build_as_cli(path))


def test_huge_input_is_refused_before_allocating(workdir: Path) -> None:
    """Input dims that would take terabytes are a clean error naming the layer, not an allocation."""
    for dims in ("dim: 1 dim: 3 dim: 100000 dim: 100000", "dim: 1 dim: 3 dim: 4000 dim: 4000",
                 "dim: 1 dim: 3 dim: 9223372036854775807 dim: 9223372036854775807"):
        path = workdir / "huge.prototxt"
        path.write_text(SMALL.replace("dim: 1 dim: 3 dim: 48 dim: 48", dims))
        with pytest.raises(MagicInitError, match="layer '"):
            _build_as_cli(path)
    path.write_text(SMALL.replace("num_output: 20", "num_output: 2000000000"))
    with pytest.raises(MagicInitError, match="layer 'fc1'"):
        _build_as_cli(path)


# ============================================================================ caffemodel

class SmallModel(NamedTuple):
    """A valid caffemodel's bytes and its net's parameter shapes (short repr for failure reports)."""
    data: bytes
    expected: dict

    def __repr__(self) -> str:
        return f"SmallModel(<{len(self.data)} bytes>)"


@pytest.fixture(scope="module")
def small_model(workdir: Path) -> SmallModel:
    """A valid caffemodel of tests/nets.py's SMALL net, and the net's parameter shapes."""
    pb2 = caffe_pb2()
    net = Net(netio.parse_net_text(SMALL), netio.TEST)
    path = workdir / "small.caffemodel"
    netio.write_caffemodel(path, net.net_param, {n: [b.data for b in bl] for n, bl in net.params.items()})
    assert isinstance(pb2.NetParameter.FromString(path.read_bytes()), pb2.NetParameter)
    return SmallModel(path.read_bytes(), dict(net.param_shapes()))


def _check_caffemodel(workdir: Path, data: bytes, expected: dict) -> None:
    path = workdir / "fuzz.caffemodel"
    path.write_bytes(data)

    def load() -> None:
        weights = netio.read_caffemodel(path)
        netio.match_weights(expected, weights, str(path))
    _expect_clean(load)


def _varint_field(field: int, value: int) -> bytes:
    return wire.encode_key(field, wire.VARINT) + wire.encode_varint(value)


def _len_field(field: int, payload: bytes) -> bytes:
    return wire.len_prefix(field, len(payload)) + payload


dim_values = st.one_of(st.integers(0, 16), st.sampled_from(INTERESTING_INTS),
                       st.integers(-(1 << 63), (1 << 63) - 1))


@st.composite
def blob_proto(draw) -> bytes:
    """A BlobProto: shape (packed or not) or legacy num/channels/height/width, and float or double
    data of a length that may not match."""
    out = b""
    dims = draw(st.lists(dim_values, max_size=5))
    style = draw(st.sampled_from(["shape", "shape_unpacked", "legacy", "none"]))
    if style == "shape":
        out += _len_field(7, _len_field(1, b"".join(wire.encode_varint(d) for d in dims)))
    elif style == "shape_unpacked":
        out += _len_field(7, b"".join(_varint_field(1, d) for d in dims))
    elif style == "legacy":
        out += b"".join(_varint_field(f, d) for f, d in zip((1, 2, 3, 4), dims))
    n = draw(st.one_of(st.integers(0, 40), st.just(int(np.prod([d for d in dims if 0 < d < 64] or [1])))))
    kind = draw(st.sampled_from(["float", "double", "loose", "both", "odd"]))
    if kind in ("float", "both"):
        out += _len_field(5, np.arange(n, dtype="<f4").tobytes())
    if kind in ("double", "both"):
        out += _len_field(8, np.arange(n, dtype="<f8").tobytes())
    if kind == "loose":
        out += b"".join(wire.encode_key(5, wire.I32) + struct.pack("<f", i) for i in range(min(n, 8)))
    if kind == "odd":
        out += _len_field(5, b"\0" * draw(st.integers(1, 7)))
    return out


@st.composite
def wrong_caffemodel(draw, names: Sequence[str]) -> bytes:
    """A well-formed NetParameter (current or V1 layers) whose blobs may be nonsense."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(st.sampled_from(list(names)), st.text(max_size=5))).encode("utf-8")
        blobs = draw(st.lists(blob_proto(), max_size=3))
        if draw(st.booleans()):
            body = _len_field(1, name) + _len_field(2, b"Convolution")
            body += b"".join(_len_field(7, b) for b in blobs)
            out += _len_field(100, body)
        else:
            body = _len_field(4, name) + _varint_field(5, draw(st.integers(0, 50)))
            body += b"".join(_len_field(6, b) for b in blobs)
            out += _len_field(2, body)
    return out


def _damage(draw, data: bytearray, min_steps: int, max_steps: int, max_span: int) -> bytes:
    """``min_steps`` to ``max_steps`` random bit flips, byte sets, truncations, deletions, insertions."""
    for _ in range(draw(st.integers(min_steps, max_steps))):
        kind = draw(st.sampled_from(["flip", "flip", "set", "truncate", "delete", "insert"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[i] = draw(st.sampled_from([0, 0x7F, 0x80, 0xFF]))
        elif kind == "truncate":
            del data[i:]
        elif kind == "delete":
            del data[i:i + draw(st.integers(1, max_span))]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=max_span))
    return bytes(data)


@st.composite
def damaged_caffemodel(draw, valid: bytes) -> bytes:
    return _damage(draw, bytearray(valid), min_steps=1, max_steps=8, max_span=16)


@FUZZ
@given(data=st.binary(max_size=400))
def test_caffemodel_random_bytes(workdir: Path, small_model, data: bytes) -> None:
    _check_caffemodel(workdir, data, small_model.expected)


@FUZZ
@given(data=st.data())
def test_caffemodel_damaged(workdir: Path, small_model, data) -> None:
    valid, expected = small_model
    _check_caffemodel(workdir, data.draw(damaged_caffemodel(valid)), expected)


@FUZZ
@given(data=st.data())
def test_caffemodel_wrong_blobs(workdir: Path, small_model, data) -> None:
    expected = small_model.expected
    _check_caffemodel(workdir, data.draw(wrong_caffemodel(list(expected))), expected)


# blobs whose shapes overflow numpy (found by test_caffemodel_wrong_blobs): each must be a WeightsError
OVERFLOWING_BLOBS = [
    # V1 layer 'conv1', blob shape dim = a 10-byte varint above 2^63
    b'\x12\x1b"\x05conv1(\x002\x10:\x0c\n\n\x80\x80\xc0\x98\xd6\xc5\xd7\xe3\xeb\n*\x00',
    # layer 'conv1', blob shape (2^32, 2^32): the product overflows int64, no data
    b"\xa2\x06\x19\n\x05conv1:\x10:\x0c\n\n\x80\x80\x80\x80\x10\x80\x80\x80\x80\x10*\x00",
    # layer 'conv1', blob shape (2^62, 4), no data
    b"\xa2\x06\x19\n\x05conv1:\x10:\x0c\n\n\x80\x80\x80\x80\x80\x80\x80\x80@\x04*\x00",
    # layer 'conv1', blob shape (0, 2^62, 2^62): zero elements, but numpy cannot make the array
    b'\xa2\x06"\n\x05conv1:\x19:\x15\n\x13\x00\x80\x80\x80\x80\x80\x80\x80\x80@\x80\x80\x80\x80\x80\x80\x80\x80@*\x00',
    # layer 'conv1', legacy blob num = channels = 2^40, height = width = 1, no data
    b"\xa2\x06\x1b\n\x05conv1:\x12\x08\x80\x80\x80\x80\x80 \x10\x80\x80\x80\x80\x80 \x18\x01 \x01",
]


@pytest.mark.parametrize("data", OVERFLOWING_BLOBS, ids=["v1-varint-2^63", "2^32x2^32", "2^62x4", "0x2^62x2^62",
                                                         "legacy-2^40"])
def test_caffemodel_overflowing_shapes(workdir: Path, small_model, data: bytes) -> None:
    path = workdir / "overflow.caffemodel"
    path.write_bytes(data)
    with pytest.raises(MagicInitError):
        netio.match_weights(small_model.expected, netio.read_caffemodel(path), str(path))


# ============================================================================ image lists

list_lines = st.one_of(
    st.sampled_from(["img.png 0", "img.png", "sub/dir/spaced name.jpg 3", "  img.png   -2  "]),
    st.text(max_size=40),
    st.builds(lambda name, label: f"{name} {label}", st.text(max_size=20),
              st.one_of(st.integers(-(1 << 70), 1 << 70), st.sampled_from(["-", "--1", "1.5", "²", "٣", "-0"]))),
    st.sampled_from(["", "   ", "# comment", "a b c 3", "img.png 0", "/abs/path.jpg -1", "x\0y.png 1",
                     "sub/dir/spaced name.jpg 7", "\t\t", "\ufeffbom.png 2", "a" * 5000 + " 1"]),
)


@FUZZ
@given(lines=st.lists(list_lines, max_size=12), tail=st.binary(max_size=8), sep=st.sampled_from(["\n", "\r\n", "\r"]),
       pad=st.sampled_from([0, 4100]))
def test_image_list(workdir: Path, lines: List[str], tail: bytes, sep: str, pad: int) -> None:
    for name, data in (("img.png", REAL_IMAGES[0]), ("sub/dir/spaced name.jpg", REAL_IMAGES[1])):
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_bytes(data)
    path = workdir / "list.txt"
    path.write_bytes(("#" + "x" * pad + "\n" if pad else "").encode() +
                     sep.join(lines).encode("utf-8", "surrogatepass") + tail)

    def go() -> None:
        records = images.list_source(path, workdir)
        images.load_sample(records, 2, images.Transform(3, 4, 4, resize=6), np.random.RandomState(0))
    _expect_clean(go)


# ============================================================================ images

def _real_images() -> List[bytes]:
    from PIL import Image
    rng = np.random.RandomState(0)
    rgb = Image.fromarray(rng.randint(0, 256, (9, 7, 3)).astype(np.uint8))
    out = []
    for img, fmt, kw in [(rgb, "PNG", {}), (rgb, "JPEG", {"quality": 80}), (rgb.convert("P"), "GIF", {}),
                         (rgb, "TIFF", {}), (rgb, "BMP", {}), (rgb.convert("L"), "PNG", {}),
                         (rgb.convert("RGBA"), "PNG", {}), (Image.fromarray(rng.randint(0, 65535, (5, 6)).astype(np.uint16)), "PNG", {}),
                         (rgb, "TIFF", {"compression": "tiff_deflate"}), (rgb.convert("CMYK"), "JPEG", {})]:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


REAL_IMAGES = _real_images()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb(kind: str, w: int, h: int) -> bytes:
    """A small file whose header claims ``w`` x ``h`` pixels."""
    if kind == "png":
        return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + _png_chunk(b"IEND", b""))
    if kind == "gif":
        return (b"GIF89a" + struct.pack("<HHBBB", w & 0xFFFF, h & 0xFFFF, 0, 0, 0) + b"\x2c"
                + struct.pack("<HHHHB", 0, 0, w & 0xFFFF, h & 0xFFFF, 0) + b"\x08\x02\x4c\x01\x00\x3b")
    # BMP with a BITMAPINFOHEADER, 24 bits
    header = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(header) + 64, 0, 0, 14 + len(header)) + header + b"\0" * 64


@st.composite
def damaged_image(draw) -> bytes:
    return _damage(draw, bytearray(draw(st.sampled_from(REAL_IMAGES))), min_steps=0, max_steps=6, max_span=8)


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), damaged_image(),
                      st.builds(_bomb, st.sampled_from(["png", "gif", "bmp"]), st.integers(0, (1 << 31) - 1),
                                st.integers(0, (1 << 31) - 1))))
def test_decode_bytes(data: bytes) -> None:
    _expect_clean(lambda: images.decode_bytes(data, "fuzz"))


@FUZZ
@given(files=st.lists(st.one_of(st.sampled_from(REAL_IMAGES), damaged_image(), st.binary(max_size=64)),
                     min_size=1, max_size=4),
       crop=st.integers(1, 12), channels=st.sampled_from([1, 3, 4]), mirror=st.booleans(),
       resize=st.one_of(st.none(), st.integers(1, 16)))
def test_load_sample(workdir: Path, files: List[bytes], crop: int, channels: int, mirror: bool, resize) -> None:
    folder = workdir / "imgs"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    records = []
    for i, data in enumerate(files):
        p = folder / f"{i}.png"
        p.write_bytes(data)
        records.append(images.Record(path=p))
    transform = images.Transform(channels, crop, crop, resize=resize or None, mirror=mirror)
    _expect_clean(lambda: images.load_sample(records, 3, transform, np.random.RandomState(0)))


def test_bombs_refused_without_allocating() -> None:
    """Headers claiming enormous sizes are refused before the pixels are allocated."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for kind in ("png", "gif", "bmp"):
        for w, h in ((65535, 65535), (60000, 2000), (1 << 30, 1 << 30), (20000, 20000)):
            with pytest.raises(images.ImageReadError, match="fuzz"):
                images.decode_bytes(_bomb(kind, w, h), "fuzz")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, f"decoding bombs raised the peak memory by {grown_mib:.0f} MiB"


# ============================================================================ the harness itself

def test_harness_catches_crashes(workdir: Path) -> None:
    """A fuzz test fails on a crash: an uncaught non-MagicInitError escapes the hypothesis run."""
    @settings(max_examples=20, database=None, derandomize=True)
    @given(text=mutated_prototxt())
    def crashing(text: str) -> None:
        _expect_clean(lambda: {}["crash"])

    with pytest.raises(KeyError):
        crashing()
    _expect_clean(lambda: (_ for _ in ()).throw(netio.PrototxtError("clean")))
