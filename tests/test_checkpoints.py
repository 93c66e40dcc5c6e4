"""The sample's checkpoints of stages 1 and 2 (:class:`caffe_utils.magic.context.SampleBatches`).

Oracle: a plain forward of each batch through a fresh copy of the net. The net branches (two
convolutions read the input; one has an in-place ReLU; a Concat joins them), so a checkpoint
holds several blobs, some of which later steps only read.
"""
from __future__ import annotations

import numpy as np
import pytest

from caffe_utils.engine.numpy_net import Net
from caffe_utils.magic.context import SampleBatches

BRANCHES = """
name: "branches"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } } }
layer { name: "clip" type: "ReLU" bottom: "data" top: "data" }
layer { name: "a" type: "Convolution" bottom: "data" top: "a" convolution_param { num_output: 2 kernel_size: 3 pad: 1 } }
layer { name: "b" type: "Convolution" bottom: "data" top: "b" convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "relu_b" type: "ReLU" bottom: "b" top: "b" }
layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }
layer { name: "c" type: "Convolution" bottom: "cat" top: "c" convolution_param { num_output: 2 kernel_size: 3 } }
"""


def _net(path, seed: int = 0) -> Net:
    net = Net(path)
    rng = np.random.RandomState(seed)
    for blobs in net.params.values():
        for b in blobs:
            b.data[...] = rng.standard_normal(b.data.shape)
    return net


@pytest.fixture
def branches(tmp_path):
    p = tmp_path / "branches.prototxt"
    p.write_text(BRANCHES)
    return p


def _expected(path, sample: np.ndarray, batch: int, upto: int = -1) -> dict:
    """Every blob after a plain forward through layer ``upto`` (all of them: -1), batch by
    batch, over the whole sample."""
    net = _net(path)
    out: dict = {}
    for s in range(0, sample.shape[0], batch):
        net.blobs["data"].data[...] = sample[s:s + batch]
        net.forward(end=net.layer_names[upto])
        for name, blob in net.blobs.items():
            out.setdefault(name, []).append(np.array(blob.data))
    return {n: np.concatenate(v) for n, v in out.items()}


@pytest.mark.parametrize("mem_limit", [1 << 30, 0])
def test_each_step_leaves_the_blobs_a_plain_forward_gives(branches, mem_limit):
    """With checkpoints (and with none, where every batch runs from the images), after
    ``through(upto)`` the blobs layer ``upto + 1`` reads and those layer ``upto`` writes hold
    what a plain forward gives; the sample is never written, though a ReLU works in place on the
    input blob."""
    sample = np.random.RandomState(1).standard_normal((8, 3, 6, 6)).astype(np.float32)
    kept = sample.copy()
    net = _net(branches)
    batches = SampleBatches(net, "data", sample, 4, mem_limit)
    lps = list(net.net_param.layer)
    for upto in range(1, len(lps)):
        want = _expected(branches, sample, 4, upto)
        names = set(lps[upto].top) | (set(lps[upto + 1].bottom) if upto + 1 < len(lps) else set())
        for b, valid in enumerate(batches.through(upto)):
            assert valid == 4
            for n in names:
                np.testing.assert_array_equal(net.blobs[n].data, want[n][4 * b:4 * b + 4], err_msg=f"{upto} {n}")
    np.testing.assert_array_equal(sample, kept)


def test_a_blob_no_step_writes_stays_one_array(branches):
    """A branch's output that later steps only read is kept once: the checkpoint after ``b``
    holds the array stored after ``a``; an in-place ReLU overwrites its blob in the array it
    had; ``checkpointed`` offers only what the step wrote."""
    sample = np.random.RandomState(2).standard_normal((8, 3, 6, 6)).astype(np.float32)
    net = _net(branches)
    batches = SampleBatches(net, "data", sample, 4, 1 << 30)
    for _ in batches.through(2):  # clip and a: data (clipped) and a are checkpointed
        pass
    data, a = batches.checkpointed("data"), batches.checkpointed("a")
    assert data is not None and a is not None
    for _ in batches.through(3):  # b reads data and writes b; data and a are not written
        pass
    assert batches.checkpointed("data") is None and batches.checkpointed("a") is None
    b_before = batches.checkpointed("b")
    assert b_before is not None
    assert batches._blobs["a"] is a  # kept, not copied
    for _ in batches.through(4):  # relu_b overwrites b in place: into the same array
        pass
    b_after = batches.checkpointed("b")
    assert b_after is b_before
    want = _expected(branches, sample, 4, 4)
    np.testing.assert_array_equal(b_after, want["b"])
    np.testing.assert_array_equal(data, want["data"])
    np.testing.assert_array_equal(a, want["a"])
    for _ in batches.through(5):  # cat reads a and b: a is still the array stored after a
        pass
    np.testing.assert_array_equal(batches.checkpointed("cat"), _expected(branches, sample, 4, 5)["cat"])
