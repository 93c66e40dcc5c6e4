"""Layers that move, combine or reshape blobs without learnable parameters: Concat, Eltwise,
Split, Slice, Flatten, Reshape, Crop, Silence and Tile, with Caffe's exact semantics (legacy
``concat_dim``/``slice_dim``, Eltwise's MAX tie rule and stable PROD gradient, Reshape's 0/-1
dimensions, Crop's offsets).

Where Caffe shares memory instead of copying (Split tops, Flatten/Reshape tops, a one-bottom
Concat, a one-top Slice) the top's ``data`` is a view of the bottom's, as in Caffe, so an
in-place layer downstream changes both, exactly as it does in Caffe. Diffs are never shared:
backward adds into ``bottom.diff`` (see :mod:`.base`).
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from caffe_utils.layers.base import DTYPE, Blob, Layer, register

_F = np.float32


def canonical_axis(layer: Layer, axis: int, ndim: int) -> int:
    """Caffe's ``Blob::CanonicalAxisIndex``: ``axis`` in [-ndim, ndim), negatives from the end."""
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise layer.error(f"axis {axis} is out of range for a {ndim}-D bottom blob")
    return axis + ndim if axis < 0 else axis


def _count(shape, start: int = 0, end=None) -> int:
    return int(np.prod(shape[start:end], dtype=np.int64))


def _check_tops(layer: Layer, top: List[Blob], lo: int, hi=None) -> None:
    n = len(top)
    if n < lo or (hi is not None and n > hi):
        want = f"{lo}" if hi == lo else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
        raise layer.error(f"needs {want} top(s), has {n}")


def _check_bottoms(layer: Layer, bottom: List[Blob], lo: int, hi=None) -> None:
    n = len(bottom)
    if n < lo or (hi is not None and n > hi):
        want = f"{lo}" if hi == lo else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
        raise layer.error(f"needs {want} bottom(s), has {n}")


def _no_in_place(layer: Layer, bottom: List[Blob], top: List[Blob]) -> None:
    for t in top:
        if any(t is b for b in bottom):
            raise layer.error("does not allow in-place computation; give the top a new name")


@register
class Concat(Layer):
    type = "Concat"
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        _check_bottoms(self, bottom, 1)
        _check_tops(self, top, 1, 1)
        p = self.param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise self.error("give either axis or concat_dim, not both")

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = self.param.concat_param
        shape0 = bottom[0].shape
        ndim = len(shape0)
        if p.HasField("concat_dim"):
            axis = int(p.concat_dim)
            if axis >= ndim:
                raise self.error(f"concat_dim {axis} is out of range for {ndim}-D bottoms")
        else:
            axis = canonical_axis(self, p.axis, ndim)
        self.axis = axis
        out = list(shape0)
        for i, b in enumerate(bottom[1:], 1):
            if len(b.shape) != ndim:
                raise self.error(f"all bottoms must have the same number of axes: bottom 0 is {shape0}, "
                                 f"bottom {i} is {b.shape}")
            for j in range(ndim):
                if j != axis and b.shape[j] != shape0[j]:
                    raise self.error(f"bottoms must match except along axis {axis}: bottom 0 is {shape0}, "
                                     f"bottom {i} is {b.shape}")
            out[axis] += b.shape[axis]
        top[0].reshape(out)
        if len(bottom) == 1:
            top[0].data = bottom[0].data  # Caffe: ShareData

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        if len(bottom) == 1:
            top[0].data = bottom[0].data
            return
        np.concatenate([b.data for b in bottom], axis=self.axis, out=top[0].data)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        dy = top[0].diff
        lead = (slice(None),) * self.axis
        off = 0
        for i, b in enumerate(bottom):
            n = b.shape[self.axis]
            if propagate_down[i]:
                b.diff += dy[lead + (slice(off, off + n),)]
            off += n


