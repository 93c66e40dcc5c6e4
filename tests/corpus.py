"""A conformance corpus: published Caffe architectures, emitted as prototxt by small generators.

Each generator writes its architecture from the published layer list (the paper's tables and the
layer names, fields and fork types of the well-known Caffe ports), reduced to hold CI time:
widths divided (mostly by 4 to 16), inputs of 24-64 px where the architecture allows, repeated
blocks cut to one or two while the block pattern (and its shortcut, concat or fork fields) is
kept. Nothing here is copied from those ports; the text is built from the description.

:data:`CORPUS` lists every net with its family; ``tests/test_corpus.py`` initializes each one on
both engines and checks it against pycaffe and OpenCV's ``cv2.dnn``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple


# ----------------------------------------------------------------------------- the builder

def _fmt(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value.isupper() else f'"{value}"'
    return repr(value)


def _fields(params: Dict[str, object]) -> str:
    """``{"num_output": 8, "weight_filler": {"type": "msra"}}`` as prototxt fields; a list value
    repeats its field; an UPPER-CASE string is an enum value."""
    out = []
    for key, value in params.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            out.append(f"{key} {{ {_fields(v)} }}" if isinstance(v, dict) else f"{key}: {_fmt(v)}")
    return " ".join(out)


#: V1LayerParameter's enum names for the types the V1 nets use
V1_TYPES = {"Convolution": "CONVOLUTION", "ReLU": "RELU", "Pooling": "POOLING", "Dropout": "DROPOUT",
            "InnerProduct": "INNER_PRODUCT", "SoftmaxWithLoss": "SOFTMAX_LOSS", "Accuracy": "ACCURACY",
            "Data": "DATA", "Softmax": "SOFTMAX", "LRN": "LRN", "Concat": "CONCAT"}


class Net:
    """Prototxt text, one layer at a time. ``v1`` writes ``layers { type: ENUM }`` (V1)."""

    def __init__(self, name: str, input_shape: Optional[Sequence[int]] = (1, 3, 64, 64), v1: bool = False):
        self.v1 = v1
        self.lines: List[str] = [f'name: "{name}"']
        self.names: set = set()
        if input_shape is not None:
            self.layer("data", "Input", [], "data", input_param={"shape": {"dim": list(input_shape)}})

    def layer(self, name: str, ltype: str, bottoms, tops=None, *, extra: str = "", **params) -> str:
        """Add a layer; returns its (first) top. ``tops`` defaults to the layer's name."""
        assert name not in self.names, f"layer name {name!r} used twice"
        self.names.add(name)
        bottoms = [bottoms] if isinstance(bottoms, str) else list(bottoms)
        tops = [name] if tops is None else [tops] if isinstance(tops, str) else list(tops)
        kind = f"type: {V1_TYPES[ltype]}" if self.v1 else f'type: "{ltype}"'
        parts = [f'name: "{name}"', kind] + [f'bottom: "{b}"' for b in bottoms] + [f'top: "{t}"' for t in tops]
        if extra:
            parts.append(extra)
        if params:
            parts.append(_fields(params))
        self.lines.append(("layers" if self.v1 else "layer") + " { " + " ".join(parts) + " }")
        return tops[0]

    # the common layers, with Caffe's field names
    def conv(self, name, bottom, num_output, kernel, stride=1, pad=0, group=1, bias=True, dilation=1,
             ltype="Convolution", top=None, filler="msra", extra="", **more) -> str:
        p = {"num_output": num_output}
        if not bias:
            p["bias_term"] = False
        p["kernel_size"] = kernel
        if pad:
            p["pad"] = pad
        if stride != 1:
            p["stride"] = stride
        if group != 1:
            p["group"] = group
        if dilation != 1:
            p["dilation"] = dilation
        if filler:
            p["weight_filler"] = {"type": filler}
        p.update(more)
        return self.layer(name, ltype, bottom, top, extra=extra, convolution_param=p)

    def conv_relu(self, name, relu_name, bottom, num_output, kernel, **kw) -> str:
        """A convolution and its in-place ReLU."""
        top = self.conv(name, bottom, num_output, kernel, **kw)
        self.relu(relu_name, top)
        return top

    def fc(self, name, bottom, num_output, top=None, extra="") -> str:
        return self.layer(name, "InnerProduct", bottom, top, extra=extra,
                          inner_product_param={"num_output": num_output, "weight_filler": {"type": "gaussian",
                                                                                           "std": 0.005}})

    def relu(self, name, blob, slope=0.0) -> str:
        return self.layer(name, "ReLU", blob, blob, **({"relu_param": {"negative_slope": slope}} if slope else {}))

    def pool(self, name, bottom, method="MAX", kernel=None, stride=1, pad=0, top=None, global_pooling=False,
             ceil_mode=None) -> str:
        p: Dict[str, object] = {"pool": method}
        if global_pooling:
            p["global_pooling"] = True
        else:
            p["kernel_size"] = kernel
            if stride != 1:
                p["stride"] = stride
        if pad:
            p["pad"] = pad
        if ceil_mode is not None:
            p["ceil_mode"] = ceil_mode
        return self.layer(name, "Pooling", bottom, top, pooling_param=p)

    def bn_scale(self, bn_name, scale_name, blob) -> str:
        """BatchNorm (stored statistics) + Scale with bias, in place: the ResNet/MobileNet pattern."""
        self.layer(bn_name, "BatchNorm", blob, blob, batch_norm_param={"use_global_stats": True})
        return self.layer(scale_name, "Scale", blob, blob, scale_param={"bias_term": True})

    def lrn(self, name, bottom, local_size=5, alpha=1e-4, beta=0.75, region=None) -> str:
        p: Dict[str, object] = {"local_size": local_size, "alpha": alpha, "beta": beta}
        if region:
            p["norm_region"] = region
        return self.layer(name, "LRN", bottom, **{"lrn_param": p})

    def dropout(self, name, blob, ratio=0.5) -> str:
        return self.layer(name, "Dropout", blob, blob, dropout_param={"dropout_ratio": ratio})

    def concat(self, name, bottoms, axis=None) -> str:
        return self.layer(name, "Concat", bottoms, **({"concat_param": {"axis": axis}} if axis is not None else {}))

    def eltwise(self, name, bottoms, op=None) -> str:
        return self.layer(name, "Eltwise", bottoms, **({"eltwise_param": {"operation": op}} if op else {}))

    def softmax(self, name, bottom, axis=None) -> str:
        return self.layer(name, "Softmax", bottom, **({"softmax_param": {"axis": axis}} if axis is not None else {}))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


# ----------------------------------------------------------------------------- the corpus

@dataclass(frozen=True)
class CorpusNet:
    name: str
    family: str
    text: str
    size: str                 # the reduction, in words
    input_shape: Optional[Tuple[int, int, int]] = None  # --input-shape, for a data layer without crop_size
    cv2: bool = True          # OpenCV's Caffe importer reads it (checked by the test when true)
    cv2_why: str = ""         # why not, when it does not


