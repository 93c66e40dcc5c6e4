"""The conformance corpus (tests/corpus.py): published architectures, each initialized from
scratch on both engines and checked against pycaffe and OpenCV.

For each net: a fresh k-means initialization on the numpy engine and, where pycaffe has every
layer type (``caffe.layer_type_list()``), on the pycaffe engine; the flatness on the init batch
must be at most 1.5 where the net has at least two scalable (affine, not pinned) layers (or
1.5 x the spread of pinned heads that read one blob: no rescaling changes their rates' ratio),
and stage 3 must preserve the net's function unless the plan names inexact layers, up to what
float32 rounding of the weights alone moves the outputs (fresh BatchNorm nets on 4 images are
ill-conditioned: see :func:`_rounding_sensitivity`). The numpy
engine's result is then compared, forward and backward, with pycaffe (``check_against_caffe``)
on the prepared net with the initialized weights and real images (on a net with layers pycaffe
lacks, every other layer, those standing in as inputs: ``check_with_stand_ins``), and forward with
``cv2.dnn.readNetFromCaffe`` reading the prepared net and the written caffemodel.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caffe_utils import layout, magic, netio
from caffe_utils.errors import EngineError
from caffe_utils.pipeline import RunConfig, SampleSpec, load_images, run
from corpus import BY_NAME, CORPUS
from reference import check_against_caffe, check_with_stand_ins, require_cv2

FLATNESS = 1.5
#: the default full solves; 5 rounds (measured passes behind inexact layers)
IMAGES, BATCH, ITERATIONS, DAMPING = 8, 4, 5, 1.0
#: GoogLeNet's two LRNs end far in their saturating regime, where the rounds wander (see README,
#: "How the between-layer stage converges"): 16 images and 15 rounds, the flattest of which it keeps
SETTINGS_FOR = {"googlenet": (1.0, 15, 16, 8)}
#: the corpus cases over a few seconds each on 2 cores
SLOW = {"mobilenet_v2", "densenet121", "resnet50", "ssd_vgg", "googlenet", "fcn16s",
        "frcnn_zf"}
#: nets whose flatness stage 3 does not reach, and why (the library's limits, see the report)
FLATNESS_XFAIL = {
    "ssd_vgg": "SSD's loc/conf heads read 4 blobs at 4 depths and are pinned (their outputs are the net's): "
               "a chain with one scale per layer cannot also bring 4 pinned heads to its rate, so no "
               "function-preserving rescaling reaches 1.5 (stage 3's optimum, exact here, is ~145)",
}


#: nets with a layer whose backward brocolli-caffe leaves empty (no gradient, no abort): the
#: pycaffe engine refuses them in one line (tests/test_heads.py); the numpy engine runs them
NO_GRADIENT_IN_CAFFE = {"yolov3_tiny": "Upsample"}


class FlatnessError(AssertionError):
    """The flatness bound is missed (the known cases are xfail with this exception only)."""


def _case(name, init=False):
    marks = [pytest.mark.slow] if name in SLOW else []
    if init and name in FLATNESS_XFAIL:
        marks.append(pytest.mark.xfail(raises=FlatnessError, strict=True, reason=FLATNESS_XFAIL[name]))
    return pytest.param(name, marks=marks, id=name)


CASES = [_case(c.name) for c in CORPUS]
INIT_CASES = [_case(c.name, init=True) for c in CORPUS]


def test_grey_net_without_a_mean_gets_the_grey_default(tmp_path, photos):
    """A 1-channel net whose data layer names no mean (LeNet) ran into "3 mean values for a
    1-channel input": the default 104,117,123 is now given as its grey value."""
    p = tmp_path / "grey.prototxt"
    p.write_text('layer { name: "data" type: "Input" top: "data"\n'
                 '        input_param { shape { dim: 1 dim: 1 dim: 12 dim: 12 } } }\n'
                 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"\n'
                 '        inner_product_param { num_output: 3 } }\n')
    prepared = magic.prepare_net(netio.read_net(str(p)))
    sample = load_images(str(p), SampleSpec(data=photos, images=4), 0, prepared, lambda msg: None).data
    assert sample.shape == (4, 1, 12, 12)
    grey = 0.114 * 104 + 0.587 * 117 + 0.299 * 123
    raw = load_images(str(p), SampleSpec(data=photos, images=4, mean="0"), 0, prepared, lambda msg: None).data
    np.testing.assert_allclose(sample, raw - grey, atol=1e-3)


