"""Function-preserving rescaling: scaling any non-pinned group leaves the net's output unchanged."""
from __future__ import annotations

import numpy as np
import pytest

from caffe_utils.magic import between, degrees, plan as scale_plan, scale_rules, solve
from caffe_utils.engine.numpy_net import Net

DAG = """
name: "dag"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 12 dim: 12 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "c2a" type: "Convolution" bottom: "c1" top: "c2a" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "c2b" type: "Convolution" bottom: "c1" top: "c2b" convolution_param { num_output: 4 kernel_size: 3 pad: 1 group: 2 } }
layer { name: "pr" type: "PReLU" bottom: "c2b" top: "c2b" }
layer { name: "cat" type: "Concat" bottom: "c2a" bottom: "c2b" top: "cat" }
layer { name: "bn" type: "BatchNorm" bottom: "cat" top: "bn" batch_norm_param { use_global_stats: true } }
layer { name: "sc" type: "Scale" bottom: "bn" top: "sc" scale_param { bias_term: true } }
layer { name: "c3" type: "Convolution" bottom: "cat" top: "c3" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "c4" type: "Convolution" bottom: "sc" top: "c4" convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "c3" bottom: "c4" top: "sum" }
layer { name: "pool" type: "Pooling" bottom: "sum" top: "pool" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "drop" type: "Dropout" bottom: "pool" top: "pool" }
layer { name: "sc2" type: "Scale" bottom: "pool" top: "sc2" scale_param { bias_term: true } }
layer { name: "flat" type: "Flatten" bottom: "sc2" top: "flat" }
layer { name: "fc1" type: "InnerProduct" bottom: "flat" top: "fc1" inner_product_param { num_output: 7 } }
layer { name: "r2" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2" inner_product_param { num_output: 3 transpose: true } }
layer { name: "prob" type: "Softmax" bottom: "fc2" top: "prob" }
"""


def _net(tmp_path, text=DAG):
    p = tmp_path / "net.prototxt"
    p.write_text(text)
    net = Net(p, "TEST")
    rng = np.random.RandomState(0)
    for name, blobs in net.params.items():
        for j, b in enumerate(blobs):
            b.data[...] = rng.standard_normal(b.shape)
        if name == "bn":
            blobs[1].data[...] = np.abs(blobs[1].data) + 0.5
            blobs[2].data[...] = 2.0
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    return net


def test_plan_groups_consumers_and_pins(tmp_path):
    net = _net(tmp_path)
    plan = scale_plan.build_plan(net)
    assert plan.affine == ["c1", "c2a", "c2b", "c3", "c4", "fc1", "fc2"]
    groups = plan.groups
    # c3 and c4 are summed: one group
    assert plan.group_of["c3"] == plan.group_of["c4"]
    assert len(groups) == 6
    assert plan.group_of["fc2"] in plan.pinned and plan.group_of["c1"] not in plan.pinned
    cons = {c.layer: c.groups for c in plan.consumers}
    assert list(cons["c3"]) == [plan.group_of["c2a"]] * 4 + [plan.group_of["c2b"]] * 4
    assert set(np.unique(cons["fc1"])) == {plan.group_of["c3"]}
    assert [n for n, *_ in plan.batchnorms] == ["bn"]
    assert {(n, j) for n, j, *_ in plan.biases} == {("sc2", 1)}  # "sc" follows BatchNorm: unscaled
    assert plan.inexact == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rescaling_preserves_the_function(tmp_path, seed):
    net = _net(tmp_path)
    net.forward()
    before = net.blobs["prob"].data.copy(), net.blobs["fc2"].data.copy()
    plan = scale_plan.build_plan(net)
    rng = np.random.RandomState(seed)
    scale = {g: float(rng.uniform(0.2, 5.0)) for g in plan.groups if g not in plan.pinned}
    w_before = {n: [b.data.copy() for b in bl] for n, bl in net.params.items()}
    scale_plan.apply_scales(net, plan, scale)
    net.forward()
    np.testing.assert_allclose(net.blobs["fc2"].data, before[1], rtol=1e-4, atol=1e-4 * np.abs(before[1]).max())
    np.testing.assert_allclose(net.blobs["prob"].data, before[0], rtol=1e-4, atol=1e-6)
    # the weights did change
    assert not np.allclose(net.params["c1"][0].data, w_before["c1"][0])


