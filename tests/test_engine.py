"""The numpy engine's Net and the engine interface (pycaffe vocabulary, selection, errors)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from caffe_utils import engine as eng
from caffe_utils.engine.numpy_net import Net
from caffe_utils.engine.protocol import EngineNet
from caffe_utils.errors import EngineError, PrototxtError, UnsupportedLayerError
from reference import check_against_caffe

BRANCHY = """
name: "branchy"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 7 dim: 7 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE kernel_size: 2 stride: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip_a" type: "InnerProduct" bottom: "conv" top: "a" inner_product_param { num_output: 3 } }
layer { name: "ip_b" type: "InnerProduct" bottom: "pool" top: "b" inner_product_param { num_output: 3 } }
layer { name: "ip_c" type: "InnerProduct" bottom: "conv" top: "c" inner_product_param { num_output: 3 } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "out" }
"""


def _write(tmp_path, text, name="net.prototxt"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_pycaffe_vocabulary(tmp_path):
    net = Net(_write(tmp_path, LEGAL))
    assert list(net.blobs) == ["data", "conv", "pool", "a", "b", "c", "out"]
    assert list(net.params) == ["conv", "ip_a", "ip_b", "ip_c"]
    assert [l.type for l in net.layers][:4] == ["Input", "Convolution", "ReLU", "Pooling"]
    assert net.inputs == ["data"] and net.outputs == ["out"]
    assert net.blobs["out"].data.shape == (2, 3)
    assert net.params["conv"][0].data.shape == (4, 3, 3, 3)


LEGAL = BRANCHY.replace('layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE kernel_size: 2 stride: 1 } }\n', '').replace(
    'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n',
    'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n'
    'layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE kernel_size: 2 stride: 1 } }\n')


def test_gradient_sums_over_consumers_match_caffe(tmp_path):
    """'conv' (after an in-place ReLU) is read by pool, ip_a and ip_c: its diff is their sum."""
    assert LEGAL != BRANCHY
    check_against_caffe(tmp_path, LEGAL)


def test_in_place_after_an_earlier_reader(tmp_path):
    """Caffe refuses this net; the numpy engine runs it as if the ReLU wrote a new blob."""
    rng = np.random.RandomState(3)
    explicit = BRANCHY.replace('top: "conv" }\nlayer { name: "ip_a" type: "InnerProduct" bottom: "conv"',
                               'top: "conv_r" }\nlayer { name: "ip_a" type: "InnerProduct" bottom: "conv_r"')
    explicit = explicit.replace('name: "relu" type: "ReLU" bottom: "conv" top: "conv"',
                                'name: "relu" type: "ReLU" bottom: "conv" top: "conv_r"')
    explicit = explicit.replace('name: "ip_c" type: "InnerProduct" bottom: "conv"',
                                'name: "ip_c" type: "InnerProduct" bottom: "conv_r"')
    assert explicit.count("conv_r") == 3
    nets = [Net(_write(tmp_path, t, f"{i}.prototxt")) for i, t in enumerate((BRANCHY, explicit))]
    x = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)
    d = rng.standard_normal((2, 3)).astype(np.float32)
    for name, blobs in nets[0].params.items():
        for a, b in zip(blobs, nets[1].params[name]):
            a.data[...] = b.data[...] = rng.standard_normal(a.shape)
    for net in nets:
        net.blobs["data"].data[...] = x
        net.forward()
        net.blobs["out"].diff[...] = d
        net.backward()
    np.testing.assert_allclose(nets[0].blobs["out"].data, nets[1].blobs["out"].data, rtol=1e-6)
    np.testing.assert_allclose(nets[0].blobs["data"].diff, nets[1].blobs["data"].diff, rtol=1e-5, atol=1e-6)
    for name in nets[0].params:
        np.testing.assert_allclose(nets[0].params[name][0].diff, nets[1].params[name][0].diff, rtol=1e-5, atol=1e-6)


IN_PLACE_CHAIN = """
name: "in_place_chain"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 2 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 5 kernel_size: 3 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { use_global_stats: true } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "leaky" type: "ReLU" bottom: "pool" top: "pool" relu_param { negative_slope: 0.1 } }
layer { name: "drop" type: "Dropout" bottom: "pool" top: "pool" }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "out" inner_product_param { num_output: 4 } }
"""


#: the same net with every layer writing a blob of its own
OUT_OF_PLACE_CHAIN = IN_PLACE_CHAIN
for _old, _new in [('"bn" type: "BatchNorm" bottom: "conv" top: "conv"', '"bn" type: "BatchNorm" bottom: "conv" top: "bn"'),
                   ('bottom: "conv" top: "conv" scale_param', 'bottom: "bn" top: "scale" scale_param'),
                   ('bottom: "conv" top: "conv" }', 'bottom: "scale" top: "relu" }'),
                   ('bottom: "conv" top: "pool"', 'bottom: "relu" top: "pool"'),
                   ('bottom: "pool" top: "pool" relu_param', 'bottom: "pool" top: "leaky" relu_param'),
                   ('bottom: "pool" top: "pool" }', 'bottom: "leaky" top: "drop" }'),
                   ('bottom: "pool" top: "out"', 'bottom: "drop" top: "out"')]:
    assert _old in OUT_OF_PLACE_CHAIN
    OUT_OF_PLACE_CHAIN = OUT_OF_PLACE_CHAIN.replace(_old, _new)


@pytest.mark.parametrize("phase", [0, 1])  # TRAIN: Dropout masks (seeded alike in both nets), TEST
def test_in_place_backward_equals_out_of_place(tmp_path, phase):
    """ReLU, Dropout, BatchNorm (stored statistics) and Scale turn the diff of the blob they
    work in place on into their bottom diff where it lies (:meth:`Layer.backward_in_place`):
    every diff equals that of the same net with each layer writing a blob of its own."""
    nets = [Net(_write(tmp_path, t, f"{i}.prototxt"), phase=phase)
            for i, t in enumerate((IN_PLACE_CHAIN, OUT_OF_PLACE_CHAIN))]
    rng = np.random.RandomState(7)
    for name, blobs in nets[0].params.items():
        for a, b in zip(blobs, nets[1].params[name]):
            a.data[...] = b.data[...] = rng.uniform(0.5, 1.5, a.shape) if name == "bn" else rng.standard_normal(a.shape)
    x = rng.standard_normal((3, 2, 6, 6)).astype(np.float32)
    d = rng.standard_normal((3, 4)).astype(np.float32)
    for net in nets:
        net.blobs["data"].data[...] = x
        net.forward()
        net.blobs["out"].diff[...] = d
        net.clear_param_diffs()
        net.backward()
    assert np.array_equal(nets[0].blobs["out"].data, nets[1].blobs["out"].data)
    assert np.array_equal(nets[0].blobs["data"].diff, nets[1].blobs["data"].diff)
    for name, blobs in nets[0].params.items():
        for a, b in zip(blobs, nets[1].params[name]):
            assert np.array_equal(a.diff, b.diff), name
    assert np.abs(nets[0].params["scale"][0].diff).sum() > 0


def test_in_place_backward_replaces_the_general_path(tmp_path, monkeypatch):
    """The net runs an in-place layer's :meth:`backward_in_place`, not its ``backward`` with a
    copied top diff and a zeroed bottom diff."""
    net = Net(_write(tmp_path, IN_PLACE_CHAIN))
    called = []
    for layer in net.layers:
        if layer.type in ("ReLU", "Scale", "BatchNorm", "Dropout"):
            monkeypatch.setattr(layer, "backward", lambda *a, t=layer.type: called.append(t))
    net.forward()
    net.blobs["out"].diff[...] = 1
    net.backward()
    assert called == ["Scale"]  # Scale's in-place backward takes its parameter diffs from backward


def test_layer_times_add_every_layers_seconds(tmp_path):
    """With ``layer_times`` a dict, forward and backward add each layer's seconds under (name,
    kind), in-place backwards included; with None (the default) nothing is kept."""
    net = Net(_write(tmp_path, IN_PLACE_CHAIN))
    assert net.layer_times is None
    net.layer_times = {}
    net.forward()
    net.blobs[net.outputs[0]].diff[...] = 1.0
    net.backward()
    once = dict(net.layer_times)
    assert set(once) == {(n, k) for n in net.layer_names for k in ("forward", "backward")}
    assert all(v >= 0 for v in once.values())
    net.forward()
    assert all(net.layer_times[(n, "forward")] >= once[(n, "forward")] for n in net.layer_names)
    net.layer_times = None
    net.forward()
    assert net.layer_times is None


def test_forward_and_backward_ranges(tmp_path):
    net = Net(_write(tmp_path, BRANCHY))
    rng = np.random.RandomState(0)
    for blobs in net.params.values():
        for b in blobs:
            b.data[...] = rng.standard_normal(b.shape)
    net.blobs["data"].data[...] = rng.standard_normal((2, 3, 7, 7))
    out = net.forward(end="pool")
    assert set(out) == {"pool"}
    full = net.forward()["out"].copy()
    net.blobs["out"].diff[...] = 1
    net.clear_param_diffs()
    net.backward()
    g1 = net.params["conv"][0].diff.copy()
    net.backward()  # parameter diffs accumulate, as in Caffe
    np.testing.assert_allclose(net.params["conv"][0].diff, 2 * g1, rtol=1e-6)
    # a backward range: from ip_c down to ip_a only touches those layers' params
    net.clear_param_diffs()
    net.blobs["c"].diff[...] = 1
    net.blobs["a"].diff[...] = 1
    net.backward(start="ip_c", end="ip_a")
    assert np.any(net.params["ip_a"][0].diff) and not np.any(net.params["conv"][0].diff)
    # clearing zeroes what the backward wrote and writes no diff that is zero already
    net.params["conv"][0].diff.flags.writeable = False
    net.params["ip_a"][0].diff[0, 0] = np.nan
    net.clear_param_diffs()
    assert not any(b.diff.any() for blobs in net.params.values() for b in blobs)
    net.params["conv"][0].diff.flags.writeable = True
    assert np.array_equal(net.forward()["out"], full)


def test_bottom_used_before_produced(tmp_path):
    text = BRANCHY.replace('bottom: "pool" top: "b"', 'bottom: "later" top: "b"')
    with pytest.raises(PrototxtError, match="'ip_b' uses bottom 'later' before any layer produces it"):
        Net(_write(tmp_path, text))


def test_unsupported_layer_names_layer_and_types(tmp_path):
    text = BRANCHY + 'layer { name: "odd" type: "SPP" bottom: "out" top: "odd" }'
    with pytest.raises(UnsupportedLayerError) as err:
        Net(_write(tmp_path, text))
    msg = str(err.value)
    assert "'odd'" in msg and "'SPP'" in msg and "Convolution" in msg and "--engine caffe" in msg


def test_engine_selection_errors(tmp_path, monkeypatch):
    assert eng.resolve_engine("numpy") == "numpy"
    with pytest.raises(EngineError, match="CPU only"):
        eng.resolve_engine("numpy", gpu=0)
    with pytest.raises(EngineError, match="unknown engine"):
        eng.resolve_engine("tpu")


def test_caffe_engine_gpu_on_cpu_only_build(tmp_path, caffe):
    with pytest.raises(EngineError, match="CPU-only"):
        eng.open_net(_write(tmp_path, LEGAL), engine="caffe", gpu=0)


def test_both_engines_share_the_interface(tmp_path, caffe):
    p = _write(tmp_path, LEGAL)
    nets = [eng.open_net(p, engine=e) for e in ("numpy", "caffe")]
    for net in nets:
        assert net.layer_names == ["data", "conv", "relu", "pool", "ip_a", "ip_b", "ip_c", "sum"]
        assert list(net.params) == ["conv", "ip_a", "ip_b", "ip_c"]
        assert net.param_shapes()["ip_b"] == [(3, 64), (3,)]
        for m in ("forward", "backward", "reshape", "clear_param_diffs", "set_data", "save", "copy_from"):
            assert callable(getattr(net, m))
    rng = np.random.RandomState(1)
    for name, blobs in nets[0].params.items():
        for a, b in zip(blobs, nets[1].params[name]):
            a.data[...] = rng.standard_normal(a.data.shape)
            b.data[...] = a.data
    f = tmp_path / "w.caffemodel"
    nets[0].save(f)
    nets[1].copy_from(f)
    for name, blobs in nets[0].params.items():
        for a, b in zip(blobs, nets[1].params[name]):
            assert np.array_equal(a.data, b.data)


def _protocol_call_problems(impl, proto) -> list:
    """Ways in which a call that the Protocol method ``proto`` allows would fail on ``impl``."""
    want = [p for p in inspect.signature(proto).parameters.values() if p.name != "self"]
    have = inspect.signature(impl).parameters
    positional = [p.name for p in have.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    problems = []
    for k, p in enumerate(want):
        q = have.get(p.name)
        if q is None or q.kind != p.kind or positional[k:k + 1] != [p.name]:
            problems.append(f"parameter {p.name!r}: {q} where the Protocol has {p}")
        elif p.default is not p.empty and q.default != p.default:
            problems.append(f"parameter {p.name!r} defaults to {q.default!r}, the Protocol's to {p.default!r}")
    for q in have.values():
        if q.name not in {p.name for p in want} and q.default is q.empty \
                and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD):
            problems.append(f"extra required parameter {q.name!r}")
    return problems


@pytest.mark.parametrize("engine", ["numpy", "caffe"])
def test_engines_satisfy_the_protocol(tmp_path, request, engine):
    """Both engines are EngineNets: every member there, methods callable as the Protocol says."""
    if engine == "caffe":
        request.getfixturevalue("caffe")
    net = eng.open_net(_write(tmp_path, LEGAL), engine=engine)
    assert isinstance(net, EngineNet)
    assert not isinstance(object(), EngineNet)
    assert isinstance(net.phase, int) and isinstance(net.input_diffs, bool)
    assert set(EngineNet.__annotations__) == {"phase", "net_param", "input_diffs"}
    members = {n: m for n, m in vars(EngineNet).items() if not n.startswith("_")}
    assert {"forward", "backward", "reshape", "clear_param_diffs", "set_data", "copy_from", "save",
            "blobs", "params", "inputs", "outputs", "layer_names", "layer_types"} <= set(members)
    for name, member in members.items():
        if isinstance(member, property):
            assert not callable(getattr(net, name)), name
        else:
            assert _protocol_call_problems(getattr(net, name), member) == [], name


def test_set_data_sets_the_blob(tmp_path):
    net = Net(_write(tmp_path, LEGAL))
    x = np.full(net.blobs["data"].shape, 2.5, np.float32)
    net.set_data("data", x)
    assert np.array_equal(net.blobs["data"].data, x)


_FILLED = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 }
                            bias_filler { type: "constant" value: 0.2 } } }
layer { name: "prelu" type: "PReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
"""


