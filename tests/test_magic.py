"""The initialization itself, on small inline nets and scikit-image's photos (numpy engine)."""
from __future__ import annotations

import numpy as np
import pytest

from caffe_utils import images, layout, magic, netio
from caffe_utils.magic import between, weights
from caffe_utils.engine.numpy_net import Net
from caffe_utils.pipeline import RunConfig, SampleSpec, run
from nets import SMALL
from scripts.support.datasets import skimage_photos


def _sample(prototxt, n, seed=0):
    prepared = magic.prepare_net(netio.read_net(prototxt))
    c, h, w = prepared.input_shape
    recs = images.list_source(str(skimage_photos()[0].parent))
    return images.load_sample(recs, n, images.Transform(c, h, w), np.random.RandomState(seed)).data


def _channel_stats(net, prototxt, sample, layer):
    """Independent check: forward the sample through a fresh net up to ``layer``."""
    net2 = Net(prototxt)
    for name, blobs in net.params.items():
        for a, b in zip(net2.params[name], blobs):
            a.data[...] = b.data
    net2.blobs["data"].reshape(sample.shape)
    net2.reshape()
    net2.blobs["data"].data[...] = sample
    net2.forward(end=layer)
    top = net2.blobs[layer].data.astype(np.float64)
    top = top.reshape(top.shape[0], top.shape[1], -1)
    return top.mean(axis=(0, 2)), top.std(axis=(0, 2))


@pytest.mark.parametrize("init", ["gaussian", "kmeans", "pca", "zca", "rand"])
def test_within_layer_gives_mean_beta_unit_std(small, photos, tmp_path, init):
    out = tmp_path / "out.caffemodel"
    run(RunConfig(prototxt=str(small), output=str(out), sample=SampleSpec(data=photos, images=24),
                  options=magic.InitOptions(batch_size=8, init=init, between=False, seed=1), engine="numpy"))
    net = Net(small, weights=out)
    sample = _sample(small, 24, seed=1)
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        mean, std = _channel_stats(net, small, sample, layer)
        np.testing.assert_allclose(std, 1.0, rtol=1e-3, err_msg=layer)
        np.testing.assert_allclose(mean, 0.1, atol=1e-3, err_msg=layer)


def test_between_layer_flattens_change_rates(small, photos, tmp_path):
    res = run(RunConfig(prototxt=str(small), output=str(tmp_path / "o.caffemodel"),
                        sample=SampleSpec(data=photos, images=16),
                        options=magic.InitOptions(batch_size=8, init="kmeans", iterations=30), engine="numpy"))
    rep = res.report
    assert rep.flatness_after < rep.flatness_before / 10
    # one flatness per round run; the last is the final one
    assert len(rep.flatness_rounds) == rep.iterations >= 1
    assert rep.flatness_rounds[-1] == rep.flatness_after
    assert rep.pinned_layers == ["fc2"]
    for l in rep.layers:
        assert np.isfinite(l.rate_before) and np.isfinite(l.rate_after)


def test_rescaling_pretrained_weights_preserves_outputs(small, photos, tmp_path):
    first = tmp_path / "first.caffemodel"
    run(RunConfig(prototxt=str(small), output=str(first), sample=SampleSpec(data=photos, images=16),
                  options=magic.InitOptions(batch_size=8, init="gaussian", between=False), engine="numpy"))
    second = tmp_path / "second.caffemodel"
    res = run(RunConfig(prototxt=str(small), output=str(second), weights=str(first),
                        sample=SampleSpec(data=photos, images=16), options=magic.InitOptions(batch_size=8),
                        engine="numpy"))
    rep = res.report
    assert all(l.initialized == "kept" for l in rep.layers)
    assert rep.function_preserved and rep.output_deviation < 1e-4
    assert rep.flatness_after < rep.flatness_before
    a, b = Net(small, weights=first), Net(small, weights=second)
    x = _sample(small, 1, seed=5)
    outs = []
    for net in (a, b):
        net.blobs["data"].data[...] = x
        outs.append(net.forward()["prob"].copy())
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    assert not np.allclose(a.params["conv1"][0].data, b.params["conv1"][0].data)