def test_inexact_layers_are_reported(tmp_path):
    text = DAG.replace('layer { name: "r1" type: "ReLU"', 'layer { name: "r1" type: "TanH"')
    net = _net(tmp_path, text)
    plan = scale_plan.build_plan(net)
    assert plan.inexact == ["r1"]


def test_batchnorm_rescale_is_exact():
    class B:
        def __init__(self, a):
            self.data = np.asarray(a, np.float32)

    from caffe_utils.schema import caffe_pb2
    lp = caffe_pb2().LayerParameter(name="bn", type="BatchNorm")
    blobs = [B([1.0, -2.0]), B([4.0, 0.5]), B([2.0])]
    x = np.array([3.0, 1.0])
    eps = lp.batch_norm_param.eps
    y = (x - np.array([0.5, -1.0])) / np.sqrt(np.array([2.0, 0.25]) + eps)
    r = np.array([3.0, 0.1])
    scale_plan.rescale_batchnorm(blobs, lp, r)
    mean, var = blobs[0].data / blobs[2].data, blobs[1].data / blobs[2].data
    y2 = (r * x - mean) / np.sqrt(var + eps)
    np.testing.assert_allclose(y2, y, rtol=1e-5)


CHAIN = """
name: "chain"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 10 dim: 10 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 6 kernel_size: 3 } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "norm" type: "LRN" bottom: "c1" top: "norm" lrn_param { local_size: 3 alpha: 1 beta: 0.75 k: 1e-3 } }
layer { name: "sq" type: "Power" bottom: "norm" top: "sq" power_param { power: 2 } }
layer { name: "t" type: "TanH" bottom: "sq" top: "sq" }
layer { name: "fc" type: "InnerProduct" bottom: "sq" top: "fc" inner_product_param { num_output: 5 } }
"""


#: CHAIN without Power and TanH: conv, ReLU, LRN, InnerProduct
_LRN_CHAIN = CHAIN.replace('layer { name: "sq" type: "Power" bottom: "norm" top: "sq" power_param { power: 2 } }\n',
                           '').replace('layer { name: "t" type: "TanH" bottom: "sq" top: "sq" }\n',
                                       '').replace('bottom: "sq" top: "fc"', 'bottom: "norm" top: "fc"')


def test_paths_record_the_inexact_layers_each_column_passed(tmp_path):
    net = _net(tmp_path, CHAIN)
    plan = scale_plan.build_plan(net)
    assert plan.inexact == ["norm", "sq", "t"]
    assert plan.degree_layers == ["norm", "sq", "t"]
    (cons,) = plan.consumers
    assert cons.layer == "fc" and set(cons.groups) == {plan.group_of["c1"]}
    assert {plan.paths[v] for v in cons.via} == {("norm", "sq", "t")}
    np.testing.assert_allclose(plan.powers(cons.via, {"norm": 0.5, "sq": 2.0, "t": 0.8}), 0.8)


def test_degree_estimates_and_blobs_end_as_after_forward(tmp_path):
    net = _net(tmp_path, CHAIN)
    net.forward()
    ref = {k: b.data.copy() for k, b in net.blobs.items()}
    deg = degrees.forward_estimating_degrees(net, ["norm", "sq", "t"])
    for k, b in net.blobs.items():
        np.testing.assert_array_equal(b.data, ref[k], err_msg=k)
    # LRN with k << alpha * sum x^2 is nearly homogeneous of degree 1 - 2 beta = -0.5
    assert -0.6 < deg["norm"] < -0.3
    # x^2 is homogeneous of degree 2 on its channel-centred norm as well
    assert deg["sq"] == pytest.approx(2.0, abs=1e-5)
    # TanH (in place) squashes: degree between 0 and 1
    assert 0.0 <= deg["t"] < 1.0


def test_kept_degree_inputs_replace_the_forward_pass(tmp_path):
    """Step degrees from kept inputs equal those of a forward pass, which they replace."""
    net = _net(tmp_path, CHAIN)
    plan = scale_plan.build_plan(net)
    rho = np.zeros(len(plan.affine) + 1)
    rho[plan.group_of["c1"]] = 0.7
    ref = degrees.step_degrees(net, plan, rho, {"norm": 0.5, "sq": 2.0}, finish=False)
    kept: dict = {}
    assert degrees.step_degrees(net, plan, rho, {"norm": 0.5, "sq": 2.0}, finish=False, inputs=kept) == ref
    assert set(kept) == {"norm", "sq", "t"}
    net.blobs["data"].data[...] = 0  # a forward pass would now see other inputs
    assert degrees.step_degrees(net, plan, rho, {"norm": 0.5, "sq": 2.0}, finish=False, inputs=kept) == ref
    assert degrees.step_degrees(net, plan, rho, {"norm": 0.5, "sq": 2.0}, finish=False) != ref


