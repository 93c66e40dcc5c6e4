"""One helper that checks the numpy engine against a reference, forward and backward.

:func:`check_against_caffe` builds a net from prototxt text in both the numpy engine and real
pycaffe with identical parameters and inputs, runs forward, sets random Gaussian diffs on the
outputs (loss tops keep their loss weight), runs backward, and compares every blob's data and
diff and every parameter diff. Tolerances are explicit: ``rtol`` relative to each blob's largest
magnitude (so near-zero elements of a large blob are not over-weighted).

Without pycaffe the test is failed, not skipped, when ``MAGIC_INIT_REQUIRE_CAFFE=1`` (CI sets it);
otherwise it is skipped with the reason.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pytest

from caffe_utils.engine.numpy_net import Net
from caffe_utils.schema import pycaffe_importable


def require_caffe():
    """Return the caffe module, or skip (fail when MAGIC_INIT_REQUIRE_CAFFE=1)."""
    if not pycaffe_importable():
        if os.environ.get("MAGIC_INIT_REQUIRE_CAFFE") == "1":
            pytest.fail("pycaffe is required (MAGIC_INIT_REQUIRE_CAFFE=1) but not importable")
        pytest.skip("pycaffe not importable; run scripts/install_caffe.sh")
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe
    caffe.set_mode_cpu()
    return caffe


def require_cv2():
    """Return OpenCV's cv2, or skip (fail when MAGIC_INIT_REQUIRE_CAFFE is set)."""
    try:
        import cv2
    except ImportError:
        if os.environ.get("MAGIC_INIT_REQUIRE_CAFFE"):
            pytest.fail("cv2 is not importable; pip install '.[test]' installs opencv-python-headless")
        pytest.skip("cv2 not importable (pip install 'opencv-python-headless<5')")
    return cv2


def default_param_init(layer_type: str, index: int, shape, rng: np.random.RandomState) -> np.ndarray:
    """Random parameters that exercise every code path (BatchNorm gets valid statistics)."""
    if layer_type == "BatchNorm":
        if index == 0:
            return rng.standard_normal(shape).astype(np.float32)
        if index == 1:
            return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        return np.full(shape, rng.uniform(0.5, 2.0), np.float32)
    if layer_type == "PReLU":
        return rng.uniform(-0.5, 0.5, shape).astype(np.float32)
    return (0.5 * rng.standard_normal(shape)).astype(np.float32)


def assert_blob_close(name: str, what: str, ours: np.ndarray, ref: np.ndarray, rtol: float) -> None:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what} of '{name}': shape {ours.shape} vs Caffe {ref.shape}"
    assert np.all(np.isfinite(ours)), f"{what} of '{name}' has NaN/Inf"
    scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1e-12)
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    assert err <= rtol * scale, (f"{what} of '{name}' differs from Caffe: max abs err {err:.3g} "
                                 f"> rtol {rtol} x max|ref| {scale:.3g}")


def pooling_near_ties(net, rel: float = 2e-6) -> List[str]:
    """MAX-pooling layers of a numpy-engine net whose windows hold two maxima closer than
    ``rel`` (relative): float rounding may pick a different one in Caffe (a kink), so a
    whole-net comparison there is meaningless. Exact ties of zeros (dead ReLUs) are safe."""
    found = []
    for layer, bottoms in zip(net.layers, net._bottoms):
        if layer.type != "Pooling" or layer.method != "MAX":
            continue
        x = bottoms[0].data.astype(np.float64)
        (kh, kw), (ph, pw), (sh, sw), (oh, ow) = layer.kernel, layer.pad, layer.stride, layer.out
        n, c, h, w = x.shape
        hp, wp = max(h + 2 * ph, (oh - 1) * sh + kh), max(w + 2 * pw, (ow - 1) * sw + kw)
        xp = np.full((n, c, hp, wp), -np.inf)
        xp[:, :, ph:ph + h, pw:pw + w] = x
        cand = np.stack([xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
                         for i in range(kh) for j in range(kw)])
        top2 = -np.sort(-cand, axis=0)[:2]
        gap = top2[0] - top2[1]
        scale = np.abs(top2[0])
        near = np.isfinite(gap) & (scale > 0) & (gap <= rel * max(float(np.max(np.abs(x))), 1e-30))
        if np.any(near):
            found.append(layer.name)
    return found


