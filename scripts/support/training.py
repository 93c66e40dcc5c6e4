"""Helpers for the experiment scripts that train the model zoo nets with real Caffe's solver.

* :func:`training_net`: models/<net>/deploy.prototxt turned into a training net fed from Python
  (Input layers for the images and the labels), its last InnerProduct resized (and renamed, so a
  pretrained 1000-way classifier is not loaded into it) and a loss added;
* :func:`caffe_fillers`: Caffe's hand-tuned fillers of models/<net>/train_val.prototxt;
* :func:`load_matching`: pretrained weights for the layers whose names and shapes match;
* :func:`solver_text`: an SGD solver definition;
* :class:`LmdbStream`: Caffe ``Datum`` records of an LMDB, one at a time, as Caffe's Data layer;
* :func:`initial_caffemodel`: the starting weights (pretrained, Caffe's fillers or magic-init).

Data is fed from Python (decoded by :mod:`caffe_utils.images`), so the scripts need neither
Caffe's LMDB/LevelDB backends nor its OpenCV support.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Set, Tuple

import numpy as np

from caffe_utils import magic, netio

MODELS = Path(__file__).resolve().parents[2] / "models"


def training_net(model: str, batch: int, n_classes: Optional[int], label_dim: Optional[int],
                 loss: str) -> Tuple[str, str, Tuple[int, int, int]]:
    """(prototxt text, classifier layer name, input C,H,W) of the training net for ``model``.

    ``n_classes`` resizes the classifier (None keeps it); ``label_dim`` is the label input's
    second dimension (None: one class id per image); ``loss`` is the loss layer type."""
    param = magic.prepare_net(netio.read_net(str(MODELS / model / "deploy.prototxt"), netio.TEST)).net_param
    shape = param.layer[0].input_param.shape[0]
    c, h, w = [int(d) for d in shape.dim[1:]]
    shape.dim[0] = batch
    last = [lp for lp in param.layer if lp.type == "InnerProduct"][-1]
    if n_classes is not None:
        old = last.name
        last.name = f"{old}_{n_classes}"
        last.inner_product_param.num_output = n_classes
        for lp in param.layer:
            lp.top[:] = [last.name if t == old else t for t in lp.top]
            lp.bottom[:] = [last.name if b == old else b for b in lp.bottom]
    label = param.layer.add(name="label", type="Input")
    label.top.append("label")
    label.input_param.shape.add().dim.extend([batch] + ([label_dim] if label_dim else []))
    loss_layer = param.layer.add(name="loss", type=loss)
    loss_layer.bottom.extend([last.top[0], "label"])
    loss_layer.top.append("loss")
    return netio.net_to_text(param), last.name, (c, h, w)


def caffe_fillers(net, model: str, classifier: str, keep: Set[str], seed: int) -> None:
    """Fill every layer of ``net`` not in ``keep`` as Caffe would from train_val's fillers
    (drawn by the numpy engine); a resized ``classifier`` gets N(0, 0.01^2) and bias 0."""
    from caffe_utils.engine.numpy_net import Net
    filled = Net(magic.prepare_net(netio.read_net(str(MODELS / model / "train_val.prototxt"),
                                                  netio.TEST)).net_param, seed=seed)
    rng = np.random.RandomState(seed)
    for name, blobs in net.params.items():
        if name in keep:
            continue
        src = filled.params.get(name)
        if src is None or [tuple(b.data.shape) for b in src] != [tuple(b.data.shape) for b in blobs]:
            if name != classifier:
                raise KeyError(f"train_val.prototxt of {model} has no layer '{name}' of this shape")
            blobs[0].data[...] = 0.01 * rng.standard_normal(blobs[0].data.shape)
            for b in blobs[1:]:
                b.data[...] = 0
            continue
        for dst, s in zip(blobs, src):
            dst.data[...] = s.data


def load_matching(net, path: Path) -> Set[str]:
    """Copy the caffemodel's blobs into the layers whose names and shapes match; their names."""
    stored = netio.read_caffemodel(str(path))
    shapes = net.param_shapes()
    done = set()
    for name, lw in stored.items():
        if name in shapes and [tuple(b.shape) for b in lw.blobs] == [tuple(s) for s in shapes[name]]:
            for blob, arr in zip(net.params[name], lw.blobs):
                blob.data[...] = arr
            done.add(name)
    return done