def test_kept_degree_inputs_measure_the_response_at_x_once(tmp_path, monkeypatch):
    """A degree layer's response at its kept input x is measured once: a later step from the
    same x runs the layer only at its stepped input, with the degrees of a fresh measurement."""
    net = _net(tmp_path, CHAIN)
    plan = scale_plan.build_plan(net)
    rho = np.zeros(len(plan.affine) + 1)
    kept: dict = {}
    degrees.step_degrees(net, plan, rho, {}, local=True, finish=False, inputs=kept)
    assert all(probe.at_x is not None for probe in kept.values())
    rho[plan.group_of["c1"]] = 0.7
    ref = degrees.step_degrees(net, plan, rho, {"norm": 0.5, "sq": 2.0}, finish=False)
    runs = []
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda start=None, end=None, **kw: runs.append((start, end)) or
                        forward(start=start, end=end, **kw))
    assert degrees.step_degrees(net, plan, rho, {"norm": 0.5, "sq": 2.0}, finish=False, inputs=kept) == ref
    assert sorted(runs) == sorted((n, n) for n in kept for _ in range(2))  # F x + h u and F x: the stepped input only


def test_stage3_measures_the_degree_inputs_again_after_a_rescale(tmp_path):
    """Stage 3 keeps the degree layers' inputs between its degree measurements at one set of
    scales; after a rescale its degrees are those of a fresh forward pass again."""
    from caffe_utils import magic, netio
    from caffe_utils.magic.context import InitContext
    net = _net(tmp_path, CHAIN)
    prepared = magic.prepare_net(netio.read_net(str(tmp_path / "net.prototxt")))
    sample = np.random.RandomState(1).standard_normal((8, 3, 10, 10)).astype(np.float32)
    ctx = InitContext.create(net, prepared, sample, magic.InitOptions(batch_size=4, rate_images=8), None)
    plan = scale_plan.build_plan(net)
    passes = between._Passes(ctx, plan)
    rho = np.zeros(len(plan.affine) + 1)
    rho[plan.group_of["c1"]] = 0.5
    before = passes.step_degrees(rho, {})
    assert passes.inputs and passes.step_degrees(rho, {}) == before
    passes.rescale({plan.group_of["c1"]: 20.0}, before[0])
    after = passes.step_degrees(rho, {})
    net.set_data("data", passes.check_batch)
    assert after == degrees.step_degrees(net, plan, rho, {}, finish=False) != before


def test_undo_with_degrees_keeps_the_function_closer(tmp_path):
    devs = []
    for use_degrees in (False, True):
        net = _net(tmp_path, _LRN_CHAIN)
        plan = scale_plan.build_plan(net)
        deg = degrees.forward_estimating_degrees(net, plan.degree_layers)
        before = net.blobs["fc"].data.copy()
        scale_plan.apply_scales(net, plan, {plan.group_of["c1"]: 1.2}, deg if use_degrees else None)
        net.forward()
        devs.append(np.abs(net.blobs["fc"].data - before).max() / np.abs(before).max())
    assert devs[1] < devs[0] / 5


def _energies(net, plan, seed=3):
    """Energies on the net's 2-image input, averaged over two top gradients (fixed by ``seed``)."""
    from caffe_utils import layout, measure
    lps = [lp for lp in net.net_param.layer if lp.type in layout.AFFINE_TYPES]
    images = np.concatenate([net.blobs["data"].data.copy()] * 2)
    grad = {}
    for _ in measure.gradient_batches(net, "data", images, seed):
        for lp in lps:
            e = layout.input_energies(lp, net.params[lp.name][0].diff)
            grad[lp.name] = grad.get(lp.name, 0) + e
    weight = {lp.name: layout.input_energies(lp, net.params[lp.name][0].data) for lp in lps}
    deg = degrees.forward_estimating_degrees(net, plan.degree_layers) if plan.degree_layers else {}
    return solve.Energies(grad, weight, deg)