def caffenet() -> str:
    """CaffeNet (BVLC reference, Krizhevsky et al. 2012 with pooling before LRN), widths / 8, 67 px."""
    n = Net("CaffeNet", (1, 3, 67, 67))
    x = n.conv("conv1", "data", 12, 11, stride=4, filler="gaussian")
    n.relu("relu1", x)
    x = n.pool("pool1", x, "MAX", 3, 2)
    x = n.lrn("norm1", x)
    x = n.conv("conv2", x, 32, 5, pad=2, group=2)
    n.relu("relu2", x)
    x = n.pool("pool2", x, "MAX", 3, 2)
    x = n.lrn("norm2", x)
    x = n.conv("conv3", x, 48, 3, pad=1)
    n.relu("relu3", x)
    x = n.conv("conv4", x, 48, 3, pad=1, group=2)
    n.relu("relu4", x)
    x = n.conv("conv5", x, 32, 3, pad=1, group=2)
    n.relu("relu5", x)
    x = n.pool("pool5", x, "MAX", 3, 2)
    x = n.fc("fc6", x, 128)
    n.relu("relu6", x)
    n.dropout("drop6", x)
    x = n.fc("fc7", x, 128)
    n.relu("relu7", x)
    n.dropout("drop7", x)
    x = n.fc("fc8", x, 100)
    n.softmax("prob", x)
    return n.text()


def vgg16() -> str:
    """VGG-16 (Simonyan & Zisserman 2014, configuration D): five 3x3-conv stages with 2x2 max
    pooling, then three FC layers; widths / 16, two convs per stage instead of 2-2-3-3-3, 32 px."""
    n = Net("VGG_ILSVRC_16_layers", (1, 3, 32, 32))
    x = "data"
    for stage, width in enumerate((4, 8, 16, 32, 32), start=1):
        for i in (1, 2):
            x = n.conv(f"conv{stage}_{i}", x, width, 3, pad=1)
            n.relu(f"relu{stage}_{i}", x)
        x = n.pool(f"pool{stage}", x, "MAX", 2, 2)
    for i, width in ((6, 64), (7, 64)):
        x = n.fc(f"fc{i}", x, width)
        n.relu(f"relu{i}", x)
        n.dropout(f"drop{i}", x)
    x = n.fc("fc8", x, 100)
    n.softmax("prob", x)
    return n.text()


def _inception(n: Net, name: str, x: str, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int) -> str:
    """GoogLeNet's Inception module: 1x1, 1x1->3x3, 1x1->5x5 and 3x3 max pool->1x1, concatenated."""
    a = n.conv_relu(f"{name}/1x1", f"{name}/relu_1x1", x, c1, 1, filler="xavier")
    b = n.conv_relu(f"{name}/3x3_reduce", f"{name}/relu_3x3_reduce", x, c3r, 1, filler="xavier")
    b = n.conv_relu(f"{name}/3x3", f"{name}/relu_3x3", b, c3, 3, pad=1, filler="xavier")
    c = n.conv_relu(f"{name}/5x5_reduce", f"{name}/relu_5x5_reduce", x, c5r, 1, filler="xavier")
    c = n.conv_relu(f"{name}/5x5", f"{name}/relu_5x5", c, c5, 5, pad=2, filler="xavier")
    d = n.pool(f"{name}/pool", x, "MAX", 3, 1, pad=1)
    d = n.conv(f"{name}/pool_proj", d, cp, 1, filler="xavier")
    n.relu(f"{name}/relu_pool_proj", d)
    return n.concat(f"{name}/output", [a, b, c, d])


def googlenet() -> str:
    """GoogLeNet / Inception v1 (Szegedy et al. 2014, Table 1): the stem with LRN, inception
    3a, 3b, pool, 4a; widths / 8 (4b-5b cut), 64 px; global average pool, dropout 0.4, classifier."""
    n = Net("GoogleNet", (1, 3, 64, 64))
    x = n.conv("conv1/7x7_s2", "data", 8, 7, stride=2, pad=3, filler="xavier")
    n.relu("conv1/relu_7x7", x)
    x = n.pool("pool1/3x3_s2", x, "MAX", 3, 2)
    x = n.lrn("pool1/norm1", x)
    x = n.conv("conv2/3x3_reduce", x, 8, 1, filler="xavier")
    n.relu("conv2/relu_3x3_reduce", x)
    x = n.conv("conv2/3x3", x, 24, 3, pad=1, filler="xavier")
    n.relu("conv2/relu_3x3", x)
    x = n.lrn("conv2/norm2", x)
    x = n.pool("pool2/3x3_s2", x, "MAX", 3, 2)
    x = _inception(n, "inception_3a", x, 8, 12, 16, 2, 4, 4)
    x = _inception(n, "inception_3b", x, 16, 16, 24, 4, 12, 8)
    x = n.pool("pool3/3x3_s2", x, "MAX", 3, 2)
    x = _inception(n, "inception_4a", x, 24, 12, 26, 2, 6, 8)
    x = n.pool("pool5/7x7_s1", x, "AVE", 4, 1)
    n.dropout("pool5/drop_7x7_s1", x, 0.4)
    x = n.fc("loss3/classifier", x, 100)
    n.softmax("prob", x)
    return n.text()


def nin_cifar_v1() -> str:
    """Network in Network for CIFAR-10 (Lin et al. 2013) as a V1 training net: ``layers { type:
    CONVOLUTION }``, LMDB Data layers for both phases with crop_size, blobs_lr/weight_decay, a
    SOFTMAX_LOSS and a TEST-phase ACCURACY; mlpconv widths / 8."""
    n = Net("CIFAR10_NIN", None, v1=True)
    lr = "blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0"
    for phase, source in (("TRAIN", "cifar-train-lmdb"), ("TEST", "cifar-test-lmdb")):
        n.layer(f"cifar_{phase.lower()}", "Data", [], ["data", "label"],
                data_param={"source": source, "batch_size": 128, "backend": "LMDB"},
                transform_param={"crop_size": 32, "mirror": phase == "TRAIN",
                                 "mean_value": [125.3, 123.0, 113.9]},
                include={"phase": phase})
    x = "data"
    blocks = [("conv1", 24, 5, 2, ("cccp1", 20), ("cccp2", 12), ("pool1", "MAX"), "drop3"),
              ("conv2", 24, 5, 2, ("cccp3", 24), ("cccp4", 24), ("pool2", "AVE"), "drop6"),
              ("conv3", 24, 3, 1, ("cccp5", 24), ("cccp6", 10), ("pool3", "AVE"), None)]
    for conv, width, k, pad, (c1, w1), (c2, w2), (pool, method), drop in blocks:
        x = n.conv(conv, x, width, k, pad=pad, filler="gaussian", extra=lr)
        n.relu(f"relu_{conv}", x)
        for c, w in ((c1, w1), (c2, w2)):
            x = n.conv(c, x, w, 1, filler="gaussian", extra=lr)
            n.relu(f"relu_{c}", x)
        if pool == "pool3":
            x = n.pool(pool, x, method, 8, 1)
        else:
            x = n.pool(pool, x, method, 3, 2)
        if drop:
            n.dropout(drop, x)
    n.layer("loss", "SoftmaxWithLoss", [x, "label"], "loss")
    n.layer("accuracy", "Accuracy", [x, "label"], "accuracy", include={"phase": "TEST"})
    return n.text()