def test_corpus_spans_the_families():
    families = {c.family.split(" (")[0] for c in CORPUS}
    assert len(CORPUS) >= 15 and len(families) >= 6, families


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus")


_RESULTS = {}


def _prototxt(workdir: Path, name: str) -> Path:
    p = workdir / f"{name}.prototxt"
    if not p.exists():
        p.write_text(BY_NAME[name].text)
    return p


def _init(workdir: Path, photos: str, name: str, engine: str):
    """The k-means initialization of corpus net ``name`` on ``engine`` (once per module)."""
    key = (name, engine)
    if key not in _RESULTS:
        net = BY_NAME[name]
        damping, iterations, images, batch = SETTINGS_FOR.get(name, (DAMPING, ITERATIONS, IMAGES, BATCH))
        out = workdir / f"{name}.{engine}.caffemodel"
        res = run(RunConfig(prototxt=str(_prototxt(workdir, name)), output=str(out),
                            sample=SampleSpec(data=photos, images=images, input_shape=net.input_shape),
                            options=magic.InitOptions(init="kmeans", batch_size=batch, iterations=iterations,
                                                      damping=damping),
                            engine=engine))
        _RESULTS[key] = (res, out)
    return _RESULTS[key]


def _missing_in_caffe(caffe, name: str):
    types = {lp.type for lp in netio.read_net(netio.parse_net_text(BY_NAME[name].text)).layer}
    return sorted(types - set(caffe.layer_type_list()))


def _sibling_spread(name: str, rep) -> float:
    """The largest rate ratio among pinned layers that read the same blob: rescaling that blob
    moves their rates together, so no function-preserving plan can flatten them further."""
    prepared = magic.prepare_net(netio.read_net(netio.parse_net_text(BY_NAME[name].text)), BY_NAME[name].input_shape)
    rate = {l.name: l.rate_after for l in rep.layers}
    readers = {}
    for lp in prepared.net_param.layer:
        if lp.name in rep.pinned_layers:
            readers.setdefault(lp.bottom[0], []).append(rate[lp.name])
    return max([max(r) / min(r) for r in readers.values() if len(r) > 1] or [1.0])


def _rounding_sensitivity(workdir: Path, photos: str, name: str, weights: Path, rel: float = 1e-7) -> float:
    """How far the outputs of the initialized net move, relative to their largest magnitude, when
    every weight is perturbed by ``rel`` (float32's rounding) on the init batch's images."""
    from caffe_utils.engine.numpy_net import Net
    text, input_name, images = _prepared(workdir, photos, name, BATCH, seed=0)
    proto = workdir / f"{name}.sensitivity.prototxt"
    proto.write_text(text)
    rng = np.random.RandomState(0)
    outs = []
    for noise in (0.0, rel):
        net = Net(proto, weights=weights)
        for blobs in net.params.values():
            for b in blobs:
                b.data[...] *= (1 + noise * rng.standard_normal(b.data.shape)).astype(np.float32)
        net.blobs[input_name].data[...] = images
        net.forward()
        outs.append({o: np.array(net.blobs[o].data, np.float64) for o in net.outputs})
    return max(float(np.max(np.abs(outs[1][o] - outs[0][o])) / max(float(np.max(np.abs(outs[0][o]))), 1e-12))
               for o in outs[0])


def _check_report(workdir: Path, photos: str, name: str, res, out: Path) -> None:
    rep = res.report
    affine = [l.name for l in rep.layers]
    assert all(np.isfinite(l.rate_after) for l in rep.layers), name
    assert np.isfinite(rep.flatness_after)
    weights = netio.read_caffemodel(out)
    prepared = magic.prepare_net(netio.read_net(netio.parse_net_text(BY_NAME[name].text)), BY_NAME[name].input_shape)
    want = {lp.name for lp in prepared.net_param.layer if lp.type in layout.AFFINE_TYPES}
    assert want <= set(weights) and set(affine) == want
    for layer in weights.values():
        for b in layer.blobs:
            assert np.all(np.isfinite(b)), name
    if not rep.function_preserved and not rep.inexact_layers:
        floor = _rounding_sensitivity(workdir, photos, name, out)
        assert rep.output_deviation <= max(1e-4, 10 * floor), (
            f"{name}: stage 3 moved the outputs by {rep.output_deviation:.3g}; float32 rounding of the "
            f"weights moves them by {floor:.3g}")
    scalable = [n for n in affine if n not in rep.pinned_layers]
    if len(scalable) >= 2:
        bound = FLATNESS * _sibling_spread(name, rep)
        if rep.flatness_after > bound:
            raise FlatnessError(f"{name}: flatness {rep.flatness_after:.3f} > {bound:.3f} after {rep.iterations} "
                                f"rounds (rounds {[round(f, 3) for f in rep.flatness_rounds]})")