@pytest.mark.parametrize("seed", [0, 1])
def test_rate_model_predicts_a_rescaled_homogeneous_net(tmp_path, seed):
    """PReLU, Concat, BatchNorm, Scale, Eltwise, pooling, transposed IP: every input channel's
    gradient and weight energy after a rescaling is what the model says (without the Softmax,
    which these random weights saturate)."""
    net = _net(tmp_path, DAG.replace('layer { name: "prob" type: "Softmax" bottom: "fc2" top: "prob" }\n', ""))
    plan = scale_plan.build_plan(net)
    model = solve.RateModel(plan, _energies(net, plan))
    rng = np.random.RandomState(seed)
    rho = np.zeros(len(plan.affine) + 1)
    for g in plan.groups:
        if g not in plan.pinned:
            rho[g] = rng.uniform(-1.5, 1.5)
    predicted = model.predict(rho)
    scale_plan.apply_scales(net, plan, {g: float(np.exp(rho[g])) for g in plan.groups})
    measured = _energies(net, plan)
    for name in plan.affine:
        np.testing.assert_allclose(measured.grad[name], predicted.grad[name], rtol=2e-4, err_msg=name)
        np.testing.assert_allclose(measured.weight[name], predicted.weight[name], rtol=2e-4, err_msg=name)
    logs, _ = model.log_rates(rho)
    np.testing.assert_allclose(np.exp(logs), [predicted.rates()[n] for n in plan.affine], rtol=1e-9)


def test_rate_model_jacobian_matches_finite_differences(tmp_path):
    net = _net(tmp_path, CHAIN)
    plan = scale_plan.build_plan(net)
    model = solve.RateModel(plan, _energies(net, plan))
    rho = np.zeros(len(plan.affine) + 1)
    rho[plan.group_of["c1"]] = 0.3
    logs, jac = model.log_rates(rho)
    for g in plan.groups:
        h = np.zeros_like(rho)
        h[g] = 1e-6
        fd = (model.log_rates(rho + h)[0] - model.log_rates(rho - h)[0]) / 2e-6
        np.testing.assert_allclose(jac[:, g], fd, rtol=1e-5, atol=1e-7)


def _chain(tmp_path):
    text = """
name: "c"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 } } }
layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" inner_product_param { num_output: 4 } }
layer { name: "n" type: "TanH" bottom: "a" top: "a" }
layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" inner_product_param { num_output: 4 } }
layer { name: "c" type: "InnerProduct" bottom: "b" top: "c" inner_product_param { num_output: 3 } }
"""
    net = _net(tmp_path, text)
    return net, scale_plan.build_plan(net)


@pytest.mark.parametrize("d", [1.0, 0.5])
def test_solve_brings_the_pinned_layer_to_the_common_rate(tmp_path, d):
    """c is the output layer (pinned): it moves only through b's scale, and the solve finds the
    one rate all three reach (by hand: log C_c + (log C_b - t) + d (log C_a - t) = t)."""
    net, plan = _chain(tmp_path)
    ga, gb, gc = (plan.group_of[n] for n in "abc")
    assert plan.pinned == {gc}
    energies = _energies(net, plan)
    energies.degrees["n"] = d
    model = solve.RateModel(plan, energies)
    c = dict(zip("abc", np.log([energies.rates()[n] for n in "abc"])))
    rho = solve.solve(model)
    logs, _ = model.log_rates(rho)
    t = float(logs.mean())
    assert rho[gc] == 0.0
    assert c["c"] + (c["b"] - t) + d * (c["a"] - t) == pytest.approx(t, abs=1e-6)
    logs, _ = model.log_rates(rho)
    np.testing.assert_allclose(logs, t, atol=1e-6)


def test_solve_without_pinned_groups_keeps_the_geometric_mean(tmp_path):
    """The output BatchNorm absorbs every scale: nothing is pinned, any common rate is
    reachable, and the solve keeps the rates' geometric mean (the overall learning speed)."""
    text = CHAIN.replace('layer { name: "fc"', 'layer { name: "c2" type: "Convolution" bottom: "sq" top: "c2" '
                         'convolution_param { num_output: 4 kernel_size: 3 } }\nlayer { name: "fc"').replace(
        'bottom: "sq" top: "fc"', 'bottom: "c2" top: "fc"') + \
        'layer { name: "bn" type: "BatchNorm" bottom: "fc" top: "bn" batch_norm_param { use_global_stats: true } }\n'
    net = _net(tmp_path, text)
    plan = scale_plan.build_plan(net)
    assert not plan.pinned
    energies = _energies(net, plan)
    rho = solve.solve(solve.RateModel(plan, energies))
    logs, _ = solve.RateModel(plan, energies).log_rates(rho)
    np.testing.assert_allclose(logs, np.mean(np.log(list(energies.rates().values()))), atol=1e-6)