def lenet_v1() -> str:
    """LeNet for MNIST (LeCun et al. 1998, Caffe's example) as the V1 training net: a DATA layer
    with scale 1/256 and no crop_size (its size comes from --input-shape 1,28,28), full widths."""
    n = Net("LeNet", None, v1=True)
    lr = "blobs_lr: 1 blobs_lr: 2"
    for phase, source in (("TRAIN", "mnist_train_lmdb"), ("TEST", "mnist_test_lmdb")):
        n.layer(f"mnist_{phase.lower()}", "Data", [], ["data", "label"],
                data_param={"source": source, "batch_size": 64, "backend": "LMDB"},
                transform_param={"scale": 0.00390625}, include={"phase": phase})
    x = n.conv("conv1", "data", 20, 5, filler="xavier", extra=lr)
    x = n.pool("pool1", x, "MAX", 2, 2)
    x = n.conv("conv2", x, 50, 5, filler="xavier", extra=lr)
    x = n.pool("pool2", x, "MAX", 2, 2)
    x = n.layer("ip1", "InnerProduct", x, extra=lr,
                inner_product_param={"num_output": 500, "weight_filler": {"type": "xavier"}})
    n.relu("relu1", x)
    x = n.layer("ip2", "InnerProduct", x, extra=lr,
                inner_product_param={"num_output": 10, "weight_filler": {"type": "xavier"}})
    n.layer("accuracy", "Accuracy", [x, "label"], "accuracy", include={"phase": "TEST"})
    n.layer("loss", "SoftmaxWithLoss", [x, "label"], "loss")
    return n.text()


def _resnet_stem(n: Net) -> str:
    x = n.conv("conv1", "data", 8, 7, stride=2, pad=3)
    n.bn_scale("bn_conv1", "scale_conv1", x)
    n.relu("conv1_relu", x)
    return n.pool("pool1", x, "MAX", 3, 2)


def _resnet_head(n: Net, x: str, size: int) -> None:
    x = n.pool("pool5", x, "AVE", size, 1)
    x = n.fc("fc1000", x, 100)
    n.softmax("prob", x)


def resnet18() -> str:
    """ResNet-18 (He et al. 2015, Table 1): basic blocks of two 3x3 convs, each conv with
    BatchNorm + Scale, projection shortcuts (1x1, stride 2) where the size changes, Eltwise SUM;
    one block per stage instead of two, widths / 8, 64 px."""
    n = Net("ResNet-18", (1, 3, 64, 64))
    x = _resnet_stem(n)
    cin = 8
    for stage, width in zip((2, 3, 4, 5), (8, 16, 32, 64)):
        b, stride = f"{stage}a", (1 if stage == 2 else 2)
        short = x
        if stride != 1 or cin != width:
            short = n.conv(f"res{b}_branch1", x, width, 1, stride=stride, bias=False)
            n.bn_scale(f"bn{b}_branch1", f"scale{b}_branch1", short)
        y = n.conv(f"res{b}_branch2a", x, width, 3, stride=stride, pad=1, bias=False)
        n.bn_scale(f"bn{b}_branch2a", f"scale{b}_branch2a", y)
        n.relu(f"res{b}_branch2a_relu", y)
        y = n.conv(f"res{b}_branch2b", y, width, 3, pad=1, bias=False)
        n.bn_scale(f"bn{b}_branch2b", f"scale{b}_branch2b", y)
        x = n.eltwise(f"res{b}", [short, y])
        n.relu(f"res{b}_relu", x)
        cin = width
    _resnet_head(n, x, 2)
    return n.text()


def resnet50(blocks: Sequence[int] = (2, 1, 1, 1), widths: Sequence[int] = (4, 8, 16, 32), stem: int = 8,
             size: int = 64, classes: int = 100, name: str = "ResNet-50") -> str:
    """ResNet-50 (He et al. 2015) as in the authors' Caffe release: bottleneck blocks 1x1-3x3-1x1
    without conv biases, BatchNorm (use_global_stats) + Scale after each conv, the stride on the
    first 1x1 (branch2a) of res3a/res4a/res5a, projection branch1 in each stage's first block,
    identity shortcuts after; blocks per stage 2-1-1-1 instead of 3-4-6-3, widths / 16, 64 px.

    ``blocks`` (per stage), ``widths`` (each stage's bottleneck width; outputs are 4x), ``stem``
    (conv1's width), ``size`` (input px, a multiple of 32) and ``classes`` let the benchmarks emit
    the published net: ``resnet50((3, 4, 6, 3), (64, 128, 256, 512), 64, 224, 1000)``; with
    blocks 3-4-23-3 it is ResNet-101, whose stages of more than 6 blocks name them as the
    release does: res4a, res4b1 ... res4b22."""
    n = Net(name, (1, 3, size, size))
    x = n.conv("conv1", "data", stem, 7, stride=2, pad=3)
    n.bn_scale("bn_conv1", "scale_conv1", x)
    n.relu("conv1_relu", x)
    x = n.pool("pool1", x, "MAX", 3, 2)
    for stage, mid, count in zip((2, 3, 4, 5), widths, blocks):
        for i in range(count):
            b = f"{stage}{'abcdef'[i]}" if count <= 6 else f"{stage}{'a' if i == 0 else f'b{i}'}"
            stride = 2 if i == 0 and stage != 2 else 1
            short = x
            if i == 0:
                short = n.conv(f"res{b}_branch1", x, 4 * mid, 1, stride=stride, bias=False)
                n.bn_scale(f"bn{b}_branch1", f"scale{b}_branch1", short)
            y = n.conv(f"res{b}_branch2a", x, mid, 1, stride=stride, bias=False)
            n.bn_scale(f"bn{b}_branch2a", f"scale{b}_branch2a", y)
            n.relu(f"res{b}_branch2a_relu", y)
            y = n.conv(f"res{b}_branch2b", y, mid, 3, pad=1, bias=False)
            n.bn_scale(f"bn{b}_branch2b", f"scale{b}_branch2b", y)
            n.relu(f"res{b}_branch2b_relu", y)
            y = n.conv(f"res{b}_branch2c", y, 4 * mid, 1, bias=False)
            n.bn_scale(f"bn{b}_branch2c", f"scale{b}_branch2c", y)
            x = n.eltwise(f"res{b}", [short, y])
            n.relu(f"res{b}_relu", x)
    x = n.pool("pool5", x, "AVE", size // 32, 1)
    x = n.fc("fc1000", x, classes)
    n.softmax("prob", x)
    return n.text()


def squeezenet11() -> str:
    """SqueezeNet v1.1 (Iandola et al. 2016, the v1.1 release): 3x3/2 conv1, eight Fire modules
    (squeeze 1x1, expand 1x1 and 3x3, concatenated) with max pools after conv1, fire3 and fire5,
    dropout, 1x1 conv10 + ReLU and global average pooling; all widths / 4, 64 px."""
    n = Net("SqueezeNet_v1.1", (1, 3, 64, 64))
    x = n.conv("conv1", "data", 16, 3, stride=2, filler="xavier")
    n.relu("relu_conv1", x)
    x = n.pool("pool1", x, "MAX", 3, 2)
    fires = {2: (4, 16), 3: (4, 16), 4: (8, 32), 5: (8, 32), 6: (12, 48), 7: (12, 48), 8: (16, 64), 9: (16, 64)}
    for f, (s, e) in fires.items():
        x = n.conv_relu(f"fire{f}/squeeze1x1", f"fire{f}/relu_squeeze1x1", x, s, 1, filler="xavier")
        a = n.conv_relu(f"fire{f}/expand1x1", f"fire{f}/relu_expand1x1", x, e, 1, filler="xavier")
        b = n.conv_relu(f"fire{f}/expand3x3", f"fire{f}/relu_expand3x3", x, e, 3, pad=1, filler="xavier")
        x = n.concat(f"fire{f}/concat", [a, b])
        if f in (3, 5):
            x = n.pool(f"pool{f}", x, "MAX", 3, 2)
    n.dropout("drop9", x)
    x = n.conv("conv10", x, 100, 1, filler="gaussian")
    n.relu("relu_conv10", x)
    x = n.pool("pool10", x, "AVE", global_pooling=True)
    n.softmax("prob", x)
    return n.text()


def densenet121() -> str:
    """DenseNet-121 (Huang et al. 2016, Table 1) in the pre-activation layout of its Caffe port:
    conv1 7x7/2 + BN/Scale/ReLU, 3x3/2 max pool with ``ceil_mode: false`` (the port's fork field),
    dense layers BN-Scale-ReLU-1x1(4k)-BN-Scale-ReLU-3x3(k) concatenated onto their input,
    transitions BN-Scale-ReLU-1x1 (compression 0.5) + 2x2 average pool, a final BN/Scale/ReLU,
    global pool and a 1x1-conv classifier; growth 4 instead of 32, 2 layers per block instead of
    6-12-24-16, 64 px."""
    k = 4
    n = Net("DenseNet-121", (1, 3, 64, 64))
    x = n.conv("conv1", "data", 2 * k, 7, stride=2, pad=3, bias=False)
    n.bn_scale("conv1/bn", "conv1/scale", x)
    n.relu("relu1", x)
    x = n.pool("pool1", x, "MAX", 3, 2, pad=1, ceil_mode=False)
    channels, size = 2 * k, 16
    for block in (1, 2, 3, 4):
        for i in (1, 2):
            name = f"conv{block + 1}_{i}"
            y = n.layer(f"{name}/x1/bn", "BatchNorm", x, f"{name}/x1/bn", batch_norm_param={"eps": 1e-5})
            n.layer(f"{name}/x1/scale", "Scale", y, y, scale_param={"bias_term": True})
            n.relu(f"relu{block + 1}_{i}/x1", y)
            y = n.conv(f"{name}/x1", y, 4 * k, 1, bias=False)
            n.bn_scale(f"{name}/x2/bn", f"{name}/x2/scale", y)
            n.relu(f"relu{block + 1}_{i}/x2", y)
            y = n.conv(f"{name}/x2", y, k, 3, pad=1, bias=False)
            x = n.concat(f"concat_{block + 1}_{i}", [x, y])
            channels += k
        name = f"conv{block + 1}_blk"
        y = n.layer(f"{name}/bn", "BatchNorm", x, f"{name}/bn", batch_norm_param={"eps": 1e-5})
        n.layer(f"{name}/scale", "Scale", y, y, scale_param={"bias_term": True})
        n.relu(f"relu{block + 1}_blk", y)
        if block < 4:
            channels //= 2
            y = n.conv(name, y, channels, 1, bias=False)
            x = n.pool(f"pool{block + 1}", y, "AVE", 2, 2)
            size //= 2
        else:
            x = y
    x = n.pool("pool5", x, "AVE", size, 1)
    x = n.conv("fc6", x, 100, 1)
    n.softmax("prob", x)
    return n.text()


MOBILENET_V1 = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (1024, 2), (1024, 1)]