def test_fill_weights_off_leaves_only_the_affine_weights_zero(tmp_path):
    """For the initialization, which fills them all: the biases and the other layers' params
    still get their fillers (PReLU's 0.25)."""
    filled = Net(_write(tmp_path, _FILLED))
    bare = eng.open_net(_write(tmp_path, _FILLED, "b.prototxt"), engine="numpy", fill_weights=False)
    assert filled.params["conv"][0].data.any() and filled.params["ip"][0].data.any()
    assert not bare.params["conv"][0].data.any() and not bare.params["ip"][0].data.any()
    np.testing.assert_array_equal(bare.params["conv"][1].data, np.float32(0.2))
    np.testing.assert_array_equal(bare.params["prelu"][0].data, 0.25)


def test_input_reshape(tmp_path):
    net = Net(_write(tmp_path, BRANCHY))
    net.blobs["data"].reshape((5, 3, 7, 7))
    net.reshape()
    assert net.blobs["out"].data.shape == (5, 3)
    net2 = Net(_write(tmp_path, BRANCHY, "b.prototxt"), input_shapes={"data": (4, 3, 9, 9)})
    assert net2.blobs["conv"].data.shape == (4, 4, 7, 7)


def test_data_layer_tops_are_fed(tmp_path):
    text = """
    layer { name: "d" type: "Data" top: "data" top: "label" data_param { source: "x" batch_size: 4 }
            transform_param { crop_size: 9 } include { phase: TRAIN } }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 3 } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "conv" bottom: "label" top: "loss" }
    """
    p = _write(tmp_path, text)
    with pytest.raises(PrototxtError, match="only known after reading"):
        Net(p, "TRAIN")
    net = Net(p, "TRAIN", input_shapes={"data": (4, 3, 9, 9), "label": (4, 7, 7)})
    assert net.blobs["conv"].data.shape == (4, 2, 7, 7)
    assert net.inputs == ["data", "label"] and net.outputs == ["loss"]


def test_both_engines_list_the_outputs_in_the_nets_order(tmp_path, caffe):
    """pycaffe sorts a net's outputs by name; the engines list them in the net's order, so the
    random top gradients that a seed draws per output (stage 3) are the same on both (SSD's
    mbox_loc and mbox_conf_flatten got each other's on pycaffe)."""
    p = _write(tmp_path, """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "z" type: "InnerProduct" bottom: "data" top: "z" inner_product_param { num_output: 2 } }
layer { name: "m" type: "InnerProduct" bottom: "data" top: "m" inner_product_param { num_output: 3 } }
layer { name: "relu" type: "ReLU" bottom: "z" top: "z" }
layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" inner_product_param { num_output: 4 } }
""")
    assert list(caffe.Net(str(p), caffe.TEST).outputs) == ["a", "m", "z"]
    assert eng.open_net(str(p), engine="numpy").outputs == ["m", "z", "a"]
    assert eng.open_net(str(p), engine="caffe").outputs == ["m", "z", "a"]