def test_a_type_without_scale_rule_is_pinned_and_named(tmp_path):
    """Tile has a layer but no scale rule: what reaches it stays unscaled, and the plan (and
    the report) name it; a scale rule for it would change this test."""
    text = """
name: "tile"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "t" type: "Tile" bottom: "c1" top: "t" tile_param { axis: 1 tiles: 2 } }
layer { name: "c2" type: "Convolution" bottom: "t" top: "c2" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "r" type: "ReLU" bottom: "c2" top: "c2" }
layer { name: "fc" type: "InnerProduct" bottom: "c2" top: "fc" inner_product_param { num_output: 3 } }
"""
    plan = scale_plan.build_plan(_net(tmp_path, text))
    assert plan.unknown == ["t"]
    assert plan.group_of["c1"] in plan.pinned and plan.group_of["c2"] not in plan.pinned
    assert "c2" not in {c.layer for c in plan.consumers}  # nothing scaled arrives there


def test_plan_builder_dispatches_on_registered_rules(tmp_path):
    """Every layer type the numpy engine runs either has a scale rule or is a data layer (no
    bottoms: nothing to pass on) or is knowingly left to the pinned default: Tile, and Python,
    whose function is the user's and unknown to the plan."""
    from caffe_utils.layers.base import supported_types
    from caffe_utils.magic.prepare import DATA_LAYERS
    missing = set(supported_types()) - set(scale_rules.RULES) - set(DATA_LAYERS)
    assert missing == {"Tile", "Python"}


def test_broyden_correction_makes_the_model_reproduce_the_measured_step(tmp_path):
    """After a measured round, the corrected model predicts exactly the rates measured for
    the step it took (the secant condition), and nothing new for a step orthogonal to it; so
    does the model after a second round."""
    net, plan = _chain(tmp_path)
    energies = _energies(net, plan)
    model = solve.RateModel(plan, energies)
    rho = np.zeros(len(plan.affine) + 1)
    rho[plan.group_of["a"]], rho[plan.group_of["b"]] = 0.4, -0.2
    predicted = model.predict(rho)
    measured = solve.Energies({n: g * (1.5 if n == "b" else 1.0) for n, g in predicted.grad.items()},
                              predicted.weight, predicted.degrees)
    corrected = solve.RateModel(plan, energies, between._broyden(model, rho, predicted, measured))
    logs, _ = corrected.log_rates(rho)
    np.testing.assert_allclose(np.exp(logs), [measured.rates()[n] for n in plan.affine], rtol=1e-9)
    other = np.zeros_like(rho)
    other[plan.group_of["a"]], other[plan.group_of["b"]] = 0.2, 0.4
    np.testing.assert_allclose(corrected.log_rates(other)[0], model.log_rates(other)[0], atol=1e-12)
    # a second round's update keeps the secant condition for the model that already carries a
    # correction: what it learns is the corrected model's own error, not the bare model's
    step = other + 0.5 * rho  # along the first step too, where the correction acts
    again = corrected.predict(step)
    measured = solve.Energies({n: g * (0.7 if n == "a" else 1.0) for n, g in again.grad.items()},
                              again.weight, again.degrees)
    twice = solve.RateModel(plan, energies, between._broyden(corrected, step, again, measured))
    np.testing.assert_allclose(np.exp(twice.log_rates(step)[0]), [measured.rates()[n] for n in plan.affine],
                               rtol=1e-9)


def test_undoing_a_round_restores_the_weights(tmp_path):
    net = _net(tmp_path, CHAIN)
    plan = scale_plan.build_plan(net)
    before = {n: [b.data.copy() for b in bl] for n, bl in net.params.items()}
    deg = degrees.forward_estimating_degrees(net, plan.degree_layers)
    scale = {plan.group_of["c1"]: 1.7}
    scale_plan.apply_scales(net, plan, scale, deg)
    between._undo(lambda s, d: scale_plan.apply_scales(net, plan, s, d), scale, deg)
    for n, blobs in net.params.items():
        for b, ref in zip(blobs, before[n]):
            np.testing.assert_allclose(b.data, ref, rtol=1e-6, err_msg=n)