@pytest.mark.slow
def test_ssd_heads_end_at_the_models_optimum(workdir, photos):
    """ssd_vgg is homogeneous, so stage 3's model is exact: one solve and no measured pass; the
    rates of the written net, measured over the same images with the same top gradients, are
    the ones the solve predicted; the flatness is the smallest spread the pinned heads allow
    (from ~1e7 before; the stepping stage 3 it replaced ended at ~3e7)."""
    from caffe_utils import measure
    from caffe_utils.engine.numpy_net import Net
    res, out = _init(workdir, photos, "ssd_vgg", "numpy")
    rep = res.report
    assert rep.passes == 0 and rep.iterations == 1 and not rep.inexact_layers
    text, input_name, images = _prepared(workdir, photos, "ssd_vgg", BATCH, seed=0)
    proto = workdir / "ssd_vgg.measure.prototxt"
    proto.write_text(text)
    full = load_images(str(_prototxt(workdir, "ssd_vgg")),
                       SampleSpec(data=photos, images=IMAGES, input_shape=BY_NAME["ssd_vgg"].input_shape), 0,
                       magic.prepare_net(netio.read_net(str(_prototxt(workdir, "ssd_vgg"))),
                                         BY_NAME["ssd_vgg"].input_shape), lambda msg: None).data
    measured = measure.rates_of(measure.measure(Net(proto, weights=out), input_name, full, seed=2))
    for layer in rep.layers:
        assert measured[layer.name] == pytest.approx(layer.rate_after, rel=1e-3), layer.name
    assert rep.flatness_after < rep.flatness_before / 1e4
    assert rep.function_preserved


@pytest.mark.parametrize("name", INIT_CASES)
def test_numpy_engine_initializes(workdir, photos, name):
    res, out = _init(workdir, photos, name, "numpy")
    _check_report(workdir, photos, name, res, out)


@pytest.mark.pycaffe
@pytest.mark.parametrize("name", INIT_CASES)
def test_caffe_engine_initializes(caffe, workdir, photos, name):
    missing = _missing_in_caffe(caffe, name)
    if missing:
        pytest.skip(f"pycaffe has no {missing}")
    if name in NO_GRADIENT_IN_CAFFE:
        with pytest.raises(EngineError, match=f"\\({NO_GRADIENT_IN_CAFFE[name]}\\) has an empty backward.*--engine numpy"):
            _init(workdir, photos, name, "caffe")
        return
    res, out = _init(workdir, photos, name, "caffe")
    _check_report(workdir, photos, name, res, out)


def _prepared(workdir: Path, photos: str, name: str, batch: int = 2, seed: int = 3):
    """The prepared net's text with a ``batch``-image input, and ``batch`` real images for it
    (those the initialization's batch holds, with ``seed`` 0)."""
    net = BY_NAME[name]
    path = _prototxt(workdir, name)
    spec = SampleSpec(data=photos, images=IMAGES, input_shape=net.input_shape)
    prepared = magic.prepare_net(netio.read_net(str(path)), net.input_shape)
    prepared.net_param.layer[0].input_param.shape[0].dim[0] = batch
    images = load_images(str(path), spec, seed, prepared, lambda msg: None).data[:batch]
    return netio.net_to_text(prepared.net_param), prepared.input_name, images


@pytest.mark.pycaffe
@pytest.mark.parametrize("name", CASES)
def test_numpy_matches_pycaffe_on_initialized_net(caffe, workdir, photos, tmp_path, name):
    missing = _missing_in_caffe(caffe, name)
    if missing:
        pytest.skip(f"pycaffe has no {missing}")
    _, out = _init(workdir, photos, name, "numpy")
    text, input_name, images = _prepared(workdir, photos, name)
    types = {lp.type for lp in netio.read_net(netio.parse_net_text(text)).layer}
    # brocolli's Upsample has no backward (its bottom diff stays zero): compare forward there.
    # Layer by layer: on a deep net with real images one ReLU or pooling kink that float rounding
    # flips differently in the two engines carries into every layer below it (seen on
    # nin_cifar_v1 with OpenBLAS's Haswell kernels)
    backward = "Upsample" not in types
    check_against_caffe(tmp_path, text, {input_name: images}, weights=out, rtol_fwd=1e-4, rtol_grad=1e-3,
                        backward=backward, layerwise=backward)