def mobilenet_v1(dw_type: str = "Convolution", width_div: int = 8, pairs_512: int = 1, size: int = 64,
                 classes: int = 100) -> str:
    """MobileNet v1 (Howard et al. 2017, Table 1) as in its BatchNorm Caffe port: 3x3/2 conv1, then
    depthwise 3x3 + pointwise 1x1 pairs, each conv followed by BatchNorm + Scale + ReLU, global
    pool and a 1x1-conv classifier. ``dw_type`` "Convolution" writes the depthwise convs as
    ``group: C`` (with ``engine: CAFFE``), or as the fork types "DepthwiseConvolution" /
    "ConvolutionDepthwise". Widths / 8, one of the five 512-wide pairs, 64 px.

    ``width_div``, ``pairs_512`` (how many of the stride-1 512-wide pairs conv5_1..conv5_5 are
    written), ``size`` and ``classes`` let the benchmarks emit the published net:
    ``mobilenet_v1(width_div=1, pairs_512=5, size=224, classes=1000)``."""
    n = Net("MobileNet", (1, 3, size, size))
    x = n.conv("conv1", "data", 32 // width_div, 3, stride=2, pad=1, bias=False)
    n.bn_scale("conv1/bn", "conv1/scale", x)
    n.relu("relu1", x)
    cin = 32 // width_div
    names = ["2_1", "2_2", "3_1", "3_2", "4_1", "4_2"] + [f"5_{i}" for i in range(1, pairs_512 + 1)] + ["5_6", "6"]
    layout = MOBILENET_V1[:6] + [MOBILENET_V1[6]] * pairs_512 + MOBILENET_V1[7:]
    for tag, (width, stride) in zip(names, layout):
        width //= width_div
        if dw_type == "Convolution":
            x = n.conv(f"conv{tag}/dw", x, cin, 3, stride=stride, pad=1, group=cin, bias=False, engine="CAFFE")
        else:
            x = n.conv(f"conv{tag}/dw", x, cin, 3, stride=stride, pad=1, group=cin, bias=False, ltype=dw_type)
        n.bn_scale(f"conv{tag}/dw/bn", f"conv{tag}/dw/scale", x)
        n.relu(f"relu{tag}/dw", x)
        x = n.conv(f"conv{tag}/sep", x, width, 1, bias=False)
        n.bn_scale(f"conv{tag}/sep/bn", f"conv{tag}/sep/scale", x)
        n.relu(f"relu{tag}/sep", x)
        cin = width
    x = n.pool("pool6", x, "AVE", global_pooling=True)
    x = n.conv("fc7", x, classes, 1)
    n.softmax("prob", x)
    return n.text()


def mobilenet_v2() -> str:
    """MobileNet v2 (Sandler et al. 2018, Table 2): inverted residual bottlenecks (1x1 expand t,
    3x3 depthwise as ``group: C``, linear 1x1 project; BatchNorm + Scale after each conv, ReLU6
    after the first two) with an Eltwise SUM shortcut where stride is 1 and widths match; widths
    / 4, repeats 1-2-2-2-1-1-1 instead of 1-2-3-4-3-3-1, 64 px."""
    n = Net("MobileNetV2", (1, 3, 64, 64))
    x = n.conv("conv1", "data", 8, 3, stride=2, pad=1, bias=False)
    n.bn_scale("conv1/bn", "conv1/scale", x)
    n.layer("relu1", "ReLU6", x, x)
    cin = 8
    table = [(1, 4, 1, 1), (6, 6, 2, 2), (6, 8, 2, 2), (6, 16, 2, 2), (6, 24, 1, 1), (6, 40, 1, 2), (6, 80, 1, 1)]
    for stage, (t, c, reps, s) in enumerate(table, start=2):
        for i in range(1, reps + 1):
            tag, stride, hidden = f"{stage}_{i}", (s if i == 1 else 1), cin * t
            inp = x
            y = n.conv(f"conv{tag}/expand", x, hidden, 1, bias=False)
            n.bn_scale(f"conv{tag}/expand/bn", f"conv{tag}/expand/scale", y)
            n.layer(f"relu{tag}/expand", "ReLU6", y, y)
            y = n.conv(f"conv{tag}/dwise", y, hidden, 3, stride=stride, pad=1, group=hidden, bias=False)
            n.bn_scale(f"conv{tag}/dwise/bn", f"conv{tag}/dwise/scale", y)
            n.layer(f"relu{tag}/dwise", "ReLU6", y, y)
            y = n.conv(f"conv{tag}/linear", y, c, 1, bias=False)
            n.bn_scale(f"conv{tag}/linear/bn", f"conv{tag}/linear/scale", y)
            x = n.eltwise(f"block_{tag}", [inp, y]) if stride == 1 and cin == c else y
            cin = c
    x = n.conv("conv6", x, 320, 1, bias=False)
    n.bn_scale("conv6/bn", "conv6/scale", x)
    n.layer("relu6", "ReLU6", x, x)
    x = n.pool("pool6", x, "AVE", global_pooling=True)
    x = n.conv("fc7", x, 100, 1)
    n.softmax("prob", x)
    return n.text()


def shufflenet_v1() -> str:
    """ShuffleNet v1, g = 3 (Zhang et al. 2017, Table 1): 3x3/2 conv + 3x3/2 max pool, units of
    grouped 1x1 + BN + ReLU, ShuffleChannel (the fork type), 3x3 depthwise + BN, grouped 1x1 + BN;
    a stride-2 unit concatenates a 3x3/2 average-pooled shortcut, a stride-1 unit adds it
    (Eltwise); the first 1x1 of stage 2 is not grouped. Widths / 10, units 2-2-1 instead of
    4-8-4, 64 px."""
    g = 3
    n = Net("ShuffleNet_g3", (1, 3, 64, 64))
    x = n.conv("conv1", "data", 12, 3, stride=2, pad=1, bias=False)
    n.bn_scale("conv1/bn", "conv1/scale", x)
    n.relu("conv1/relu", x)
    x = n.pool("pool1", x, "MAX", 3, 2)
    cin = 12
    for stage, (width, units) in zip((2, 3, 4), ((24, 2), (48, 2), (96, 1))):
        for u in range(1, units + 1):
            tag = f"stage{stage}_{u}"
            down = u == 1
            out = width - cin if down else width
            mid = width // 4
            groups = 1 if stage == 2 and u == 1 else g
            y = n.conv(f"{tag}/gconv1", x, mid, 1, group=groups, bias=False)
            n.bn_scale(f"{tag}/gconv1/bn", f"{tag}/gconv1/scale", y)
            n.relu(f"{tag}/gconv1/relu", y)
            y = n.layer(f"{tag}/shuffle", "ShuffleChannel", y, shuffle_channel_param={"group": g})
            y = n.conv(f"{tag}/dwconv", y, mid, 3, stride=2 if down else 1, pad=1, group=mid, bias=False)
            n.bn_scale(f"{tag}/dwconv/bn", f"{tag}/dwconv/scale", y)
            y = n.conv(f"{tag}/gconv2", y, out, 1, group=g, bias=False)
            n.bn_scale(f"{tag}/gconv2/bn", f"{tag}/gconv2/scale", y)
            if down:
                short = n.pool(f"{tag}/pool", x, "AVE", 3, 2)
                x = n.concat(f"{tag}/concat", [short, y])
            else:
                x = n.eltwise(f"{tag}/add", [x, y])
            n.relu(f"{tag}/relu", x)
            cin = width
    x = n.pool("pool_ave", x, "AVE", global_pooling=True)
    x = n.fc("fc1000", x, 100)
    n.softmax("prob", x)
    return n.text()


def ssd_vgg() -> str:
    """SSD (Liu et al. 2016) on reduced VGG-16: conv4_3 + Normalize (scale 20), pool5 3x3/1,
    dilated fc6 (dilation 6) and 1x1 fc7, extra conv6/conv7 pairs; per source a loc and a conf
    3x3 conv, Permute (0,2,3,1) + Flatten, PriorBox; Concat of all; conf Reshape + Softmax +
    Flatten; DetectionOutput. Widths / 16, one conv per VGG stage, 4 sources, 64 px."""
    classes = 3
    n = Net("SSD_VGG", (1, 3, 64, 64))
    x = "data"
    for stage, width in enumerate((4, 8, 16, 32, 32), start=1):
        tag = f"{stage}_3" if stage >= 4 else f"{stage}_1"
        x = n.conv(f"conv{tag}", x, width, 3, pad=1, filler="xavier")
        n.relu(f"relu{tag}", x)
        if stage == 4:
            conv4_3 = x
        x = n.pool(f"pool{stage}", x, "MAX", 3 if stage == 5 else 2, 1 if stage == 5 else 2, pad=1 if stage == 5 else 0)
    x = n.conv("fc6", x, 64, 3, pad=6, dilation=6, filler="xavier")
    n.relu("relu6", x)
    fc7 = n.conv("fc7", x, 64, 1, filler="xavier")
    n.relu("relu7", fc7)
    x = n.conv("conv6_1", fc7, 16, 1, filler="xavier")
    n.relu("conv6_1_relu", x)
    conv6_2 = n.conv("conv6_2", x, 32, 3, stride=2, pad=1, filler="xavier")
    n.relu("conv6_2_relu", conv6_2)
    x = n.conv("conv7_1", conv6_2, 8, 1, filler="xavier")
    n.relu("conv7_1_relu", x)
    conv7_2 = n.conv("conv7_2", x, 16, 3, stride=2, pad=1, filler="xavier")
    n.relu("conv7_2_relu", conv7_2)
    norm = n.layer("conv4_3_norm", "Normalize", conv4_3, norm_param={
        "across_spatial": False, "scale_filler": {"type": "constant", "value": 20}, "channel_shared": False})
    sources = [(norm, 20, None, 2), ("fc7", 30, 50, 3), ("conv6_2", 50, 70, 3), ("conv7_2", 70, 90, 2)]
    locs, confs, priors = [], [], []
    for src, min_size, max_size, ratios in sources:
        p = {"min_size": min_size, "aspect_ratio": [2.0] + ([3.0] if ratios == 3 else []), "flip": True,
             "clip": False, "variance": [0.1, 0.1, 0.2, 0.2], "offset": 0.5}
        if max_size:
            p["max_size"] = max_size
        boxes = (2 if max_size else 1) + 2 * len(p["aspect_ratio"])  # flip doubles each ratio
        for kind, per, out in (("loc", 4, locs), ("conf", classes, confs)):
            y = n.conv(f"{src}_mbox_{kind}", src, boxes * per, 3, pad=1, filler="xavier")
            y = n.layer(f"{src}_mbox_{kind}_perm", "Permute", y, permute_param={"order": [0, 2, 3, 1]})
            out.append(n.layer(f"{src}_mbox_{kind}_flat", "Flatten", y, flatten_param={"axis": 1}))
        priors.append(n.layer(f"{src}_mbox_priorbox", "PriorBox", [src, "data"], prior_box_param=p))
    loc = n.concat("mbox_loc", locs, axis=1)
    conf = n.concat("mbox_conf", confs, axis=1)
    prior = n.concat("mbox_priorbox", priors, axis=2)
    y = n.layer("mbox_conf_reshape", "Reshape", conf, reshape_param={"shape": {"dim": [0, -1, classes]}})
    y = n.softmax("mbox_conf_softmax", y, axis=2)
    y = n.layer("mbox_conf_flatten", "Flatten", y, flatten_param={"axis": 1})
    n.layer("detection_out", "DetectionOutput", [loc, y, prior], detection_output_param={
        "num_classes": classes, "share_location": True, "background_label_id": 0,
        "nms_param": {"nms_threshold": 0.45, "top_k": 40}, "code_type": "CENTER_SIZE", "keep_top_k": 20,
        "confidence_threshold": 0.01})
    return n.text()


def mtcnn_pnet() -> str:
    """MTCNN's P-Net (Zhang et al. 2016, Fig. 2): three 3x3 convs with PReLU and a 2x2 max pool,
    then 1x1 face classification (Softmax) and box regression; full widths; fully convolutional,
    so a 24 px input instead of 12."""
    n = Net("PNet", (1, 3, 24, 24))
    x = n.conv("conv1", "data", 10, 3, filler="xavier")
    n.layer("PReLU1", "PReLU", x, x)
    x = n.pool("pool1", x, "MAX", 2, 2)
    x = n.conv("conv2", x, 16, 3, filler="xavier")
    n.layer("PReLU2", "PReLU", x, x)
    x = n.conv("conv3", x, 32, 3, filler="xavier")
    n.layer("PReLU3", "PReLU", x, x)
    cls = n.conv("conv4-1", x, 2, 1, filler="xavier")
    n.conv("conv4-2", x, 4, 1, filler="xavier")
    n.softmax("prob1", cls)
    return n.text()


def mtcnn_onet() -> str:
    """MTCNN's O-Net (Zhang et al. 2016, Fig. 2): 3x3 convs with PReLU and max pools (3x3/2, 3x3/2,
    2x2/2), a 2x2 conv, a 256 FC with PReLU and dropout, three heads (face Softmax, box,
    landmarks); widths / 4, 48 px as published."""
    n = Net("ONet", (1, 3, 48, 48))
    x = "data"
    for i, (width, k, pool) in enumerate(((8, 3, (3, 2)), (16, 3, (3, 2)), (16, 3, (2, 2)), (32, 2, None)), 1):
        x = n.conv(f"conv{i}", x, width, k, filler="xavier")
        n.layer(f"prelu{i}", "PReLU", x, x)
        if pool:
            x = n.pool(f"pool{i}", x, "MAX", pool[0], pool[1])
    x = n.fc("conv5", x, 64)
    n.dropout("drop5", x, 0.25)
    n.layer("prelu5", "PReLU", x, x)
    cls = n.fc("conv6-1", x, 2)
    n.fc("conv6-2", x, 4)
    n.fc("conv6-3", x, 10)
    n.softmax("prob1", cls)
    return n.text()


def fcn16s() -> str:
    """FCN-16s (Long et al. 2015): VGG trunk whose conv1_1 pads generously (100 px in the paper's
    nets, 20 here) so that the output covers the input, fc6/fc7 as convolutions, 1x1 score_fr,
    a 2x Deconvolution (no bias, frozen lr_mult 0), a 1x1 score_pool4 cropped onto it (Crop axis 2),
    Eltwise SUM, a 16x Deconvolution cropped to the image; widths / 16, one conv per stage, 64 px."""
    classes = 5
    n = Net("FCN-16s", (1, 3, 64, 64))
    x = "data"
    for stage, width in enumerate((4, 8, 16, 16, 32), start=1):
        x = n.conv(f"conv{stage}_1", x, width, 3, pad=20 if stage == 1 else 1)
        n.relu(f"relu{stage}_1", x)
        x = n.pool(f"pool{stage}", x, "MAX", 2, 2)
        if stage == 4:
            pool4 = x
    x = n.conv("fc6", x, 64, 3)
    n.relu("relu6", x)
    n.dropout("drop6", x)
    x = n.conv("fc7", x, 64, 1)
    n.relu("relu7", x)
    n.dropout("drop7", x)
    x = n.conv("score_fr", x, classes, 1, filler=None)
    frozen = "param { lr_mult: 0 }"
    up2 = n.layer("upscore2", "Deconvolution", x, extra=frozen, convolution_param={
        "num_output": classes, "bias_term": False, "kernel_size": 4, "stride": 2})
    sp4 = n.conv("score_pool4", pool4, classes, 1, filler=None)
    sp4c = n.layer("score_pool4c", "Crop", [sp4, up2], crop_param={"axis": 2, "offset": 1})
    fuse = n.eltwise("fuse_pool4", [up2, sp4c], "SUM")
    up16 = n.layer("upscore16", "Deconvolution", fuse, extra=frozen, convolution_param={
        "num_output": classes, "bias_term": False, "kernel_size": 32, "stride": 16})
    n.layer("score", "Crop", [up16, "data"], crop_param={"axis": 2, "offset": 24})
    return n.text()


def pspnet() -> str:
    """PSPNet (Zhao et al. 2017): a dilated trunk with BN/Scale/ReLU (3x3/2 stem convs, max pool,
    a dilation-2 conv), the pyramid pooling module (average pools to 1, 2 and 4 bins, 1x1 conv +
    BN/Scale/ReLU each, Interp back to the map's size with height/width, Concat), a 3x3 conv +
    dropout, the 1x1 classifier and an Interp with zoom_factor 8. Widths / 32, bins 1-2-4 instead
    of 1-2-3-6, 60 px."""
    n = Net("PSPNet", (1, 3, 60, 60))
    x = "data"
    for i, (width, stride) in enumerate(((4, 2), (4, 1), (8, 1)), start=1):
        x = n.conv(f"conv1_{i}_3x3" + ("_s2" if stride == 2 else ""), x, width, 3, stride=stride, pad=1, bias=False)
        n.bn_scale(f"conv1_{i}_bn", f"conv1_{i}_scale", x)
        n.relu(f"conv1_{i}_relu", x)
    x = n.pool("pool1_3x3_s2", x, "MAX", 3, 2, pad=1)
    x = n.conv("conv2_3x3_s2", x, 16, 3, stride=2, pad=1, bias=False)
    n.bn_scale("conv2_bn", "conv2_scale", x)
    n.relu("conv2_relu", x)
    x = n.conv("conv5_3", x, 32, 3, pad=2, dilation=2, bias=False)
    n.bn_scale("conv5_3_bn", "conv5_3_scale", x)
    n.relu("conv5_3_relu", x)
    branches = [x]
    for bins in (1, 2, 4):
        y = n.pool(f"conv5_3_pool{bins}", x, "AVE", 8 // bins, 8 // bins)
        y = n.conv(f"conv5_3_pool{bins}_conv", y, 8, 1, bias=False)
        n.bn_scale(f"conv5_3_pool{bins}_conv_bn", f"conv5_3_pool{bins}_conv_scale", y)
        n.relu(f"conv5_3_pool{bins}_conv_relu", y)
        branches.append(n.layer(f"conv5_3_pool{bins}_interp", "Interp", y, interp_param={"height": 8, "width": 8}))
    x = n.concat("conv5_3_concat", branches)
    x = n.conv("conv5_4", x, 16, 3, pad=1, bias=False)
    n.bn_scale("conv5_4_bn", "conv5_4_scale", x)
    n.relu("conv5_4_relu", x)
    n.dropout("conv5_4_drop", x, 0.1)
    x = n.conv("conv6", x, 5, 1)
    n.layer("conv6_interp", "Interp", x, interp_param={"zoom_factor": 8})
    return n.text()


def yolov3_tiny() -> str:
    """YOLOv3-tiny (Redmon & Farhadi 2018) as its Caffe ports write it: 3x3 convs with BatchNorm +
    Scale + leaky ReLU (ReLU negative_slope 0.1) and 2x2/2 max pools, two 1x1 detection convs,
    the route through a 1x1 conv and Upsample (scale 2, the fork type) concatenated with the
    stride-16 map; widths / 8, the last stride-1 max pool left out, one class, 64 px."""
    n = Net("yolov3-tiny", (1, 3, 64, 64))
    x = "data"
    idx = 0

    def cbl(x, width, k):
        nonlocal idx
        name = f"layer{idx}-conv"
        y = n.conv(name, x, width, k, pad=k // 2, bias=False)
        n.bn_scale(f"layer{idx}-bn", f"layer{idx}-scale", y)
        n.relu(f"layer{idx}-act", y, slope=0.1)
        idx += 1
        return y

    for i, width in enumerate((2, 4, 8, 16, 32)):
        x = cbl(x, width, 3)
        if i == 4:
            route = x
        x = n.pool(f"layer{idx}-maxpool", x, "MAX", 2, 2)
        idx += 1
    x = cbl(x, 64, 3)
    x = cbl(x, 128, 3)
    x = cbl(x, 32, 1)
    big = x
    y = cbl(x, 64, 3)
    n.conv(f"layer{idx}-conv", y, 18, 1)
    idx += 1
    y = cbl(big, 16, 1)
    y = n.layer(f"layer{idx}-upsample", "Upsample", y, upsample_param={"scale": 2})
    idx += 1
    y = n.concat(f"layer{idx}-concat", [y, route])
    idx += 1
    y = cbl(y, 32, 3)
    n.conv(f"layer{idx}-conv", y, 18, 1)
    return n.text()


def _zf_trunk(n: Net) -> str:
    """ZF net's conv1-conv5 (Zeiler and Fergus 2014, as in py-faster-rcnn): 7x7/2 and 5x5/2
    convs each with ReLU, a WITHIN_CHANNEL LRN and a 3x3/2 max pool (pad 1), then three 3x3
    convs; widths / 8. The top of conv5."""
    x = n.conv("conv1", "data", 12, 7, stride=2, pad=3, filler="gaussian")
    n.relu("relu1", x)
    x = n.lrn("norm1", x, 3, 5e-5, 0.75, "WITHIN_CHANNEL")
    x = n.pool("pool1", x, "MAX", 3, 2, pad=1)
    x = n.conv("conv2", x, 32, 5, stride=2, pad=2, filler="gaussian")
    n.relu("relu2", x)
    x = n.lrn("norm2", x, 3, 5e-5, 0.75, "WITHIN_CHANNEL")
    x = n.pool("pool2", x, "MAX", 3, 2, pad=1)
    for i, width in ((3, 48), (4, 48), (5, 32)):
        x = n.conv(f"conv{i}", x, width, 3, pad=1, filler="gaussian")
        n.relu(f"relu{i}", x)
    return x


def zf_faster_rcnn_rpn() -> str:
    """Faster R-CNN's region proposal network on ZF (Ren et al. 2015; Zeiler & Fergus 2013), the
    images-only part of its test net: conv1 7x7/2 and conv2 5x5/2 each with WITHIN_CHANNEL LRN
    and 3x3/2 max pools (pad 1), conv3-5, rpn_conv/3x3, rpn_cls_score (2 x 9 anchors) and
    rpn_bbox_pred (4 x 9), the Reshape-Softmax-Reshape of the objectness. The proposal layer and
    ROIPooling head that follow need the proposals as a second input and are left out. Widths /
    8, 64 px."""
    n = Net("ZF_faster_rcnn", (1, 3, 64, 64))
    x = _zf_trunk(n)
    x = n.conv("rpn_conv/3x3", x, 32, 3, pad=1, filler="gaussian")
    n.relu("rpn_relu/3x3", x)
    cls = n.conv("rpn_cls_score", x, 18, 1, filler="gaussian")
    n.conv("rpn_bbox_pred", x, 36, 1, filler="gaussian")
    y = n.layer("rpn_cls_score_reshape", "Reshape", cls, reshape_param={"shape": {"dim": [0, 2, -1, 0]}})
    y = n.softmax("rpn_cls_prob", y)
    n.layer("rpn_cls_prob_reshape", "Reshape", y, reshape_param={"shape": {"dim": [0, 18, -1, 0]}})
    return n.text()


def _faster_rcnn_head(n: Net, conv5: str, rpn_width: int, fc_width: int, pooled: int, rois_per_image: int) -> None:
    """Faster R-CNN's test-time head over the trunk's ``conv5`` (py-faster-rcnn's layout): the
    RPN (rpn_conv/3x3, rpn_cls_score 2 x 9 anchors, rpn_bbox_pred 4 x 9, the
    Reshape-Softmax-Reshape to rpn_cls_prob_reshape), the ``Python`` proposal layer
    (``rpn.proposal_layer.ProposalLayer``, ``'feat_stride': 16``; tests/pylayers holds our own)
    reading it with rpn_bbox_pred and ``im_info``, ROIPooling of its ``rois`` over conv5
    (``pooled`` x ``pooled``, spatial_scale 1/16, the fork's ``roi_pooling_param``), fc6 and fc7
    with dropout, cls_score (21 classes) with its Softmax, and bbox_pred (4 x 21). Anchor
    scales 1-2-4 for the small inputs (8-16-32 in the paper, for ~600 px images)."""
    x = n.conv("rpn_conv/3x3", conv5, rpn_width, 3, pad=1, filler="gaussian")
    n.relu("rpn_relu/3x3", x)
    cls = n.conv("rpn_cls_score", x, 18, 1, filler="gaussian")
    bbox = n.conv("rpn_bbox_pred", x, 36, 1, filler="gaussian")
    y = n.layer("rpn_cls_score_reshape", "Reshape", cls, reshape_param={"shape": {"dim": [0, 2, -1, 0]}})
    y = n.softmax("rpn_cls_prob", y)
    prob = n.layer("rpn_cls_prob_reshape", "Reshape", y, reshape_param={"shape": {"dim": [0, 18, -1, 0]}})
    rois = n.layer("proposal", "Python", [prob, bbox, "im_info"], "rois", python_param={
        "module": "rpn.proposal_layer", "layer": "ProposalLayer",
        "param_str": f"'feat_stride': 16, 'scales': [1, 2, 4], 'rois_per_image': {rois_per_image}"})
    x = n.layer("roi_pool5", "ROIPooling", [conv5, rois], "pool5",
                roi_pooling_param={"pooled_w": pooled, "pooled_h": pooled, "spatial_scale": 0.0625})
    for i in (6, 7):
        x = n.fc(f"fc{i}", x, fc_width)
        n.relu(f"relu{i}", x)
        n.dropout(f"drop{i}", x)
    cls = n.fc("cls_score", x, 21)
    n.softmax("cls_prob", cls)
    n.fc("bbox_pred", x, 84)


def faster_rcnn_zf(rois_per_image: int = 8) -> str:
    """Faster R-CNN's ZF test net (Ren et al. 2015; Zeiler & Fergus 2013): inputs ``data`` and
    ``im_info`` (height, width, scale per image), the ZF trunk of :func:`zf_faster_rcnn_rpn`
    (conv1 7x7/2, conv2 5x5/2, each with a WITHIN_CHANNEL LRN and a 3x3/2 max pool, conv3-5)
    and :func:`_faster_rcnn_head` with 6 x 6 ROIPooling. Widths / 8 (fc / 16), 64 px,
    ``rois_per_image`` proposals per image (300 in the paper)."""
    n = Net("ZF", (1, 3, 64, 64))
    n.layer("im_info", "Input", [], "im_info", input_param={"shape": {"dim": [1, 3]}})
    x = _zf_trunk(n)
    _faster_rcnn_head(n, x, 32, 256, 6, rois_per_image)
    return n.text()


def faster_rcnn_vgg16(rois_per_image: int = 8) -> str:
    """Faster R-CNN's VGG16 test net (Ren et al. 2015; Simonyan & Zisserman 2014): inputs
    ``data`` and ``im_info``, VGG16's conv1_1-conv5_3 with 2x2 max pools after stages 1-4 (none
    after conv5: stride 16), and :func:`_faster_rcnn_head` with 7 x 7 ROIPooling. Widths / 16,
    two convs per stage instead of 2-2-3-3-3, 64 px, ``rois_per_image`` proposals per image."""
    n = Net("VGG_ILSVRC_16_layers", (1, 3, 64, 64))
    n.layer("im_info", "Input", [], "im_info", input_param={"shape": {"dim": [1, 3]}})
    x = "data"
    for stage, width in enumerate((4, 8, 16, 32, 32), start=1):
        for i in (1, 2):
            x = n.conv(f"conv{stage}_{i}", x, width, 3, pad=1)
            n.relu(f"relu{stage}_{i}", x)
        if stage < 5:
            x = n.pool(f"pool{stage}", x, "MAX", 2, 2)
    _faster_rcnn_head(n, x, 32, 256, 7, rois_per_image)
    return n.text()

#: why the corpus' OpenCV check skips the Faster R-CNN nets (tests/test_corpus.py checks them with
#: the proposals fed as an input instead)
FRCNN_CV2_WHY = ("OpenCV 4's Caffe importer reads the net but cannot create a Python layer (\"Can't create "
                 "layer 'proposal' of type 'Python'\"): test_frcnn_matches_opencv_forward_with_the_proposals_"
                 "stood_in feeds it the numpy engine's rois instead")


def _corpus() -> List[CorpusNet]:
    return [
        CorpusNet("caffenet", "BVLC zoo", caffenet(), "widths/8, 67 px"),
        CorpusNet("vgg16", "BVLC zoo (VGG)", vgg16(), "widths/16, 2 convs per stage, 32 px"),
        CorpusNet("googlenet", "Inception", googlenet(), "widths/8, 3a-3b-4a, 64 px"),
        CorpusNet("nin_cifar_v1", "NIN / V1 training net", nin_cifar_v1(), "widths/8, 32 px crop_size"),
        CorpusNet("lenet_v1", "NIN / V1 training net", lenet_v1(), "full, 28 px via --input-shape",
                  input_shape=(1, 28, 28)),
        CorpusNet("resnet18", "ResNet", resnet18(), "widths/8, 1 block per stage, 64 px"),
        CorpusNet("resnet50", "ResNet", resnet50(), "widths/16, blocks 2-1-1-1, 64 px"),
        CorpusNet("squeezenet11", "SqueezeNet", squeezenet11(), "widths/4, 64 px"),
        CorpusNet("densenet121", "DenseNet", densenet121(), "growth 4, 2 layers per block, 64 px"),
        CorpusNet("mobilenet_v1", "MobileNet / depthwise", mobilenet_v1(), "widths/8, 1 of 5 512-pairs, 64 px"),
        CorpusNet("mobilenet_v1_dwconv", "MobileNet / depthwise", mobilenet_v1("DepthwiseConvolution"),
                  "as mobilenet_v1, type DepthwiseConvolution", cv2=False,
                  cv2_why="OpenCV's Caffe importer has no DepthwiseConvolution type"),
        CorpusNet("mobilenet_v1_convdw", "MobileNet / depthwise", mobilenet_v1("ConvolutionDepthwise"),
                  "as mobilenet_v1, type ConvolutionDepthwise"),
        CorpusNet("mobilenet_v2", "MobileNet / depthwise", mobilenet_v2(), "widths/4, repeats 1-2-2-2-1-1-1, 64 px"),
        CorpusNet("shufflenet_v1", "MobileNet / depthwise (ShuffleNet)", shufflenet_v1(),
                  "g=3, widths/10, units 2-2-1, 64 px"),
        CorpusNet("ssd_vgg", "SSD-style detector", ssd_vgg(), "widths/16, 4 sources, 64 px"),
        CorpusNet("yolov3_tiny", "SSD-style detector (YOLO)", yolov3_tiny(), "widths/8, 64 px", cv2=False,
                  cv2_why="OpenCV's Caffe importer has no Upsample type"),
        CorpusNet("zf_rpn", "Faster R-CNN (RPN, images only)", zf_faster_rcnn_rpn(), "widths/8, 64 px"),
        CorpusNet("frcnn_vgg16", "Faster R-CNN (ROIPooling)", faster_rcnn_vgg16(),
                  "widths/16, 2 convs per stage, fc 256, 64 px, 8 rois/image", cv2=False, cv2_why=FRCNN_CV2_WHY),
        CorpusNet("frcnn_zf", "Faster R-CNN (ROIPooling)", faster_rcnn_zf(), "widths/8, fc 256, 64 px, 8 rois/image",
                  cv2=False, cv2_why=FRCNN_CV2_WHY),
        CorpusNet("mtcnn_pnet", "MTCNN (PReLU)", mtcnn_pnet(), "full widths, 24 px"),
        CorpusNet("mtcnn_onet", "MTCNN (PReLU)", mtcnn_onet(), "widths/4, 48 px"),
        CorpusNet("fcn16s", "segmentation (Deconvolution, Crop)", fcn16s(), "widths/16, pad 20, 64 px"),
        CorpusNet("pspnet", "segmentation (Interp)", pspnet(), "widths/32, bins 1-2-4, 60 px"),
    ]


CORPUS: List[CorpusNet] = _corpus()
BY_NAME: Dict[str, CorpusNet] = {c.name: c for c in CORPUS}