@pytest.mark.parametrize("images,batches", [(16, 4), (14, 4), (12, 3)])
def test_calibration_errors_are_the_spread_of_its_batches(tmp_path, images, batches):
    """The standard error of each calibrated log rate is the spread of the calibration's
    batches (their gradient energy per image, each under its own top gradient; a short last
    batch counts its real images), and unknown (nan) with fewer than 4 batches."""
    from caffe_utils import layout, magic, measure, netio
    from caffe_utils.magic.context import InitContext
    net = _net(tmp_path, CHAIN)
    prepared = magic.prepare_net(netio.read_net(str(tmp_path / "net.prototxt")))
    sample = np.random.RandomState(1).standard_normal((images, 3, 10, 10)).astype(np.float32)
    ctx = InitContext.create(net, prepared, sample, magic.InitOptions(batch_size=4, rate_images=images), None)
    passes = between._Passes(ctx, scale_plan.build_plan(net))
    passes.calibrate()
    per_batch = {}
    for valid in measure.gradient_batches(net, "data", passes.images, passes.seed):
        for lp in passes.lps:
            e = layout.input_energies(lp, net.params[lp.name][0].diff).sum() / valid
            per_batch.setdefault(lp.name, []).append(e)
    assert {len(v) for v in per_batch.values()} == {batches}
    for name, g in per_batch.items():
        g = np.array(g)
        want = g.std(ddof=1) / (2 * g.mean() * np.sqrt(g.size)) if batches >= 4 else np.nan
        np.testing.assert_allclose(passes.errors[name], want, rtol=1e-5, err_msg=name)


def test_a_correcting_pass_widens_the_errors_by_the_spread_of_its_own_batches(tmp_path, monkeypatch):
    """A correcting pass's standard errors are, per layer, the calibration's or, where larger,
    the spread of the pass's own batches (two of them here, under their own top gradients)."""
    from caffe_utils import layout, magic, measure, netio
    from caffe_utils.magic.context import InitContext
    monkeypatch.setattr(between, "CHECK_IMAGES", 8)
    net = _net(tmp_path, _LRN_CHAIN)
    prepared = magic.prepare_net(netio.read_net(str(tmp_path / "net.prototxt")))
    sample = np.random.RandomState(1).standard_normal((16, 3, 10, 10)).astype(np.float32)
    ctx = InitContext.create(net, prepared, sample, magic.InitOptions(batch_size=4, rate_images=16), None)
    passes = between._Passes(ctx, scale_plan.build_plan(net))
    with np.errstate(all="ignore"):
        passes.calibrate()
        _, errors = passes.correct()
    per_batch = {}
    for valid in measure.gradient_batches(net, "data", passes.check_images, passes.seed):
        for lp in passes.lps:
            per_batch.setdefault(lp.name, []).append(layout.input_energies(lp, net.params[lp.name][0].diff).sum() / valid)
    assert {len(v) for v in per_batch.values()} == {2}
    for name, g in per_batch.items():
        own = np.std(g, ddof=1) / (2 * np.mean(g) * np.sqrt(2))
        np.testing.assert_allclose(errors[name], max(own, passes.errors[name]), rtol=1e-5, err_msg=name)
    assert errors["c1"] > 1.2 * passes.errors["c1"] and errors["fc"] == passes.errors["fc"]  # one widened
    assert np.isnan(measure.log_rate_errors(per_batch)["c1"])  # two batches: no calibration error


def test_wider_errors_take_the_larger_known_one():
    got = between._wider_errors({"a": 0.1, "b": float("nan"), "c": float("nan")}, {"a": 0.05, "b": 0.2})
    assert got["a"] == 0.1 and got["b"] == 0.2 and np.isnan(got["c"])


def test_rates_within_their_standard_errors_count_as_flat():
    """A measured round stops when every rate is within its standard error (or the tolerance,
    where larger) of one common rate: here a and b are 6% apart."""
    rates = {"a": 1.0, "b": 1.06, "c": float("nan")}
    assert not between._flat(rates, 0.01)
    assert not between._flat(rates, 0.01, {"a": 0.04, "b": 0.0})  # the bands miss by 0.8%
    assert between._flat(rates, 0.01, {"a": 0.05, "b": 0.0})
    assert between._flat(rates, 0.01, {"a": 0.03, "b": 0.03})
    assert not between._flat(rates, 0.01, {"a": float("nan"), "b": float("nan")})  # unknown: the tolerance
    assert between._flat(rates, 0.03, {"a": float("nan"), "b": 0.001})
    assert between._flat(rates, 0.01, {"a": 0.0, "b": 0.0}) == between._flat(rates, 0.01)