def test_same_seed_is_bit_identical(small, photos, tmp_path):
    outs = []
    for k in range(2):
        out = tmp_path / f"o{k}.caffemodel"
        run(RunConfig(prototxt=str(small), output=str(out), sample=SampleSpec(data=photos, images=12),
                      options=magic.InitOptions(batch_size=4, seed=7), engine="numpy"))
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    run(RunConfig(prototxt=str(small), output=str(tmp_path / "o2.caffemodel"),
                  sample=SampleSpec(data=photos, images=12), options=magic.InitOptions(batch_size=4, seed=8),
                  engine="numpy"))
    assert (tmp_path / "o2.caffemodel").read_bytes() != outs[0]


def test_zero_classifier_and_reinit(small, photos, tmp_path):
    first = tmp_path / "first.caffemodel"
    run(RunConfig(prototxt=str(small), output=str(first), sample=SampleSpec(data=photos, images=8),
                  options=magic.InitOptions(batch_size=4, zero_classifier=True), engine="numpy"))
    net = Net(small, weights=first)
    assert not np.any(net.params["fc2"][0].data) and not np.any(net.params["fc2"][1].data)
    # fc2 is all zero in the file, so it is initialized again; conv1 is re-initialized on request
    res = run(RunConfig(prototxt=str(small), output=str(tmp_path / "second.caffemodel"), weights=str(first),
                        sample=SampleSpec(data=photos, images=8),
                        options=magic.InitOptions(batch_size=4, reinit=["conv1"], between=False), engine="numpy"))
    how = {l.name: l.initialized for l in res.report.layers}
    assert how["conv1"] == "kmeans" and how["fc2"].startswith("gaussian") and how["conv2"] == "kept"


def test_data_driven_weights_whiten():
    rng = np.random.RandomState(0)
    mix = rng.standard_normal((6, 6))
    patches = mix @ rng.standard_normal((6, 5000))
    w = weights.data_driven_weights("pca", patches, 6, rng)
    x = patches - patches.mean(axis=1, keepdims=True)
    cov = (w @ x) @ (w @ x).T / x.shape[1]
    # float32 forms the covariance (a sum over m patches, error ~sqrt(m) eps of the top eigenvalue)
    # and decomposes it (eigh: backward error ~d eps of it); whitening scales entry (i, j) by
    # 1/sqrt((l_i + e)(l_j + e)), so off-diagonals may reach that error times the regularised
    # condition number (e = 1e-2 of the mean eigenvalue, as in magic.weights.whitening). Here ~6e-4 of
    # the unit diagonal: a wrong whitening is off by O(1)
    lam = np.linalg.eigvalsh(x @ x.T / x.shape[1])
    kappa = lam.max() / (lam.min() + 1e-2 * lam.mean())
    tol = np.finfo(np.float32).eps * (np.sqrt(x.shape[1]) + x.shape[0]) * kappa
    assert np.allclose(cov, np.diag(np.diag(cov)), atol=tol * np.abs(cov).max())  # decorrelated
    wk = weights.data_driven_weights("kmeans", patches, 4, rng)
    assert wk.shape == (4, 6) and np.all(np.isfinite(wk))
    wr = weights.data_driven_weights("rand", patches, 3, rng)
    np.testing.assert_allclose(np.linalg.norm(wr, axis=1), 1.0, rtol=1e-6)


def _kmeans_naive(xw, centers, iters, rng):
    """Spherical k-means written as plainly as possible: the oracle for weights.spherical_kmeans."""
    m, d = xw.shape
    k = centers.shape[1]
    c = centers.astype(np.float64).copy()
    for _ in range(iters):
        new = np.zeros((d, k))
        for i in range(m):
            dots = [float(np.dot(xw[i], c[:, j])) for j in range(k)]
            j = int(np.argmax(np.abs(dots)))
            new[:, j] += dots[j] * xw[i]
        empty = [j for j in range(k) if np.linalg.norm(new[:, j]) < 1e-12]
        if empty:
            picks = rng.choice(m, len(empty), replace=m < len(empty))
            for j, i in zip(empty, picks):
                new[:, j] = xw[i]
        c = new + c
        c /= np.linalg.norm(c, axis=0, keepdims=True) + 1e-12
    return c


