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
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence

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


def check_against_caffe(tmp_path: Path, prototxt: str, inputs: Optional[Mapping[str, np.ndarray]] = None, *,
                        rtol_fwd: float = 1e-4, rtol_grad: float = 1e-3, phase: str = "TEST", seed: int = 0,
                        weights: Optional[Path] = None,
                        param_init: Callable = default_param_init, skip_blobs: Sequence[str] = (),
                        backward: bool = True) -> Dict[str, object]:
    """Compare numpy engine and pycaffe on ``prototxt``; returns both nets for further checks.

    ``inputs`` maps input blob names to arrays (missing inputs get Gaussian data). Parameters
    come from ``weights`` when given, else from ``param_init``.
    """
    caffe = require_caffe()
    rng = np.random.RandomState(seed)
    path = Path(tmp_path) / "net.prototxt"
    path.write_text(prototxt)
    ours = Net(path, phase)
    from caffe_utils.engine.caffe_net import CaffeNet
    ref = CaffeNet(path, phase)
    if weights is not None:
        ours.copy_from(weights)
        ref.copy_from(weights)
    else:
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
    inputs = dict(inputs or {})
    for name in ours.inputs:
        if name not in inputs:
            inputs[name] = rng.standard_normal(ours.blobs[name].shape).astype(np.float32)
        ours.blobs[name].data[...] = inputs[name]
        ref.blobs[name].data[...] = inputs[name]
    ours.forward()
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
    return {"ours": ours, "caffe": ref}