def test_measured_rounds_stop_once_the_rates_are_within_their_errors(tmp_path):
    """Behind LRN, stage 3 stops measuring once every rate is within its calibration standard
    error of a common one, though not within the 1% tolerance: with the old 1% stop alone this
    net spent all 10 measured passes and ended flatter only by 0.0005."""
    from caffe_utils import magic, netio
    net = _net(tmp_path, _LRN_CHAIN)
    prepared = magic.prepare_net(netio.read_net(str(tmp_path / "net.prototxt")))
    sample = np.random.RandomState(0).standard_normal((32, 3, 10, 10)).astype(np.float32)
    with np.errstate(all="ignore"):  # the degree probes push this tiny LRN far out
        rep = magic.initialize(net, prepared, sample, magic.InitOptions(init="gaussian", batch_size=4,
                                                                        rate_images=32, iterations=10))
    errors = {layer.name: layer.rate_error for layer in rep.layers}
    assert all(np.isfinite(e) and e > 0 for e in errors.values())
    assert rep.converged and rep.passes == 1
    assert rep.flatness_after > 1.01 / 0.99
    after = {layer.name: layer.rate_after for layer in rep.layers}
    assert between._flat(after, 0.01, errors) and not between._flat(after, 0.01)


def test_report_counts_the_images_of_the_calibration_and_of_each_measured_pass(tmp_path):
    """Stage 3's work is in the report: the calibration ran its ``rate_images`` images, and each
    measured pass its first CHECK_IMAGES (32) rounded up to whole batches of 12, 36; the summary
    line says so."""
    from caffe_utils import magic, netio
    from caffe_utils.pipeline import RunResult, format_report
    net = _net(tmp_path, _LRN_CHAIN)
    net.blobs["data"].reshape(12, *net.blobs["data"].data.shape[1:])
    net.reshape()
    prepared = magic.prepare_net(netio.read_net(str(tmp_path / "net.prototxt")))
    sample = np.random.RandomState(0).standard_normal((60, 3, 10, 10)).astype(np.float32)
    with np.errstate(all="ignore"):  # the degree probes push this tiny LRN far out
        rep = magic.initialize(net, prepared, sample, magic.InitOptions(init="gaussian", batch_size=12,
                                                                        rate_images=48, iterations=2))
    assert between.CHECK_IMAGES == 32
    assert (rep.calibration_images, rep.pass_images) == (48, 36) and rep.passes >= 1
    summary = format_report(RunResult(rep, "numpy", 60))
    assert f"{rep.passes} of them measured (36 images each)" in summary
    rep.passes = 0
    assert "images each" not in format_report(RunResult(rep, "numpy", 60))


def test_a_rounds_prediction_carries_the_models_correction(tmp_path):
    """What a round reports as predicted, and judges its gain by, is the corrected model's
    prediction: the rates its solve aimed at."""
    net, plan = _chain(tmp_path)
    energies = _energies(net, plan)
    rho = np.zeros(len(plan.affine) + 1)
    rho[plan.group_of["a"]], rho[plan.group_of["b"]] = 0.4, -0.2
    bare = solve.RateModel(plan, energies)
    correction = np.zeros((len(plan.affine), rho.size))
    correction[plan.affine.index("b"), plan.group_of["a"]] = 0.5
    want = bare.predict(rho).rates()
    assert between._predict(plan, bare, rho)[1] == want
    want["b"] *= np.exp(0.5 * 0.4)
    got = between._predict(plan, solve.RateModel(plan, energies, correction), rho)[1]
    np.testing.assert_allclose([got[n] for n in plan.affine], [want[n] for n in plan.affine], rtol=1e-9)


class _LaterRoundsWorse(between._Passes):
    """Stage 3's passes, but every correcting pass after the first measures a rate 100 times
    too high: each later round lands less flat than the best state and is undone."""

    def correct(self):
        now, errors = super().correct()
        if self.measured > 1:
            name = next(iter(now.grad))
            now.grad[name] = now.grad[name] * 1e4
        return now, errors