@pytest.mark.parametrize("m,k", [(400, 7), (30, 50)])  # the second leaves centres empty
def test_spherical_kmeans_matches_naive_loop(m, k):
    rng = np.random.RandomState(3)
    d = 9
    xw = rng.standard_normal((m, d)).astype(np.float32)
    xw[: m // 2] += 4 * rng.standard_normal(d).astype(np.float32)  # a cluster
    xw /= np.linalg.norm(xw, axis=1, keepdims=True)
    c0 = rng.standard_normal((d, k)).astype(np.float32)
    c0 /= np.linalg.norm(c0, axis=0, keepdims=True)
    fast = weights.spherical_kmeans(xw, c0.copy(), 6, np.random.RandomState(5))
    slow = _kmeans_naive(xw, c0, 6, np.random.RandomState(5))
    np.testing.assert_allclose(fast, slow, rtol=0, atol=2e-5)
    assert np.allclose(np.linalg.norm(fast, axis=0), 1.0, atol=1e-5)


def test_too_few_patches_falls_back_to_gaussian(small, photos, tmp_path):
    net = SMALL.replace("num_output: 12 kernel_size: 5 stride: 2", "num_output: 12 kernel_size: 5 stride: 20")
    p = tmp_path / "sparse.prototxt"
    p.write_text(net.replace('bottom: "pool1"', 'bottom: "pool1"'))
    res = run(RunConfig(prototxt=str(p), output=str(tmp_path / "o.caffemodel"),
                        sample=SampleSpec(data=photos, images=2),
                        options=magic.InitOptions(batch_size=2, between=False), engine="numpy"))
    assert any("too few patches" in l.initialized for l in res.report.layers)
    assert any("gaussian weights" in w for w in res.warnings)


def test_one_full_between_step_flattens_a_homogeneous_net(small, photos, tmp_path):
    """With damping ~1, carrying each layer's correction on to the layers it feeds flattens a
    homogeneous net (ReLU, max pooling, grouped conv, FC) in a single iteration."""
    res = run(RunConfig(prototxt=str(small), output=str(tmp_path / "o.caffemodel"),
                        sample=SampleSpec(data=photos, images=16),
                        options=magic.InitOptions(batch_size=8, init="gaussian", iterations=1, damping=0.999),
                        engine="numpy"))
    assert res.report.flatness_before > 5
    assert res.report.flatness_after < 1.05
    assert res.report.function_preserved


def test_data_layer_source_and_transform_are_used(tmp_path):
    """Without --data the net's own ImageData source (an image list) and transform_param apply."""
    from PIL import Image
    rng = np.random.RandomState(0)
    (tmp_path / "imgs").mkdir()
    lines = []
    for i in range(6):
        Image.fromarray(rng.randint(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        lines.append(f"{i}.png {i % 2}")
    (tmp_path / "list.txt").write_text("\n".join(lines))
    net = f"""
    layer {{ name: "data" type: "ImageData" top: "data" top: "label"
            image_data_param {{ source: "list.txt" root_folder: "{tmp_path / 'imgs'}/" batch_size: 4 }}
            transform_param {{ crop_size: 24 mean_value: 120 scale: 0.01 }} }}
    layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param {{ num_output: 4 kernel_size: 3 }} }}
    layer {{ name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param {{ num_output: 2 }} }}
    layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }}
    """
    p = tmp_path / "train.prototxt"
    p.write_text(net)
    res = run(RunConfig(prototxt=str(p), output=str(tmp_path / "o.caffemodel"), sample=SampleSpec(images=6),
                        options=magic.InitOptions(batch_size=3), engine="numpy"))
    assert res.images_used == 6
    w = netio.read_caffemodel(tmp_path / "o.caffemodel")
    assert w["conv"].blobs[0].shape == (4, 3, 3, 3) and w["fc"].blobs[0].shape == (2, 4 * 22 * 22)
    assert "loss" in w and not w["loss"].blobs  # the full net definition is written, as Caffe does


def test_constant_images_warn_and_stay_finite(small, tmp_path):
    from PIL import Image
    d = tmp_path / "flat"
    d.mkdir()
    for i in range(4):
        Image.fromarray(np.full((60, 60, 3), 77, np.uint8)).save(d / f"{i}.png")
    res = run(RunConfig(prototxt=str(small), output=str(tmp_path / "o.caffemodel"),
                        sample=SampleSpec(data=str(d), images=4),
                        options=magic.InitOptions(batch_size=2, init="gaussian"), engine="numpy"))
    assert any("constant on the sample" in w for w in res.warnings)
    net = Net(small, weights=tmp_path / "o.caffemodel")
    for blobs in net.params.values():
        for b in blobs:
            assert np.all(np.isfinite(b.data))


def test_between_stage_uses_a_smaller_batch_under_a_small_mem_limit(small):
    """The between-layer stage fits its batch's data and diffs into the memory limit; the rates
    are calibrated over the same images either way, so the flattening still works."""
    sample = _sample(small, 16)
    prepared = magic.prepare_net(netio.read_net(str(small)))
    per_image = None
    for mem in (None, 3):
        net = Net(small)
        net.blobs["data"].reshape(8, *prepared.input_shape)
        net.reshape()
        per_image = per_image or sum(8 * int(np.prod(b.data.shape[1:])) for b in net.blobs.values())
        limit = (1 << 30) if mem is None else mem * per_image
        opts = magic.InitOptions(init="gaussian", damping=1.0, batch_size=8, mem_limit=limit)
        assert between.between_batch(net, opts.batch_size, opts.mem_limit) == (8 if mem is None else 3)
        rep = magic.initialize(net, prepared, sample, opts)
        assert net.blobs["data"].data.shape[0] == (8 if mem is None else 3)
        assert rep.flatness_after < 1.2, mem


def test_fewer_images_than_a_batch(small):
    """A sample smaller than the batch fills the batch by repeating its images (the last batch
    of any sample is filled up that way)."""
    sample = _sample(small, 3)
    prepared = magic.prepare_net(netio.read_net(str(small)))
    net = Net(small)
    net.blobs["data"].reshape(8, *prepared.input_shape)
    net.reshape()
    rep = magic.initialize(net, prepared, sample, magic.InitOptions(init="kmeans", batch_size=8, iterations=2))
    assert all(l.init is not None for l in rep.layers)
    assert np.isfinite(rep.flatness_after)


def test_fewer_images_than_the_batch_size_shrink_the_batch(small, photos, tmp_path):
    res = run(RunConfig(prototxt=str(small), output=str(tmp_path / "o.caffemodel"),
                        sample=SampleSpec(data=photos, images=3),
                        options=magic.InitOptions(init="kmeans", batch_size=16, iterations=2), engine="numpy"))
    assert any("below --batch-size 16: using batches of 3" in w for w in res.warnings)
    assert np.isfinite(res.report.flatness_after)


FIXED_AXIS = """
name: "fixed"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "flat" type: "Reshape" bottom: "conv1" top: "flat" reshape_param { shape { dim: 1 dim: -1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "relu2" type: "ReLU" bottom: "fc" top: "fc" }
layer { name: "fc2" type: "InnerProduct" bottom: "fc" top: "fc2" inner_product_param { num_output: 3 } }
"""


def test_blobs_without_a_row_per_image_are_recomputed(tmp_path):
    """A blob whose first axis is not the batch (here all images' features in one row) is not
    checkpointed per image: every batch computes it again, so later layers see its real values."""
    p = tmp_path / "fixed.prototxt"
    p.write_text(FIXED_AXIS)
    prepared = magic.prepare_net(netio.read_net(str(p)))
    net = Net(p)
    net.blobs["data"].reshape(4, 3, 8, 8)
    net.reshape()
    sample = np.random.RandomState(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    magic.initialize(net, prepared, sample, magic.InitOptions(init="gaussian", batch_size=4, between=False))
    tops = []
    for b in range(2):  # fc2's output over the two batches: mean beta and unit variance together
        net.blobs["data"].data[...] = sample[4 * b:4 * b + 4]
        net.forward()
        tops.append(np.array(net.blobs["fc2"].data, np.float64))
    t = np.concatenate(tops)
    np.testing.assert_allclose(t.mean(axis=0), 0.1, atol=1e-4)
    np.testing.assert_allclose(t.std(axis=0), 1.0, rtol=1e-4)


def test_library_call_with_a_wrong_sample_is_one_clear_error(small):
    from caffe_utils.errors import DataError
    prepared = magic.prepare_net(netio.read_net(str(small)))
    net = Net(small)
    net.blobs["data"].reshape(8, *prepared.input_shape)
    net.reshape()
    good = _sample(small, 4)
    for sample, opts, what in [(good[:0], magic.InitOptions(batch_size=8), "at least one image"),
                               (good.transpose(0, 2, 3, 1), magic.InitOptions(batch_size=8), "at least one image"),
                               (good, magic.InitOptions(batch_size=4), "not the batch size 4")]:
        with pytest.raises(DataError, match=what):
            magic.initialize(net, prepared, sample, opts)


GRAM_NET = """
name: "gram"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1" inner_product_param { num_output: 64 } }
layer { name: "relu2" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 40 } }
layer { name: "ip3a" type: "InnerProduct" bottom: "ip2" top: "ip3a" inner_product_param { num_output: 32 } }
layer { name: "ip3b" type: "InnerProduct" bottom: "ip2" top: "ip3b"
        inner_product_param { num_output: 36 transpose: true } }
layer { name: "ip4" type: "InnerProduct" bottom: "ip2" top: "ip4" inner_product_param { num_output: 8 } }
"""


def test_inner_product_energies_from_the_gram_matrix_equal_the_diffs(tmp_path, monkeypatch):
    """Stage 3 takes the InnerProduct layers' gradient energies from their rows' Gram matrix
    instead of their weight diffs (behind in-place layers, with two consumers of one blob, in
    both weight orientations); ip4 is too narrow for it (4 rows against 8 outputs). The rates
    and the written weights are those of the diff path."""
    p = tmp_path / "gram.prototxt"
    p.write_text(GRAM_NET)
    prepared = magic.prepare_net(netio.read_net(str(p)))
    sample = np.random.RandomState(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    opts = magic.InitOptions(init="gaussian", batch_size=4, rate_images=8)
    used = []

    def init(gram: bool):
        net = Net(p)
        found = between._gram_layers(net, [lp for lp in net.net_param.layer if lp.type == "InnerProduct"])
        used.append(sorted(found))
        if not gram:
            monkeypatch.setattr(between, "_gram_layers", lambda net, lps: {})
        rep = magic.initialize(net, prepared, sample, opts)
        monkeypatch.undo()
        if gram:  # their weight diffs were never formed
            assert not any(np.any(net.params[n][0].diff) for n in found)
        return rep, {n: np.array(b[0].data) for n, b in net.params.items()}

    (rep_g, w_g), (rep_d, w_d) = init(True), init(False)
    assert used[0] == ["ip1", "ip2", "ip3a", "ip3b"]
    for a, b in zip(rep_g.layers, rep_d.layers):
        assert a.rate_before == pytest.approx(b.rate_before, rel=1e-5)
        assert a.rate_after == pytest.approx(b.rate_after, rel=1e-4)
    for n in w_d:
        np.testing.assert_allclose(w_g[n], w_d[n], rtol=1e-4, atol=1e-7, err_msg=n)


@pytest.mark.parametrize("transpose", [False, True])
def test_gram_energies_match_the_formed_gradient(transpose):
    rng = np.random.RandomState(3)
    x, dy = rng.standard_normal((5, 30)), rng.standard_normal((5, 20))
    flag = str(transpose).lower()
    lp = netio.parse_net_text('layer { name: "ip" type: "InnerProduct" '
                              f'inner_product_param {{ num_output: 20 transpose: {flag} }} }}').layer[0]
    w = x.T @ dy if transpose else dy.T @ x
    np.testing.assert_allclose(layout.inner_product_gradient_energies(x, dy), layout.input_energies(lp, w),
                               rtol=1e-10)



SCALE_NET = """
input: "data" input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "prelu" type: "PReLU" bottom: "conv" top: "conv" }
"""


def test_the_initialization_computes_only_affine_param_diffs(tmp_path):
    """Within the block the non-affine layers (an in-place Scale, PReLU) compute no parameter
    diff, and keep no copy for one; the convolution does; after it every setting is back,
    one turned off before included."""
    from caffe_utils.magic.context import affine_param_diffs_only
    p = tmp_path / "net.prototxt"
    p.write_text(SCALE_NET)
    net = Net(str(p))
    layers = dict(zip(net.layer_names, net.layers))
    layers["prelu"].set_param_propagate_down(0, False)
    net.blobs["data"].data[...] = np.random.RandomState(0).standard_normal(net.blobs["data"].data.shape)
    with affine_param_diffs_only(net):
        net.forward()
        assert layers["scale"]._saved is None
        net.blobs["conv"].diff[...] = 1
        net.backward()
        assert not any(b.diff.any() for name in ("scale", "prelu") for b in net.params[name])
        assert net.params["conv"][0].diff.any()
    assert [layers["scale"].param_propagate_down(i) for i in (0, 1)] == [True, True]
    assert not layers["prelu"].param_propagate_down(0)
    assert layers["conv"].param_propagate_down(0)
