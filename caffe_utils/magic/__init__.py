"""The data-dependent initialization of Krähenbühl et al. (ICLR 2016), on any engine net.

For the affine layers (Convolution, InnerProduct, Deconvolution) in topological order, one
module per stage of the paper:

0. :mod:`~caffe_utils.magic.prepare`: the net to run, one image input (and Faster R-CNN's
   ``im_info``) and no loss layers;
1. :mod:`~caffe_utils.magic.weights`: Gaussian, Caffe's fillers, orthogonal, or data-driven
   weights from the layer's real input patches (PCA, ZCA, spherical k-means, random patches);
2. :mod:`~caffe_utils.magic.within`: every output channel gets mean beta and unit variance on the
   sample (Algorithm 1); BatchNorm layers get the sample's statistics;
3. :mod:`~caffe_utils.magic.between`: the change rates of all layers are equalized under a random
   top gradient by rescaling layers and undoing the scale downstream (Algorithm 2), with the
   bookkeeping in :mod:`~caffe_utils.magic.plan`, :mod:`~caffe_utils.magic.scale_rules` (one rule
   per layer type) and :mod:`~caffe_utils.magic.solve` (the rates as a function of the scales);
4. :mod:`~caffe_utils.magic.report`: what was done, per layer.

Layers that already have weights keep them unless asked to re-initialize; with nothing to
initialize only stage 3 runs (rescaling a pretrained model). The engine net must have been built
from :func:`prepare_net`'s NetParameter with the input's batch dimension equal to
``batch_size``.
"""
from __future__ import annotations

from typing import AbstractSet, List, Optional

import numpy as np

from caffe_utils.errors import DataError
from caffe_utils.layout import AFFINE_TYPES
from caffe_utils.magic import between, weights, within
from caffe_utils.magic.context import InitContext, Progress, affine_param_diffs_only, forward_only
from caffe_utils.magic.options import DATA_DRIVEN, INIT_TYPES, InitOptions
from caffe_utils.magic.prepare import PreparedNet, prepare_net
from caffe_utils.magic.report import Fallback, InitReport, LayerReport

__all__ = ["initialize", "prepare_net", "PreparedNet", "InitOptions", "InitReport", "LayerReport", "Fallback",
           "INIT_TYPES", "DATA_DRIVEN"]


def initialize(net, prepared: PreparedNet, sample: np.ndarray, options: InitOptions,
               loaded: AbstractSet[str] = frozenset(), progress: Optional[Progress] = None) -> InitReport:
    """Initialize ``net`` in place from the images ``sample`` (N, C, H, W); ``loaded`` names the
    layers whose weights came from a caffemodel. Returns the report."""
    ctx = InitContext.create(net, prepared, sample, options, progress)
    todo = _layers_to_initialize(ctx, loaded)
    with affine_param_diffs_only(net):
        with forward_only(net):
            for step, lp in enumerate(todo):
                ctx.tick("within-layer", step, len(todo))
                idx = ctx.index(lp)
                if lp.type == "BatchNorm":
                    within.batchnorm_statistics(ctx, lp, idx)
                    continue
                weights.initialize_weights(ctx, lp, idx)      # stage 1
                if options.within:
                    within.normalize(ctx, lp, idx)            # stage 2
                else:
                    within.pass_through(ctx, idx)
        if todo:
            ctx.tick("within-layer", len(todo), len(todo))
        ctx.batches = None  # the sample's checkpoint is not needed any more
        between.equalize(ctx)                             # stage 3
    if options.zero_classifier:
        _zero_classifier(ctx)
    ctx.report.layers = list(ctx.layers.values())
    _check_finite(net)
    return ctx.report


def _layers_to_initialize(ctx: InitContext, loaded: AbstractSet[str]) -> List:
    """The affine and BatchNorm layers to fill, in net order: those without loaded (non-zero)
    weights, and those the options ask to re-initialize."""
    opts = ctx.opts
    todo = []
    for lp in ctx.net.net_param.layer:
        if lp.type not in AFFINE_TYPES and lp.type != "BatchNorm":
            continue
        blobs = ctx.net.params[lp.name]
        if (opts.reinit_all or lp.name in opts.reinit or lp.name not in loaded
                or not any(b.data.any() for b in blobs)):  # ndarray.any: no temporary of the blob's size
            todo.append(lp)
    return todo


def _zero_classifier(ctx: InitContext) -> None:
    """The last affine layer starts at zero (the paper's §4.5 for training from scratch)."""
    last = next(reversed(ctx.layers))
    for b in ctx.net.params[last]:
        b.data[...] = 0
    ctx.layers[last].zeroed = True


def _check_finite(net) -> None:
    for name in net.params:
        for b in net.params[name]:
            if b.data.size and not (np.isfinite(b.data.min()) and np.isfinite(b.data.max())):  # NaN propagates
                raise DataError(f"layer '{name}' got non-finite weights; the sample may be degenerate "
                                "(constant images?): use more varied images")