def _stage3_rounds(tmp_path, iterations, seed):
    """The CHAIN net after stage 3's rounds with :class:`_LaterRoundsWorse` passes: its report,
    how many passes measured, and its weights."""
    from caffe_utils import magic, netio
    from caffe_utils.magic.context import InitContext
    net = _net(tmp_path, _LRN_CHAIN)
    prepared = magic.prepare_net(netio.read_net(str(tmp_path / "net.prototxt")))
    sample = np.random.RandomState(seed).standard_normal((8, 3, 10, 10)).astype(np.float32)
    opts = magic.InitOptions(batch_size=4, rate_images=8, iterations=iterations)
    ctx = InitContext.create(net, prepared, sample, opts, None)
    passes = _LaterRoundsWorse(ctx, scale_plan.build_plan(net))
    with np.errstate(all="ignore"):  # the degree probes push this tiny LRN far out
        now, _ = passes.calibrate()
        between._rounds(ctx, passes.plan, passes, now)
    return ctx.report, passes.measured, {n: [b.data.copy() for b in bl] for n, bl in net.params.items()}


def test_stage3_stops_after_an_undone_round_at_the_best_state(tmp_path):
    """Behind inexact layers, a round that lands no flatter than the best state ends stage 3
    (instead of running all 10), and the net is left at that best state: here the first
    round's."""
    rep, measured, weights = _stage3_rounds(tmp_path, 10, seed=1)
    assert rep.iterations == 2 == measured and not rep.converged
    assert rep.flatness_rounds[1] > rep.flatness_rounds[0]
    _, _, first = _stage3_rounds(tmp_path, 1, seed=1)
    for name, blobs in weights.items():
        for b, ref in zip(blobs, first[name]):
            np.testing.assert_allclose(b, ref, rtol=1e-5, err_msg=name)


#: conv, ReLU, a strongly saturating LRN, then layers the rate model is exact for
_POLISH_NET = """
name: "polish"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 12 dim: 12 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 6 kernel_size: 3 } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "norm" type: "LRN" bottom: "c1" top: "norm" lrn_param { local_size: 3 alpha: 1 beta: 0.75 } }
layer { name: "c2" type: "Convolution" bottom: "norm" top: "c2" convolution_param { num_output: 8 kernel_size: 3 } }
layer { name: "r2" type: "ReLU" bottom: "c2" top: "c2" }
layer { name: "c3" type: "Convolution" bottom: "c2" top: "c3" convolution_param { num_output: 8 kernel_size: 3 } }
layer { name: "r3" type: "ReLU" bottom: "c3" top: "c3" }
layer { name: "fc" type: "InnerProduct" bottom: "c3" top: "fc" inner_product_param { num_output: 5 } }
"""


def test_the_polish_holds_the_inexact_groups_and_its_prediction_is_exact(tmp_path):
    """Only c1's channels pass the LRN: the polish solves c2 and c3 (fc is pinned) with c1
    held, and a measurement after applying it finds the rates it predicted."""
    from caffe_utils import magic, measure, netio
    from caffe_utils.magic.context import InitContext
    net = _net(tmp_path, _POLISH_NET)
    plan = scale_plan.build_plan(net)
    assert plan.degree_layers == ["norm"] and plan.inexact_groups == {plan.group_of["c1"]}
    prepared = magic.prepare_net(netio.read_net(str(tmp_path / "net.prototxt")))
    sample = np.random.RandomState(2).standard_normal((16, 3, 12, 12)).astype(np.float32)
    ctx = InitContext.create(net, prepared, sample, magic.InitOptions(batch_size=4, rate_images=16), None)
    passes = between._Passes(ctx, plan)
    assert passes.check_images.shape[0] == 16  # the pass measures the calibration's images
    with measure.param_diffs_only(net):
        now, _ = passes.calibrate()
        polish = between._polish(plan, now)
        assert polish.rho[plan.group_of["c1"]] == 0
        assert polish.rho[plan.group_of["c2"]] != 0 and polish.rho[plan.group_of["c3"]] != 0
        assert polish.flatness < measure.flatness(now.rates())
        c1 = net.params["c1"][0].data.copy()
        assert between._Best(plan, now, polish, passes.errors).finish(passes) is polish.energies
        np.testing.assert_array_equal(net.params["c1"][0].data, c1)
        measured = passes.correct()[0].rates()
    predicted = polish.energies.rates()
    np.testing.assert_allclose([measured[n] for n in plan.affine], [predicted[n] for n in plan.affine], rtol=1e-4)