@register
class Eltwise(Layer):
    """SUM (with coefficients), PROD and MAX of two or more same-shaped bottoms."""

    type = "Eltwise"
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        _check_bottoms(self, bottom, 2)
        _check_tops(self, top, 1, 1)
        p = self.param.eltwise_param
        enum = p.DESCRIPTOR.fields_by_name["operation"].enum_type
        self.op = enum.values_by_number[p.operation].name
        if len(p.coeff) not in (0, len(bottom)):
            raise self.error(f"takes one coefficient per bottom ({len(bottom)}), got {len(p.coeff)}")
        if self.op == "PROD" and len(p.coeff):
            raise self.error("coefficients are only allowed for operation SUM")
        self.coeffs = [_F(c) for c in p.coeff] if len(p.coeff) else [_F(1)] * len(bottom)
        self.stable_prod_grad = bool(p.stable_prod_grad)
        self._mask = None

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != bottom[0].shape:
                raise self.error(f"bottoms must have the same shape: bottom 0 is {bottom[0].shape}, "
                                 f"bottom {i} is {b.shape}")
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        if self.op == "PROD":
            y = bottom[0].data * bottom[1].data
            for b in bottom[2:]:
                y *= b.data
            top[0].data[...] = y
        elif self.op == "SUM":
            self._sum(bottom, top[0])
        else:  # MAX: bottom 1 wins a tie with bottom 0; later bottoms must be strictly greater
            a, b = bottom[0].data, bottom[1].data
            mask = (~(a > b)).astype(np.int32)  # Caffe: a > b ? 0 : 1
            y = np.where(mask.astype(bool), b, a)
            for k in range(2, len(bottom)):
                x = bottom[k].data
                upd = x > y
                np.copyto(y, x, where=upd)
                np.copyto(mask, k, where=upd)
            self._mask = mask
            top[0].data[...] = y

    def _sum(self, bottom: List[Blob], top: Blob) -> None:
        """The weighted sum, accumulated straight into the top (a temporary only when the top is
        a later bottom, which the first term would overwrite)."""
        y = top.data
        if any(np.shares_memory(y, b.data) for b in bottom[1:]):
            y = np.empty(bottom[0].shape, DTYPE)
        first, c0 = bottom[0].data, self.coeffs[0]
        rest = list(zip(self.coeffs[1:], bottom[1:]))
        if c0 == 1 and rest[0][0] == 1:  # the first two terms in one pass
            np.add(first, rest.pop(0)[1].data, out=y)
        elif c0 != 1:
            np.multiply(first, c0, out=y)
        elif y is not first:
            np.copyto(y, first)
        for c, b in rest:
            if c == 1:
                y += b.data
            else:
                y += c * b.data
        if y is not top.data:
            top.data[...] = y

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        dy = top[0].diff
        for i, b in enumerate(bottom):
            if not propagate_down[i]:
                continue
            if self.op == "PROD":
                if self.stable_prod_grad:
                    g = None
                    for j, other in enumerate(bottom):
                        if j == i:
                            continue
                        g = other.data.copy() if g is None else g * other.data
                else:
                    with np.errstate(divide="ignore", invalid="ignore"):
                        g = top[0].data / b.data
                b.diff += g * dy
            elif self.op == "SUM":
                c = self.coeffs[i]
                b.diff += dy if c == 1 else c * dy
            else:
                b.diff += dy * (self._mask == i)


@register
class Split(Layer):
    """Copies its bottom to every top (Caffe shares the data); backward sums the top diffs."""

    type = "Split"
    num_bottom = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        _check_tops(self, top, 1)
        _no_in_place(self, bottom, top)

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        for t in top:
            t.reshape(bottom[0].shape)
            t.data = bottom[0].data

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        for t in top:
            t.data = bottom[0].data  # Caffe: ShareData

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        if len(top) == 1:
            bottom[0].diff += top[0].diff
            return
        g = top[0].diff + top[1].diff
        for t in top[2:]:
            g += t.diff
        bottom[0].diff += g


