"""LRN's alpha rescaled along with its input (``magic_init.py --output-prototxt``): at input
``r x`` and alpha ``alpha / r^2`` an LRN gives ``r`` times its output, so stage 3 undoes a
rescaling through it exactly, in one solve."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from caffe_utils import magic, measure, netio
from caffe_utils.engine.numpy_net import Net
from caffe_utils.magic import plan as scale_plan
from magic_init import cli

NET = """
name: "lrnnet"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 4 dim: 3 dim: 16 dim: 16 }} }} }}
layer {{ name: "c1" type: "Convolution" bottom: "data" top: "c1"
  convolution_param {{ num_output: 8 kernel_size: 3 weight_filler {{ type: "gaussian" std: 0.3 }}
                      bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "r1" type: "ReLU" bottom: "c1" top: "c1" }}
layer {{ name: "p1" type: "Pooling" bottom: "c1" top: "p1" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "norm" type: "LRN" bottom: "p1" top: "norm"
  lrn_param {{ local_size: 3 alpha: 0.5 beta: 0.75 k: 1 norm_region: {region} }} }}
layer {{ name: "c2" type: "Convolution" bottom: "norm" top: "c2"
  convolution_param {{ num_output: 6 kernel_size: 3 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "r2" type: "ReLU" bottom: "c2" top: "c2" }}
layer {{ name: "fc" type: "InnerProduct" bottom: "c2" top: "fc"
  inner_product_param {{ num_output: 5 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
"""

#: LRN over the channels of two producers (one alpha cannot undo two scales), and behind TanH
MIXED = """
name: "mixed"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "a" type: "Convolution" bottom: "data" top: "a" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "b" type: "Convolution" bottom: "data" top: "b" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }
layer { name: "n1" type: "LRN" bottom: "cat" top: "n1" }
layer { name: "t" type: "TanH" bottom: "a" top: "t" }
layer { name: "n2" type: "LRN" bottom: "t" top: "n2" }
layer { name: "c" type: "Convolution" bottom: "n1" top: "c" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "d" type: "Convolution" bottom: "n2" top: "d" convolution_param { num_output: 4 kernel_size: 1 } }
"""

REGIONS = ["ACROSS_CHANNELS", "WITHIN_CHANNEL"]


def _write(tmp_path, text, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _input(net, seed=0):
    shape = net.blobs["data"].data.shape
    return (3 * np.random.RandomState(seed).standard_normal(shape)).astype(np.float32)


def _outputs(net, x):
    net.set_data("data", x)
    net.forward()
    return np.array(net.blobs["fc"].data, np.float64)


def _relative(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_lrn_takes_its_input_scale_in_alpha(tmp_path):
    net = Net(_write(tmp_path, NET.format(region="ACROSS_CHANNELS")))
    plan = scale_plan.build_plan(net)
    assert plan.inexact == ["norm"] and plan.lrn_groups == []
    plan = scale_plan.build_plan(net, lrn_alpha=True)
    assert plan.inexact == [] and plan.degree_layers == []
    assert plan.lrn_groups == [("norm", plan.group_of["c1"])]


def test_lrn_under_two_scales_or_behind_an_inexact_layer_stays_inexact(tmp_path):
    plan = scale_plan.build_plan(Net(_write(tmp_path, MIXED)), lrn_alpha=True)
    assert plan.inexact == ["n1", "t", "n2"] and plan.lrn_groups == []


@pytest.mark.parametrize("region", REGIONS)
def test_rescaling_through_lrn_with_its_alpha_preserves_the_function(tmp_path, region):
    """Every free group scaled at random: the output stays to float32 rounding with the alpha
    rescaled, and moves without it."""
    path = _write(tmp_path, NET.format(region=region))
    for lrn_alpha in (True, False):
        net = Net(path, seed=1)
        x = _input(net)
        ref = _outputs(net, x)
        plan = scale_plan.build_plan(net, lrn_alpha)
        free = [g for g in plan.groups if g not in plan.pinned]  # fc's output is the net's
        scale = {g: float(r) for g, r in zip(free, np.exp(np.random.RandomState(2).uniform(-2, 2, len(free))))}
        scale_plan.apply_scales(net, plan, scale)
        dev = _relative(_outputs(net, x), ref)
        if lrn_alpha:
            assert dev < 1e-5
            r = scale[plan.group_of["c1"]]
            assert net.net_param.layer[4].lrn_param.alpha == pytest.approx(0.5 / r ** 2, rel=1e-6)
        else:
            assert dev > 1e-2


@pytest.mark.pycaffe
@pytest.mark.parametrize("region", REGIONS)
def test_caffe_engine_runs_the_new_alpha_with_the_params_it_had(caffe, tmp_path, region):
    """pycaffe builds the net again for a new alpha: params, input data and the input's batch
    size are kept, and the outputs are the numpy engine's for the same alpha."""
    from caffe_utils.engine.caffe_net import CaffeNet
    path = _write(tmp_path, NET.format(region=region))
    net, ours = CaffeNet(path, seed=1), Net(path, seed=1)
    for name, blobs in net.params.items():
        for a, b in zip(blobs, ours.params[name]):
            b.data[...] = a.data
    net.blobs["data"].reshape(3, 3, 16, 16)
    net.reshape()
    ours.blobs["data"].reshape(3, 3, 16, 16)
    ours.reshape()
    x = _input(net)
    before = {n: [np.array(b.data) for b in bl] for n, bl in net.params.items()}
    net.set_data("data", x)
    net.set_lrn_alphas({"norm": 0.02})
    ours.set_lrn_alphas({"norm": 0.02})
    assert net.net_param.layer[4].lrn_param.alpha == pytest.approx(0.02)
    assert net.blobs["data"].data.shape[0] == 3
    np.testing.assert_array_equal(net.blobs["data"].data, x)
    for name, blobs in net.params.items():
        for b, ref in zip(blobs, before[name]):
            np.testing.assert_array_equal(b.data, ref)
    net.forward()
    np.testing.assert_allclose(net.blobs["fc"].data, _outputs(ours, x), rtol=1e-4, atol=1e-6)


def _initialize(path, lrn_alpha):
    net = Net(path, seed=1)
    prepared = magic.prepare_net(netio.read_net(str(path)))
    sample = (3 * np.random.RandomState(5).standard_normal((16, 3, 16, 16))).astype(np.float32)
    opts = magic.InitOptions(init="gaussian", batch_size=4, rate_images=16, lrn_alpha=lrn_alpha)
    return net, sample, magic.initialize(net, prepared, sample, opts)


def test_stage3_through_lrn_with_its_alpha_is_one_exact_solve(tmp_path):
    """No measured pass, the rates the solve predicted are the written net's, measured again
    over the same images with the same top gradients, and the function is preserved."""
    path = _write(tmp_path, NET.format(region="ACROSS_CHANNELS"))
    net, sample, rep = _initialize(path, lrn_alpha=True)
    assert rep.passes == 0 and rep.iterations == 1 and not rep.inexact_layers
    assert set(rep.lrn_alphas) == {"norm"} and rep.lrn_alphas["norm"] != 0.5
    assert rep.function_preserved and rep.output_deviation < 1e-5
    measured = measure.rates_of(measure.measure(net, "data", sample, seed=2))
    for layer in rep.layers:
        assert measured[layer.name] == pytest.approx(layer.rate_after, rel=1e-3), layer.name
    assert rep.flatness_after < 1.0001
    _, _, without = _initialize(path, lrn_alpha=False)
    assert without.passes > 0 and without.lrn_alphas == {} and without.inexact_layers == ["norm"]


def test_cli_writes_the_net_the_rescaled_weights_compute_with(small, photos, tmp_path):
    """Rescaling given weights (nothing to initialize: stage 3 alone) with --output-prototxt:
    the written weights in the written net compute what the given weights did in the given
    net, and in the given net they do not."""
    path = _write(tmp_path, NET.format(region="ACROSS_CHANNELS").replace("dim: 16 dim: 16", "dim: 32 dim: 32"))
    given, out, proto = tmp_path / "given.caffemodel", tmp_path / "out.caffemodel", tmp_path / "out.prototxt"
    common = ["-d", photos, "-n", "8", "--engine", "numpy", "-q", "--batch-size", "4"]
    res = CliRunner().invoke(cli, [str(path), "-o", str(given), "--no-between"] + common)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, [str(path), "-w", str(given), "-o", str(out), "--output-prototxt", str(proto)]
                             + common)
    assert res.exit_code == 0, res.output
    assert "and " + str(proto) in res.output
    written = netio.read_net(str(proto))
    assert [lp.name for lp in written.layer] == [lp.name for lp in netio.read_net(str(path)).layer]
    assert written.layer[4].lrn_param.alpha != 0.5
    x = _input(Net(path))
    ref = _outputs(Net(path, weights=given), x)
    assert _relative(_outputs(Net(proto, weights=out), x), ref) < 1e-5
    assert _relative(_outputs(Net(path, weights=out), x), ref) > 1e-2


def test_cli_refuses_an_output_prototxt_that_is_the_input(small, photos, tmp_path):
    res = CliRunner().invoke(cli, [str(small), "-o", str(tmp_path / "o.caffemodel"), "--output-prototxt",
                                   str(small), "-d", photos, "-n", "4"])
    assert res.exit_code != 0
    assert "--output-prototxt" in res.output and "network definition" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
