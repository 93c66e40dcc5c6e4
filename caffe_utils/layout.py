"""How an affine layer stores its weights: output rows, input columns and their scaling.

Caffe keeps a Convolution's weights as (num_output, C/group, kh, kw), a Deconvolution's as
(C, num_output/group, kh, kw) and an InnerProduct's as (num_output, K), or (K, num_output) with
``transpose``. The initialization thinks in two views of any of them:

* **rows**: one per output channel, the filter that produces it (stage 1 writes rows, stages 2
  and 3 scale them);
* **input columns**: the weights that read one input channel (convolutions) or input value
  (InnerProduct); stage 3 undoes a producer's scale there, and the measurement reads the change
  rate's variation across them.

Every stage, the measurement and the layers use these helpers rather than their own reshapes.
"""
from __future__ import annotations

import numpy as np

#: the mobile forks' names of a depthwise convolution, which takes ``convolution_param`` and is
#: a Convolution to the initialization (see :func:`conv_group`)
DEPTHWISE_TYPES = ("DepthwiseConvolution", "ConvolutionDepthwise")
CONVOLUTION_TYPES = ("Convolution",) + DEPTHWISE_TYPES
AFFINE_TYPES = ("Convolution", "InnerProduct", "Deconvolution") + DEPTHWISE_TYPES


def conv_group(lp) -> int:
    """The group count of a convolution: ``convolution_param.group``, except for
    ConvolutionDepthwise, which convolves each channel alone whatever ``group`` says (the
    engine requires its ``num_output`` to be the channel count)."""
    cp = lp.convolution_param
    return cp.num_output if lp.type == "ConvolutionDepthwise" else cp.group


def _transposed(lp) -> bool:
    return lp.type == "InnerProduct" and bool(lp.inner_product_param.transpose)


def num_output(lp) -> int:
    """The number of output channels (rows) of affine layer ``lp``."""
    if lp.type == "InnerProduct":
        return lp.inner_product_param.num_output
    return lp.convolution_param.num_output


def set_rows(lp, blob, rows: np.ndarray) -> None:
    """Write (num_output, fan) rows into the layer's weight blob, in its storage layout."""
    w = blob.data
    if _transposed(lp):
        w[...] = rows.T
    elif lp.type == "Deconvolution":
        g = lp.convolution_param.group
        cin, opg = w.shape[0], w.shape[1]
        w[...] = rows.reshape(g, opg, cin // g, -1).transpose(0, 2, 1, 3).reshape(w.shape)
    else:
        w[...] = rows.reshape(w.shape)


def input_columns(lp, w: np.ndarray) -> np.ndarray:
    """A 2-D view of ``w`` (weights or their diff) with the layer's input columns on axis 1."""
    if _transposed(lp):
        return w.T
    if lp.type == "Deconvolution":
        return w.reshape(w.shape[0], -1).T
    return w.reshape(w.shape[0], -1)


def column_energies(w: np.ndarray) -> np.ndarray:
    """Sum of squares of each column of the 2-D ``w``, in float64 (summed in float32 by einsum's
    vector loop, which is off by ~1e-7 relative and needs no float64 copy of ``w``)."""
    return np.einsum("ij,ij->j", w, w).astype(np.float64)


def inner_product_gradient_energies(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """What :func:`input_energies` gives for an InnerProduct weight gradient ``dy^T x`` (either
    orientation: one energy per input column), without forming it: with the rows' Gram matrix
    ``M = dy dy^T``, column j's energy is ``x_j^T M x_j``. ``x`` is the bottom as (rows, K),
    ``dy`` the top diff as (rows, N); cheap while rows is small against N and K."""
    x64 = np.asarray(x, np.float64)
    dy64 = np.asarray(dy, np.float64)
    return np.einsum("nj,nj->j", x64, (dy64 @ dy64.T) @ x64)


def input_energies(lp, w: np.ndarray) -> np.ndarray:
    """Sum of squares of ``w`` per input channel (convolutions) or input column (InnerProduct),
    the order in which stage 3 lists a consumer's input groups (float64 result of float32
    products: no big copies)."""
    if lp.type in CONVOLUTION_TYPES:
        g = conv_group(lp)
        w3 = w.reshape(w.shape[0], w.shape[1], -1)
        per = np.einsum("ock,ock->oc", w3, w3).astype(np.float64)            # (out, C/g)
        return per.reshape(g, w.shape[0] // g, w.shape[1]).sum(axis=1).reshape(-1)
    if lp.type == "Deconvolution":
        w2 = w.reshape(w.shape[0], -1)
        return np.einsum("ij,ij->i", w2, w2).astype(np.float64)
    if lp.inner_product_param.transpose:
        return np.einsum("ij,ij->i", w, w).astype(np.float64)
    return np.einsum("ij,ij->j", w, w).astype(np.float64)


def scale_rows(lp, blobs, factors: np.ndarray) -> None:
    """Multiply output channel i of affine layer ``lp`` (weights and bias) by ``factors[i]``."""
    w = blobs[0].data
    f = factors.astype(np.float32)
    if lp.type == "Deconvolution":
        g = lp.convolution_param.group
        cin, opg = w.shape[0], w.shape[1]
        w[...] = (w.reshape(g, cin // g, opg, -1) * f.reshape(g, 1, opg, 1)).reshape(w.shape)
    elif _transposed(lp):
        w *= f.reshape(1, -1)
    else:
        w *= f.reshape((-1,) + (1,) * (w.ndim - 1))
    if len(blobs) > 1:
        blobs[1].data[...] *= f.reshape(blobs[1].data.shape)


def scale_columns(lp, blobs, factors: np.ndarray) -> None:
    """Multiply the weights that read input channel/column j of ``lp`` by ``factors[j]``."""
    w = blobs[0].data
    f = factors.astype(np.float32)
    if lp.type in CONVOLUTION_TYPES:
        g = conv_group(lp)
        out, cpg = w.shape[0], w.shape[1]
        w[...] = (w.reshape(g, out // g, cpg, -1) * f.reshape(g, 1, cpg, 1)).reshape(w.shape)
    elif lp.type == "Deconvolution":
        w *= f.reshape((-1,) + (1,) * (w.ndim - 1))
    elif lp.inner_product_param.transpose:
        w *= f.reshape(-1, 1)
    else:
        w *= f.reshape(1, -1)