def check_against_caffe(tmp_path: Path, prototxt: str, inputs: Optional[Mapping[str, np.ndarray]] = None, *,
                        rtol_fwd: float = 1e-4, rtol_grad: float = 1e-3, phase: str = "TEST", seed: int = 0,
                        weights: Optional[Path] = None,
                        param_init: Callable = default_param_init, skip_blobs: Sequence[str] = (),
                        backward: bool = True, max_attempts: int = 10, layerwise: bool = False) -> Dict[str, object]:
    """Compare numpy engine and pycaffe on ``prototxt``; returns both nets for further checks.

    ``inputs`` maps input blob names to arrays (missing inputs get Gaussian data). Parameters
    come from ``weights`` when given, else from ``param_init``. Kink exclusion: when a max-pooling
    window holds two nearly equal maxima (:func:`pooling_near_ties`), parameters and missing
    inputs are drawn again (up to ``max_attempts`` times), since float rounding could send the
    gradient to the other maximum in Caffe. ``layerwise`` compares each layer on identical inputs
    instead of the whole net's blobs, so that such a kink does not carry into the layers after it.
    """
    require_caffe()
    rng = np.random.RandomState(seed)
    path = Path(tmp_path) / "net.prototxt"
    path.write_text(prototxt)
    ours = Net(path, phase)
    from caffe_utils.engine.caffe_net import CaffeNet
    ref = CaffeNet(path, phase)
    if weights is not None:
        ours.copy_from(weights)
        ref.copy_from(weights)
    given = dict(inputs or {})
    for attempt in range(max_attempts):
        if weights is None:
            types = dict(zip(ours.layer_names, ours.layer_types))
            for name, blobs in ours.params.items():
                assert name in ref.params, f"Caffe has no params for layer '{name}'"
                assert len(ref.params[name]) == len(blobs), f"layer '{name}': #params differ from Caffe"
                for j, b in enumerate(blobs):
                    assert b.shape == tuple(ref.params[name][j].data.shape), \
                        f"param {j} of '{name}': shape {b.shape} vs Caffe {ref.params[name][j].data.shape}"
                    val = param_init(types[name], j, b.shape, rng)
                    b.data[...] = val
                    ref.params[name][j].data[...] = val
        inputs = dict(given)
        for name in ours.inputs:
            if name not in inputs:
                inputs[name] = rng.standard_normal(ours.blobs[name].shape).astype(np.float32)
            ours.blobs[name].data[...] = inputs[name]
            ref.blobs[name].data[...] = inputs[name]
        ours.forward()
        ties = pooling_near_ties(ours) if backward else []
        if not ties or attempt == max_attempts - 1 or (weights is not None and len(given) == len(ours.inputs)):
            break
    if ties or layerwise:
        # too many windows to draw a tie-free net (or a deep net whose ReLU and pooling kinks
        # float rounding may flip differently): compare each layer in place instead
        check_layerwise(ours, ref, rtol_fwd, rtol_grad, rng, skip_blobs)
        return {"ours": ours, "caffe": ref, "layerwise": True}
    ref.forward()
    common = [n for n in ours.blobs if n in ref.blobs and n not in skip_blobs]
    for name in common:
        assert_blob_close(name, "data", ours.blobs[name].data, ref.blobs[name].data, rtol_fwd)
    if backward:
        loss_tops = {t for lp, w in zip(ours.net_param.layer, ours._loss_weights)
                     for t, lw in zip(lp.top, w) if lw}
        for name in ours.outputs:
            if name in loss_tops:
                continue
            d = rng.standard_normal(ours.blobs[name].shape).astype(np.float32)
            ours.blobs[name].diff[...] = d
            ref.blobs[name].diff[...] = d
        ours.clear_param_diffs()
        ref.clear_param_diffs()
        ours.backward()
        ref.backward()
        for name in common:
            if name in ours.outputs:
                continue
            assert_blob_close(name, "diff", ours.blobs[name].diff, ref.blobs[name].diff, rtol_grad)
        for name, blobs in ours.params.items():
            for j, b in enumerate(blobs):
                assert_blob_close(f"{name}[{j}]", "param diff", b.diff, ref.params[name][j].diff, rtol_grad)
    return {"ours": ours, "caffe": ref, "layerwise": False}


def _feed(cnet, fed: Optional[Mapping[str, np.ndarray]]) -> None:
    """Set the stand-in inputs of :func:`check_with_stand_ins` (again: in-place layers change them)."""
    for blob, value in (fed or {}).items():
        cnet.blobs[blob].data[...] = value


def _caffe_snapshots(cnet, outputs: Sequence[str], rng: np.random.RandomState,
                     skip_blobs: Sequence[str]) -> Dict[str, dict]:
    """Caffe's net run forward and then backward (random diffs on ``outputs``) one layer at a
    time: each layer's bottoms and tops before and after it, data then diffs."""
    snaps: Dict[str, dict] = {}
    for i, name in enumerate(cnet._layer_names):
        bnames = list(cnet.bottom_names[name])
        before = [np.array(cnet.blobs[b].data) for b in bnames]
        cnet._forward(i, i)
        snaps[name] = {"bottom": before, "top": [np.array(cnet.blobs[t].data) for t in cnet.top_names[name]]}
    for name in outputs:
        if name not in skip_blobs:
            cnet.blobs[name].diff[...] = rng.standard_normal(cnet.blobs[name].data.shape)
    for blobs in cnet.params.values():
        for b in blobs:
            b.diff[...] = 0
    for i in range(len(cnet.layers) - 1, -1, -1):
        name = cnet._layer_names[i]
        top_diff = [np.array(cnet.blobs[t].diff) for t in cnet.top_names[name]]
        cnet._backward(i, i)
        snaps[name]["top_diff"] = top_diff
        snaps[name]["bottom_diff"] = [np.array(cnet.blobs[b].diff) for b in cnet.bottom_names[name]]
    return snaps


