"""What the prototxt reader (:mod:`caffe_utils.netio`) and the weights reader
(:mod:`caffe_utils.caffemodel`) share: reading a file with a clear error, and Caffe's V1 layer
type names (V1 nets and V1 caffemodels name layer types by an enum)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]

# Caffe's UpgradeV1LayerType: V1 enum name -> layer type string.
V1_TYPE_NAMES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col", "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct", "LRN": "LRN", "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN", "POOLING": "Pooling",
    "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}



def read_file(path: PathLike, what: str, error: type) -> bytes:
    """The bytes of ``path``, or ``error`` with a one-line message naming the file and the fix."""
    p = Path(path)
    if not p.exists():
        raise error(f"{what} '{p}' does not exist; check the path")
    if p.is_dir():
        raise error(f"{what} '{p}' is a directory; pass the file itself")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} '{p}': {exc.strerror}; check its permissions") from exc
