"""Scale rules of the fork layers (caffe_utils/magic/scale_rules.py) and the initialization of
the depthwise convolution types, on one small inline net of them all (numpy engine)."""
from __future__ import annotations

import numpy as np

from caffe_utils.engine.numpy_net import Net
from caffe_utils.magic import plan as scale_plan

FORK_DAG = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "rois" type: "Input" top: "rois" input_param { shape { dim: 3 dim: 5 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "up" type: "Upsample" bottom: "c1" top: "up" upsample_param { scale: 2 } }
layer { name: "ip" type: "Interp" bottom: "up" top: "ip" interp_param { height: 12 width: 10 } }
layer { name: "c2" type: "Convolution" bottom: "data" top: "c2" convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "up2" type: "Interp" bottom: "c2" top: "up2" interp_param { height: 12 width: 10 } }
layer { name: "cat" type: "Concat" bottom: "ip" bottom: "up2" top: "cat" }
layer { name: "sh" type: "ShuffleChannel" bottom: "cat" top: "sh" shuffle_channel_param { group: 3 } }
layer { name: "pm" type: "Permute" bottom: "sh" top: "pm" permute_param { order: 0 order: 1 order: 3 order: 2 } }
layer { name: "dw" type: "DepthwiseConvolution" bottom: "pm" top: "dw"
        convolution_param { num_output: 12 group: 12 kernel_size: 3 pad: 1 } }
layer { name: "cdw" type: "ConvolutionDepthwise" bottom: "dw" top: "cdw" convolution_param { num_output: 12 kernel_size: 3 } }
layer { name: "roi" type: "ROIPooling" bottom: "cdw" bottom: "rois" top: "roi"
        roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 0.5 } }
layer { name: "c3" type: "Convolution" bottom: "roi" top: "c3" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "nm" type: "Normalize" bottom: "c3" top: "nm" norm_param { across_spatial: false channel_shared: false } }
layer { name: "c4" type: "Convolution" bottom: "nm" top: "c4" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "pb" type: "PriorBox" bottom: "c4" bottom: "data" top: "pb" prior_box_param { min_size: 4 } }
layer { name: "r6" type: "ReLU6" bottom: "c4" top: "r6" }
layer { name: "c5" type: "Convolution" bottom: "r6" top: "c5" convolution_param { num_output: 2 kernel_size: 1 } }
"""


def _fork_net(tmp_path, text=FORK_DAG):
    p = tmp_path / "net.prototxt"
    p.write_text(text)
    net = Net(p, "TEST")
    rng = np.random.RandomState(0)
    for blobs in net.params.values():
        for b in blobs:
            b.data[...] = rng.standard_normal(b.shape)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    net.blobs["rois"].data[...] = [[0, 0, 0, 9, 11], [1, 2, 3, 7, 5], [1, 4, 0, 11, 9]]
    return net


def test_fork_scale_rules_preserve_the_function(tmp_path):
    net = _fork_net(tmp_path)
    net.forward()
    before = {b: net.blobs[b].data.copy() for b in ("nm", "c5", "pb")}
    plan = scale_plan.build_plan(net)
    assert plan.unknown == [] and plan.inexact == ["r6"]
    assert "dw" in plan.affine and "cdw" in plan.affine
    assert not {plan.group_of[n] for n in ("c1", "c2", "dw", "cdw", "c3", "c4")} & plan.pinned
    rng = np.random.RandomState(1)
    scale = {g: float(rng.uniform(0.3, 3.0)) for g in plan.groups if g not in plan.pinned}
    scale[plan.group_of["c4"]] = 1.0  # ReLU6 is inexact: leave what feeds it alone here
    scale_plan.apply_scales(net, plan, scale)
    net.forward()
    for b, a in before.items():
        np.testing.assert_allclose(net.blobs[b].data, a, rtol=1e-4, atol=1e-5 * np.abs(a).max(), err_msg=b)
    assert not np.allclose(net.params["c1"][0].data, _fork_net(tmp_path).params["c1"][0].data)


def test_normalize_pins_channels_of_different_scales(tmp_path):
    text = FORK_DAG.replace('bottom: "c3" top: "nm"', 'bottom: "cat" top: "nm"')
    plan = scale_plan.build_plan(_fork_net(tmp_path, text))
    assert plan.group_of["c1"] in plan.pinned and plan.group_of["c2"] in plan.pinned


def test_permute_moving_the_batch_axis_pins(tmp_path):
    text = FORK_DAG.replace("order: 0 order: 1 order: 3 order: 2", "order: 1 order: 0").replace(
        'bottom: "pm" top: "dw"', 'bottom: "sh" top: "dw"').replace('top: "pm" permute_param', 'top: "pm2" permute_param')
    text += ('layer { name: "c6" type: "Convolution" bottom: "pm2" top: "c6" convolution_param { num_output: 2 kernel_size: 1 } }\n'
             'layer { name: "loss" type: "EuclideanLoss" bottom: "c6" bottom: "c6" top: "loss" }')
    plan = scale_plan.build_plan(_fork_net(tmp_path, text))
    assert plan.group_of["c1"] in plan.pinned and plan.group_of["c2"] in plan.pinned
    assert plan.unknown == []


def test_initialization_treats_depthwise_names_as_convolution(tmp_path, photos):
    """The depthwise types are affine: stage 1 fills them from data as it does a grouped Convolution."""
    from caffe_utils.magic import InitOptions
    from caffe_utils.pipeline import RunConfig, SampleSpec, run
    p = tmp_path / "dw.prototxt"
    p.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 24 dim: 24 } } }\n'
                 'layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 8 kernel_size: 3 stride: 2 } }\n'
                 'layer { name: "r1" type: "ReLU6" bottom: "c1" top: "c1" }\n'
                 'layer { name: "dw" type: "DepthwiseConvolution" bottom: "c1" top: "dw" convolution_param { num_output: 8 group: 8 kernel_size: 3 } }\n'
                 'layer { name: "cdw" type: "ConvolutionDepthwise" bottom: "dw" top: "cdw" convolution_param { num_output: 8 kernel_size: 3 } }\n'
                 'layer { name: "fc" type: "InnerProduct" bottom: "cdw" top: "fc" inner_product_param { num_output: 3 } }\n')
    res = run(RunConfig(prototxt=str(p), output=str(tmp_path / "o.caffemodel"), sample=SampleSpec(data=photos, images=8),
                        options=InitOptions(init="kmeans", batch_size=4, iterations=2), engine="numpy"))
    inits = {l.name: l.init for l in res.report.layers}
    assert inits["dw"] == inits["cdw"] == "kmeans"