@register
class Slice(Layer):
    type = "Slice"
    num_bottom = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        _check_tops(self, top, 1)
        p = self.param.slice_param
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise self.error("give either axis or slice_dim, not both")
        self.slice_points = [int(s) for s in p.slice_point]

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = self.param.slice_param
        shape = bottom[0].shape
        ndim = len(shape)
        if p.HasField("slice_dim"):
            axis = int(p.slice_dim)
            if axis >= ndim:
                raise self.error(f"slice_dim {axis} is out of range for a {ndim}-D bottom")
        else:
            axis = canonical_axis(self, p.axis, ndim)
        self.axis = axis
        n = shape[axis]
        if self.slice_points:
            if len(self.slice_points) != len(top) - 1:
                raise self.error(f"{len(self.slice_points)} slice_point values need {len(self.slice_points) + 1} "
                                 f"tops, has {len(top)}")
            if len(top) > n:
                raise self.error(f"{len(top)} tops cannot slice an axis of size {n}")
            sizes, prev = [], 0
            for sp in self.slice_points:
                if sp <= prev:
                    raise self.error(f"slice_point values must be strictly increasing and > 0, "
                                     f"got {self.slice_points}")
                sizes.append(sp - prev)
                prev = sp
            sizes.append(n - prev)
            if sizes[-1] < 0:
                raise self.error(f"slice_point {prev} is beyond the axis size {n}")
        else:
            if n % len(top):
                raise self.error(f"{len(top)} tops must evenly divide the slice axis of size {n}")
            sizes = [n // len(top)] * len(top)
        self.sizes = sizes
        for t, s in zip(top, sizes):
            out = list(shape)
            out[axis] = s
            t.reshape(out)
        if len(top) == 1:
            top[0].data = bottom[0].data  # Caffe: ShareData

    def _slices(self):
        lead = (slice(None),) * self.axis
        off = 0
        for s in self.sizes:
            yield lead + (slice(off, off + s),)
            off += s

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data
        if len(top) == 1:
            top[0].data = x
            return
        for t, sl in zip(top, self._slices()):
            t.data[...] = x[sl]

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if not propagate_down[0]:
            return
        g = bottom[0].diff
        for t, sl in zip(top, self._slices()):
            g[sl] += t.diff


class _ViewLayer(Layer):
    """A layer whose top is the bottom's data under another shape (Caffe: ShareData)."""

    num_bottom = 1
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        _no_in_place(self, bottom, top)

    def top_shape(self, shape: Tuple[int, ...]) -> List[int]:
        raise NotImplementedError

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = self.top_shape(bottom[0].shape)
        if _count(shape) != bottom[0].count:
            raise self.error(f"output shape {tuple(shape)} does not have the bottom's count "
                             f"{bottom[0].count} (bottom shape {bottom[0].shape})")
        top[0].reshape(shape)
        top[0].data = bottom[0].data.reshape(shape)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        top[0].data = bottom[0].data.reshape(top[0].shape)

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if propagate_down[0]:
            bottom[0].diff += top[0].diff.reshape(bottom[0].shape)


@register
class Flatten(_ViewLayer):
    type = "Flatten"

    def top_shape(self, shape: Tuple[int, ...]) -> List[int]:
        p = self.param.flatten_param
        ndim = len(shape)
        start = canonical_axis(self, p.axis, ndim)
        end = canonical_axis(self, p.end_axis, ndim)
        if end < start:
            raise self.error(f"end_axis ({p.end_axis}) comes before axis ({p.axis}) for a {ndim}-D bottom")
        return list(shape[:start]) + [_count(shape, start, end + 1)] + list(shape[end + 1:])


@register
class Reshape(_ViewLayer):
    type = "Reshape"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        super().setup(bottom, top)
        dims = [int(d) for d in self.param.reshape_param.shape.dim]
        self.dims = dims
        self.copy_axes = [i for i, d in enumerate(dims) if d == 0]
        inferred = [i for i, d in enumerate(dims) if d == -1]
        if len(inferred) > 1:
            raise self.error(f"shape {dims} contains more than one -1; at most one dimension can be inferred")
        if any(d < -1 for d in dims):
            raise self.error(f"shape {dims} has a negative dimension other than -1")
        self.inferred_axis = inferred[0] if inferred else -1
        self.constant_count = _count([d for d in dims if d > 0])

    def top_shape(self, shape: Tuple[int, ...]) -> List[int]:
        p = self.param.reshape_param
        ndim = len(shape)
        start = int(p.axis) if p.axis >= 0 else ndim + int(p.axis) + 1
        if not 0 <= start <= ndim:
            raise self.error(f"axis {p.axis} is out of range for a {ndim}-D bottom")
        num_axes = int(p.num_axes)
        if num_axes < -1:
            raise self.error(f"num_axes must be >= 0, or -1 for all, got {num_axes}")
        end = ndim if num_axes == -1 else start + num_axes
        if end > ndim:
            raise self.error(f"axis + num_axes = {end} is beyond the bottom's {ndim} axes")
        out = list(shape[:start]) + list(self.dims) + list(shape[end:])
        for i in self.copy_axes:
            if start + i >= ndim:
                raise self.error(f"shape has a 0 at position {i} but the bottom has no axis {start + i} to copy")
            out[start + i] = shape[start + i]
        if self.inferred_axis >= 0:
            explicit = self.constant_count * _count(shape, 0, start) * _count(shape, end)
            for i in self.copy_axes:
                explicit *= out[start + i]
            total = _count(shape)
            if explicit == 0 or total % explicit:
                raise self.error(f"bottom count ({total}) must be divisible by the product of the "
                                 f"specified dimensions ({explicit})")
            out[start + self.inferred_axis] = total // explicit
        return out


@register
class Crop(Layer):
    """Crops bottom[0] to the shape of bottom[1] from ``axis`` on, at the given offsets."""

    type = "Crop"
    num_bottom = 2
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = self.param.crop_param
        ndim = len(bottom[0].shape)
        start = canonical_axis(self, p.axis, ndim)
        if len(p.offset) > 1 and start + len(p.offset) != ndim:
            raise self.error(f"{len(p.offset)} offsets given but {ndim - start} axes follow axis {start}; "
                             "give one offset, or one per cropped axis")

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = self.param.crop_param
        shape, ref = bottom[0].shape, bottom[1].shape
        ndim = len(shape)
        start = canonical_axis(self, p.axis, ndim)
        if len(ref) < ndim:
            raise self.error(f"bottom[1] {ref} has fewer axes than bottom[0] {shape}")
        offsets = [0] * ndim
        out = list(shape)
        for i in range(start, ndim):
            off = int(p.offset[0]) if len(p.offset) == 1 else (int(p.offset[i - start]) if len(p.offset) else 0)
            if shape[i] - off < ref[i]:
                raise self.error(f"the crop of axis {i} is out of bounds: size {ref[i]} at offset {off} "
                                 f"in a dimension of {shape[i]}")
            out[i] = ref[i]
            offsets[i] = off
        self.slices = tuple(slice(o, o + n) for o, n in zip(offsets, out))
        top[0].reshape(out)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        top[0].data[...] = bottom[0].data[self.slices]

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if propagate_down[0]:
            bottom[0].diff[self.slices] += top[0].diff
        # bottom[1] only gives the shape: its gradient is zero (the net zeroes it)


@register
class Silence(Layer):
    """Consumes its bottoms and produces nothing; their gradient is zero."""

    type = "Silence"
    num_top = 0

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        _check_bottoms(self, bottom, 1)
        _check_tops(self, top, 0, 0)

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        pass

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        pass

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        pass  # Caffe sets the diffs to 0; the net has zeroed them already


@register
class Tile(Layer):
    """Repeats the bottom ``tiles`` times along ``axis`` (the whole trailing block each time)."""

    type = "Tile"
    num_bottom = 1
    num_top = 1

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        p = self.param.tile_param
        if not p.HasField("tiles"):
            raise self.error("tile_param.tiles must be specified")
        if p.tiles <= 0:
            raise self.error(f"tiles must be positive, got {p.tiles}")
        self.tiles = int(p.tiles)

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        shape = bottom[0].shape
        self.axis = canonical_axis(self, self.param.tile_param.axis, len(shape))
        out = list(shape)
        out[self.axis] *= self.tiles
        self.outer = _count(shape, 0, self.axis)
        self.inner = _count(shape, self.axis)
        top[0].reshape(out)

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        x = bottom[0].data.reshape(self.outer, 1, self.inner)
        top[0].data.reshape(self.outer, self.tiles, self.inner)[...] = x

    def backward(self, top: List[Blob], propagate_down: List[bool], bottom: List[Blob]) -> None:
        if propagate_down[0]:
            g = top[0].diff.reshape(self.outer, self.tiles, self.inner).sum(axis=1, dtype=DTYPE)
            bottom[0].diff += g.reshape(bottom[0].shape)