#: corpus nets with a layer type that brocolli's pycaffe lacks, or whose backward it leaves empty
PARTLY_IN_CAFFE = ["mobilenet_v1_dwconv", "mobilenet_v1_convdw", "shufflenet_v1", "pspnet", *NO_GRADIENT_IN_CAFFE]


@pytest.mark.pycaffe
@pytest.mark.parametrize("name", [c for c in CASES if c.id in PARTLY_IN_CAFFE])
def test_numpy_matches_pycaffe_where_pycaffe_has_the_layers(caffe, workdir, photos, tmp_path, name):
    """The layers pycaffe has, forward and backward, in a net with some that it lacks or cannot
    backpropagate through (those are stood in for by inputs fed with the numpy engine's values)."""
    missing = _missing_in_caffe(caffe, name) + [t for n, t in NO_GRADIENT_IN_CAFFE.items() if n == name]
    if not missing:
        pytest.skip("pycaffe has every layer: test_numpy_matches_pycaffe_on_initialized_net compares it")
    _, out = _init(workdir, photos, name, "numpy")
    text, input_name, images = _prepared(workdir, photos, name)
    stood_in = check_with_stand_ins(tmp_path, text, {input_name: images}, out, missing)
    types = {lp.name: lp.type for lp in netio.read_net(netio.parse_net_text(text)).layer}
    assert stood_in and {types[n] for n in stood_in} == set(missing)
    assert len(stood_in) < len(types) / 2, "most of the net is still compared"


@pytest.mark.parametrize("name", CASES)
def test_numpy_matches_opencv_forward(workdir, photos, tmp_path, name):
    net = BY_NAME[name]
    if not net.cv2:
        pytest.skip(net.cv2_why)
    cv2 = require_cv2()
    from caffe_utils.engine.numpy_net import Net
    _, out = _init(workdir, photos, name, "numpy")
    text, input_name, images = _prepared(workdir, photos, name)
    proto = tmp_path / "prepared.prototxt"
    proto.write_text(text)
    ours = Net(proto, weights=out)
    ours.blobs[input_name].data[...] = images
    ours.forward()
    # cv2 names outputs by layer: the last layer writing each output blob
    producer = {}
    for lp in netio.read_net(str(proto)).layer:
        for t in lp.top:
            producer[t] = lp.name
    cv_net = cv2.dnn.readNetFromCaffe(str(proto), str(out))
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv_net.enableFusion(False)
    cv_net.setInput(images)
    got = cv_net.forward([producer[o] for o in ours.outputs])
    for o, g in zip(ours.outputs, got):
        want = ours.blobs[o].data
        g = np.asarray(g).reshape(want.shape)
        err = float(np.max(np.abs(g - want)))
        assert err <= 1e-4 * max(float(np.max(np.abs(want))), 1e-12), \
            f"{name}: output {o} differs from cv2.dnn by {err:.3g}"


# ----------------------------------------------------------------------------- Faster R-CNN (ROIPooling)
#: the corpus' Python proposal layer (module rpn.proposal_layer) lives here
PYLAYERS = Path(__file__).resolve().parent / "pylayers"


@pytest.fixture(autouse=True)
def _proposal_module_on_path(monkeypatch):
    """frcnn_zf's ``rpn.proposal_layer`` is importable, as a Caffe user's PYTHONPATH has it."""
    monkeypatch.syspath_prepend(str(PYLAYERS))


def _frcnn_inputs(workdir: Path, photos: str, name: str, batch: int = 2):
    """Corpus net ``name``'s prepared net text with ``batch`` images and im_info rows, and those inputs."""
    text, input_name, images = _prepared(workdir, photos, name, batch)
    net = netio.read_net(netio.parse_net_text(text))
    net.layer[0].input_param.shape[1].dim[0] = batch
    _, h, w = images.shape[1:]
    info = np.tile(np.array([h, w, 1.0], np.float32), (batch, 1))
    return netio.net_to_text(net), {input_name: images, "im_info": info}