def solver_text(net_file: Path, base_lr: float, gamma: float, stepsize: int, iterations: int, seed: int,
                gpu: Optional[int]) -> str:
    """SGD with momentum 0.9 and weight decay 5e-4, lr ``base_lr`` x ``gamma`` every ``stepsize``."""
    return (f'net: "{net_file}"\nbase_lr: {base_lr}\nlr_policy: "step"\ngamma: {gamma}\nstepsize: {stepsize}\n'
            f"momentum: 0.9\nweight_decay: 0.0005\nmax_iter: {iterations}\ndisplay: 0\nsnapshot: 0\n"
            f"random_seed: {seed}\nsolver_mode: {'GPU' if gpu is not None else 'CPU'}\n")


class LmdbStream:
    """Caffe ``Datum`` records of an LMDB, read in key order one at a time and wrapping around
    (as Caffe's Data layer does), without loading the database into memory."""

    def __init__(self, path: Path) -> None:
        from caffe_utils.errors import DataError
        try:
            import lmdb
        except ImportError as exc:
            raise DataError(f"'{path}' is an LMDB; reading it needs the lmdb package: pip install lmdb") from exc
        try:
            self._env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True)
        except lmdb.Error as exc:
            raise DataError(f"cannot open LMDB '{path}': {exc}; give a folder made by convert_imageset") from exc
        self.size = int(self._env.stat()["entries"])
        if self.size == 0:
            raise DataError(f"LMDB '{path}' is empty")
        self._txn = self._env.begin()
        self._cursor = self._txn.cursor()
        self._cursor.first()

    def next(self) -> Tuple[np.ndarray, int, bool]:
        """The next image (HxWxC float BGR), its label, and whether it is stored pre-resized."""
        from caffe_utils import images
        from caffe_utils.schema import caffe_pb2
        key, value = self._cursor.item()
        if not self._cursor.next():
            self._cursor.first()
        datum = caffe_pb2().Datum()
        datum.ParseFromString(bytes(value))
        img, pre = images.load_record(images.Record(datum=bytes(value), key=key.decode("utf-8", "replace")))
        return img, int(datum.label), pre

    def close(self) -> None:
        self._txn.abort()
        self._env.close()


def initial_caffemodel(proto: Path, model: str, classifier: str, init: str, out: Path, records, n_images: int,
                       transform, rng: np.random.RandomState, between: bool = True, weights: Optional[Path] = None,
                       zero_classifier: bool = False, seed: int = 0) -> str:
    """Write the starting weights of the training net ``proto`` to ``out``: pretrained
    ``weights`` where they fit, then Caffe's fillers (``init == "caffe"``) or magic-init on
    ``n_images`` of ``records`` for the rest (and the between-layer stage over everything).
    Returns the change-rate flatness before -> after, or "-" for Caffe's fillers."""
    from caffe_utils import images
    from caffe_utils.engine.caffe_net import CaffeNet
    prepared = magic.prepare_net(netio.read_net(str(proto), netio.TEST))
    c, h, w = prepared.input_shape
    net = CaffeNet(prepared.net_param)
    net.blobs[prepared.input_name].reshape(16, c, h, w)
    net.reshape()
    keep = load_matching(net, weights) if weights is not None else set()
    flat = "-"
    if init == "caffe":
        caffe_fillers(net, model, classifier, keep, seed)
    else:
        sample = images.load_sample(records, n_images, transform, rng).data
        report = magic.initialize(net, prepared, sample, magic.InitOptions(
            init=init, between=between, zero_classifier=zero_classifier, batch_size=16, seed=seed), keep)
        flat = f"{report.flatness_before:.3g} -> {report.flatness_after:.3g}"
    net.save(out)
    return flat


def trained_test_net(caffe: Any, proto: Path, solver: Any) -> Any:
    """A TEST-phase pycaffe net of ``proto`` (no dropout) holding the solver's trained params."""
    net = caffe.Net(str(proto), caffe.TEST)
    for name, blobs in solver.net.params.items():
        for dst, src in zip(net.params[name], blobs):
            dst.data[...] = src.data
    return net