def check_layerwise(ours, ref, rtol_fwd: float, rtol_grad: float, rng: np.random.RandomState,
                    skip_blobs: Sequence[str] = (), fed: Optional[Mapping[str, np.ndarray]] = None) -> None:
    """Compare a whole net layer by layer on Caffe's own intermediate values.

    Caffe runs forward and then backward one layer at a time; before and after each of its
    layers the bottoms/tops (data, then diffs) are recorded, and our implementation of the same
    layer runs on exactly those inputs. So every blob's data and diff and every parameter diff
    is checked in the real net's context, with no float-rounding drift between the engines and
    no max-pooling switch flipped by it. The outputs of the net, computed end to end by both
    engines, are compared too.
    """
    from caffe_utils.layers.base import Blob
    cnet = ref._net
    ours.forward()
    _feed(cnet, fed)
    cnet.forward()
    for name in ours.outputs:
        assert_blob_close(name, "data (end to end)", ours.blobs[name].data, cnet.blobs[name].data, rtol_fwd)
    _feed(cnet, fed)
    snaps = _caffe_snapshots(cnet, ours.outputs, rng, skip_blobs)
    for li, (layer, lname) in enumerate(zip(ours.layers, ours.layer_names)):
        snap = snaps[lname]
        if not snap["bottom"]:
            continue  # Input: nothing computed
        bottoms = [Blob(a.shape) for a in snap["bottom"]]
        for b, a in zip(bottoms, snap["bottom"]):
            b.data[...] = a
        tops = [Blob() for _ in snap["top"]]
        layer.reshape(bottoms, tops)
        layer.forward(bottoms, tops)
        for t, a, tn in zip(tops, snap["top"], cnet.top_names[lname]):
            if tn not in skip_blobs:
                assert_blob_close(f"{tn} (top of {lname})", "data", t.data, a, rtol_fwd)
        for t, d in zip(tops, snap["top_diff"]):
            t.diff[...] = d
        saved = [p.diff.copy() for p in layer.blobs]
        for p in layer.blobs:
            p.diff[...] = 0
        lp = ours.net_param.layer[li]
        pd = [layer.can_propagate(k) and (k >= len(lp.propagate_down) or lp.propagate_down[k])
              for k in range(len(bottoms))]
        layer.backward(tops, pd, bottoms)
        for k, (b, d, bn) in enumerate(zip(bottoms, snap["bottom_diff"], cnet.bottom_names[lname])):
            if pd[k] and bn not in skip_blobs:
                assert_blob_close(f"{bn} (bottom of {lname})", "diff", b.diff, d, rtol_grad)
        for j, p in enumerate(layer.blobs):
            assert_blob_close(f"{lname}[{j}]", "param diff", p.diff, cnet.params[lname][j].diff, rtol_grad)
            p.diff[...] = saved[j]


def check_with_stand_ins(tmp_path: Path, prototxt: str, inputs: Mapping[str, np.ndarray], weights: Path,
                         missing: Sequence[str], rtol_fwd: float = 1e-4, rtol_grad: float = 1e-3) -> List[str]:
    """Compare the numpy engine with pycaffe on every layer pycaffe has, in a net with layers
    of the ``missing`` types (which pycaffe lacks). pycaffe gets a twin of the net where each of
    those layers is an Input of its top's shape, fed with what the numpy engine computed there;
    :func:`check_layerwise` then compares each other layer, forward and backward, on Caffe's
    own values. Returns the layers stood in for."""
    require_caffe()
    from caffe_utils import netio
    from caffe_utils.engine.caffe_net import CaffeNet
    ours_path, twin_path = Path(tmp_path) / "net.prototxt", Path(tmp_path) / "twin.prototxt"
    ours_path.write_text(prototxt)
    ours = Net(ours_path)
    ours.copy_from(weights)
    for name, value in inputs.items():
        ours.blobs[name].data[...] = value
    twin = netio.read_net(netio.parse_net_text(prototxt))
    fed: Dict[str, np.ndarray] = {}
    stood_in = []
    for lp in twin.layer:
        if lp.type not in missing:
            continue
        ours.forward(end=lp.name)  # its tops before any in-place layer after it
        fed.update({t: np.array(ours.blobs[t].data) for t in lp.top})
        stand_in = type(lp)(name=lp.name, type="Input", top=list(lp.top))
        for t in lp.top:
            stand_in.input_param.shape.add().dim.extend(ours.blobs[t].data.shape)
        lp.CopyFrom(stand_in)
        stood_in.append(lp.name)
    twin_path.write_text(netio.net_to_text(twin))
    ref = CaffeNet(twin_path)
    ref.copy_from(weights)  # the stood-in layers' weights are not in the twin: Caffe skips them
    for name, value in inputs.items():
        ref.blobs[name].data[...] = value
    check_layerwise(ours, ref, rtol_fwd, rtol_grad, np.random.RandomState(0), fed=fed)
    return stood_in