#: the Faster R-CNN nets of the corpus (ZF is slow: its LRNs make stage 3 measure its rounds)
FRCNN = [pytest.param("frcnn_vgg16", id="frcnn_vgg16"), pytest.param("frcnn_zf", id="frcnn_zf", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", FRCNN)
def test_frcnn_proposal_layer_is_a_head_and_its_inputs_get_the_top_gradient(workdir, photos, name):
    """The proposal layer stays (ROIPooling reads its rois) but is a head: the report names it,
    its differentiable inputs are outputs of the prepared net, and the RPN layers below them
    got a change rate like every other layer."""
    res, _ = _init(workdir, photos, name, "numpy")
    rep = res.report
    assert rep.heads == ["proposal"]
    prepared = magic.prepare_net(netio.read_net(netio.parse_net_text(BY_NAME[name].text)))
    assert prepared.aux_inputs == {"im_info": (3,)}
    from caffe_utils.engine.numpy_net import net_outputs
    assert net_outputs(prepared.net_param) == ["cls_score", "bbox_pred", "rpn_bbox_pred", "rpn_cls_prob_reshape"]
    rates = {l.name: l.rate_after for l in rep.layers}
    assert all(np.isfinite(r) and r > 0 for r in rates.values()), rates


@pytest.mark.parametrize("name", FRCNN)
def test_frcnn_matches_opencv_forward_with_the_proposals_stood_in(workdir, photos, name):
    """OpenCV 4's Caffe importer reads the net but cannot run a Python layer ("Can't create
    layer of type Python"): it gets the numpy engine's rois as an input in the proposal layer's
    place, so the trunk, the RPN, ROIPooling and the fc head are compared, on 2 images."""
    cv2 = require_cv2()
    from caffe_utils.engine.numpy_net import Net
    _, out = _init(workdir, photos, name, "numpy")
    text, inputs = _frcnn_inputs(workdir, photos, name)
    ours = Net(netio.read_net(netio.parse_net_text(text)), weights=out)
    for name, value in inputs.items():
        ours.blobs[name].data[...] = value
    ours.forward()
    rois = np.array(ours.blobs["rois"].data)
    assert rois.shape == (16, 5) and set(rois[:, 0]) == {0.0, 1.0}
    twin = netio.read_net(netio.parse_net_text(text))
    twin.layer[0].top[1] = "rois"  # im_info's place: OpenCV takes the inputs from the first layer
    del twin.layer[0].input_param.shape[1].dim[:]
    twin.layer[0].input_param.shape[1].dim.extend(rois.shape)
    keep = [lp for lp in twin.layer if lp.type != "Python"]
    del twin.layer[:]
    twin.layer.extend(keep)
    proto = workdir / f"{name}.cv2.prototxt"
    proto.write_text(netio.net_to_text(twin))
    cv_net = cv2.dnn.readNetFromCaffe(str(proto), str(out))
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv_net.enableFusion(False)
    cv_net.setInput(inputs["data"], "data")
    cv_net.setInput(rois, "rois")
    blobs = {"cls_score": "cls_score", "bbox_pred": "bbox_pred", "pool5": "roi_pool5", "rpn_bbox_pred": "rpn_bbox_pred"}
    for (blob, layer), got in zip(blobs.items(), cv_net.forward(list(blobs.values()))):
        want = ours.blobs[blob].data
        err = float(np.max(np.abs(np.asarray(got).reshape(want.shape) - want)))
        assert err <= 1e-4 * max(float(np.max(np.abs(want))), 1e-12), f"{blob} differs from cv2.dnn by {err:.3g}"


@pytest.mark.pycaffe
@pytest.mark.parametrize("name", FRCNN)
def test_frcnn_numpy_matches_pycaffe_where_pycaffe_has_the_layers(caffe, workdir, photos, tmp_path, name):
    """brocolli's pycaffe has neither ROIPooling nor Python layers: both stand in as inputs fed
    with the numpy engine's values, and every other layer is compared forward and backward."""
    missing = _missing_in_caffe(caffe, name)
    if not missing:
        pytest.skip("pycaffe has every layer: test_numpy_matches_pycaffe_on_initialized_net compares it")
    _, out = _init(workdir, photos, name, "numpy")
    text, inputs = _frcnn_inputs(workdir, photos, name)
    stood_in = check_with_stand_ins(tmp_path, text, inputs, out, missing)
    types = {"proposal": "Python", "roi_pool5": "ROIPooling"}
    assert sorted(stood_in) == sorted(n for n, t in types.items() if t in missing)
