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


SHARED = BRANCHES + """
layer { name: "flat" type: "Flatten" bottom: "c" top: "flat" }
layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc" inner_product_param { num_output: 2 } }
"""


def test_layers_write_the_checkpoint_where_it_lies(tmp_path):
    """The numpy engine's layers write a checkpointed blob straight into its checkpoint rows
    (the net's blob is bound to them, no copy after the batch); a layer that replaces its top's
    array (Flatten shares its bottom's) is copied as before. Afterwards every blob has its own
    array again, holding the last batch, and Flatten's top shares c's again."""
    path = tmp_path / "shared.prototxt"
    path.write_text(SHARED)
    sample = np.random.RandomState(3).standard_normal((8, 3, 6, 6)).astype(np.float32)
    net = _net(path)
    own = {n: b.data for n, b in net.blobs.items()}
    batches = SampleBatches(net, "data", sample, 4, 1 << 30)
    lps = list(net.net_param.layer)
    for upto in range(1, len(lps) - 1):
        for b, _ in enumerate(batches.through(upto)):
            for n in lps[upto].top:
                if n != "flat":
                    assert not np.shares_memory(net.blobs[n].data, own[n]), (upto, n)
        for n in lps[upto].top:
            stored = batches.checkpointed(n)
            np.testing.assert_array_equal(stored, _expected(path, sample, 4, upto)[n])
            np.testing.assert_array_equal(net.blobs[n].data, stored[4:])  # the last batch
        assert all(net.blobs[n].data is own[n] for n in own if n != "flat")
        assert np.shares_memory(net.blobs["flat"].data, net.blobs["c"].data)


def test_engines_bind_a_blob_to_an_array(tmp_path):
    """numpy: a bound blob is the given array until unbind, which copies its values back into
    the blob's own array; an array of another shape is refused."""
    path = tmp_path / "shared.prototxt"
    path.write_text(SHARED)
    net = _net(path)
    own = net.blobs["c"].data
    target = np.zeros_like(own)
    assert not net.bind_data("c", np.zeros((1,) + own.shape[1:], np.float32))
    assert net.bind_data("c", target)
    net.blobs["data"].data[...] = 1.0
    net.forward()
    assert net.blobs["c"].data is target and target.any()
    assert np.shares_memory(net.blobs["flat"].data, target)
    net.unbind_data()
    assert net.blobs["c"].data is own
    np.testing.assert_array_equal(own, target)
    assert np.shares_memory(net.blobs["flat"].data, own)
