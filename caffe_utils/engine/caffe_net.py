"""The pycaffe engine: a thin adapter that gives ``caffe.Net`` the engine interface.

The net is built from the same upgraded, phase-filtered NetParameter as the numpy engine (written
to a temporary prototxt with ``force_backward: true``), so both engines see one definition.
pycaffe already provides ``blobs``, ``params``, ``layers``, ``inputs``, ``outputs``, ``forward``,
``backward`` and ``reshape``; this class adds ``net_param``, ``layer_names``/``layer_types``,
``bottom_names``/``top_names`` for the layers of the prototxt (Caffe's own Split layers are hidden),
``clear_param_diffs``, ``set_data`` (which also fills Caffe's Split copies of a blob),
``input_diffs``, ``copy_from`` with the project's clear errors, and ``save`` through
:func:`caffe_utils.caffemodel.write_caffemodel`: the
:class:`~caffe_utils.engine.protocol.EngineNet` interface.
"""
from __future__ import annotations

import faulthandler
import os
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from caffe_utils import caffemodel, netio
from caffe_utils.engine import physical_memory
from caffe_utils.engine.numpy_net import _never_consumed, gradient_starts
from caffe_utils.errors import EngineError, PrototxtError, UnsupportedLayerError


def import_caffe(gpu: Optional[int] = None):
    """Import pycaffe and select CPU or GPU ``gpu``; clear errors when that is impossible."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        import caffe
    except ImportError as exc:
        raise EngineError("pycaffe is not importable; build it with scripts/install_caffe.sh and add "
                          "its python folder to PYTHONPATH, or use --engine numpy") from exc
    if gpu is None:
        caffe.set_mode_cpu()
    else:
        # A CPU_ONLY Caffe aborts the process (LOG(FATAL)) in set_device, so look first.
        if not caffe_has_cuda(caffe):
            raise EngineError("the installed Caffe is CPU-only; drop --gpu or install a CUDA build of Caffe")
        try:
            caffe.set_device(int(gpu))
            caffe.set_mode_gpu()
        except Exception as exc:
            raise EngineError(f"cannot use GPU {gpu} with this Caffe ({exc}); check the device id") from exc
    return caffe


def caffe_has_cuda(caffe) -> bool:
    """Whether pycaffe's extension links the CUDA runtime (a CPU_ONLY build does not)."""
    lib = Path(getattr(caffe._caffe, "__file__", "") or "")
    candidates = [lib] + [p for p in lib.parent.glob("libcaffe*.so*")]
    for path in candidates:
        try:
            with open(path, "rb") as fh:
                if b"libcudart" in fh.read():
                    return True
        except OSError:
            continue
    return False


def _fatal_message(log: str) -> str:
    """The message of the last glog FATAL (``F...] msg``) or ``Check failed`` line in ``log``."""
    found = ""
    for line in log.splitlines():
        head, sep, msg = line.partition("] ")
        if sep and head[:1] == "F" and head[1:5].isdigit():
            found = msg.strip()
        elif line.startswith("Error: ") or "Check failed" in line:
            found = found or line.strip()
    return found


#: layer types whose backward Caffe does not implement: it aborts the process (glog FATAL)
NO_BACKWARD = {"DetectionOutput", "DetectionEvaluate", "Threshold", "ArgMax"}
#: layer types whose CPU backward Caffe lacks (caffe-fast-rcnn's ROIPooling: NOT_IMPLEMENTED, an
#: abort); their GPU backward exists
NO_CPU_BACKWARD = {"ROIPooling"}
#: layer types that some Caffe builds register with an empty CPU backward, which passes no
#: gradient and raises nothing (brocolli-caffe's Upsample, a deploy-only port): probed per net
MAYBE_NO_GRADIENT = {"Upsample"}


def _exercise(caffe, prototxt: str, phase: int, one_image: bool) -> None:
    """Build ``prototxt`` and run it forward, on one image or at the shapes it was built with
    (a reshape Caffe cannot do aborts there)."""
    net = caffe.Net(prototxt, int(phase))
    if one_image:
        for name in net.inputs:
            shape = net.blobs[name].data.shape
            if len(shape):
                net.blobs[name].reshape(1, *shape[1:])
        net.reshape()
    counts = [b.count for b in net.blobs.values()] + [p.count for ps in net.params.values() for p in ps]
    limit = physical_memory()
    if limit and 8 * sum(counts) > limit:
        return  # Caffe would allocate until killed: the parent refuses the net with its sizes (_check_memory)
    net.forward()


def _build_in_child(caffe, prototxt: str, phase: int, one_image: bool = True) -> Optional[str]:
    """Build and exercise ``prototxt`` in a forked child (:func:`_exercise`); None if that
    worked, else what Caffe said."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only build the net, with stderr into the pipe
        try:
            os.close(read_fd)
            os.dup2(write_fd, 2)
            faulthandler.disable()  # an abort here is expected; no Python dump on the parent's stderr
            _exercise(caffe, prototxt, phase, one_image)
            os._exit(0)
        except BaseException as exc:  # a Python-level failure of pycaffe
            try:
                os.write(2, f"\nError: {exc}\n".encode("utf-8", "replace"))
            finally:
                os._exit(3)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as fh:
        while True:
            chunk = fh.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return None
    msg = _fatal_message(b"".join(chunks).decode("utf-8", "replace"))
    return msg or (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exit status {os.WEXITSTATUS(status)}")


def probe_net(caffe, param, phase: int) -> None:
    """Build the NetParameter ``param`` and run it forward on one image in a forked child first:
    Caffe aborts the whole process (glog FATAL) on a missing bottom, impossible shapes and other
    net errors. (A backward Caffe lacks is refused by :meth:`CaffeNet.backward`.) A failure becomes a
    :class:`PrototxtError` with Caffe's own message and the layer it failed on (found by trying
    ever shorter prefixes of the net, a binary search).

    Costs one extra net construction and a one-image pass; more only for a net that fails so.
    Where fork is unavailable it does nothing.
    """
    if not hasattr(os, "fork"):
        return

    def attempt(n_layers: int, one_image: bool = False) -> Optional[str]:
        sub = type(param)()
        sub.CopyFrom(param)
        del sub.layer[n_layers:]
        fd, tmp = tempfile.mkstemp(suffix=".prototxt")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(netio.net_to_text(sub))
            return _build_in_child(caffe, tmp, phase, one_image)
        finally:
            os.unlink(tmp)

    # one image is cheap; a net that fails so (a Reshape to a fixed batch) is tried as built
    if attempt(len(param.layer), one_image=True) is None:
        return
    msg = attempt(len(param.layer))
    if msg is None:
        return
    lo, hi = 0, len(param.layer)  # prefix of lo layers builds, of hi fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid) is None:
            lo = mid
        else:
            hi = mid
    culprit = param.layer[hi - 1]
    if len(msg) > 600:
        msg = msg[:600] + " ..."
    raise PrototxtError(f"Caffe cannot build or run layer '{culprit.name}' ({culprit.type}): {msg}; "
                        "fix that layer in the prototxt")


def _in_caffe_schema(net):
    """``net`` as a message of pycaffe's own schema, which ``caffe.Net`` reads.

    A net read with the project's schema (it has fork fields that pycaffe's schema lacks) is
    re-read from its text with pycaffe's; a field pycaffe's schema still lacks is an
    :class:`EngineError` naming it and the way out (the numpy engine reads every fork field)."""
    from google.protobuf import text_format
    from caffe_utils.schema import caffe_pb2, is_builtin
    pb2 = caffe_pb2()
    if not is_builtin(net) or net.DESCRIPTOR.file is pb2.DESCRIPTOR:
        return net
    out = pb2.NetParameter()
    try:
        text_format.Merge(netio.net_to_text(net), out)
    except text_format.ParseError as exc:
        m = re.search(r'has no field named "([^"]+)"', str(exc))
        what = f'field "{m.group(1)}"' if m else f"part ({str(exc).strip()})"
        raise EngineError(f"the net uses a {what} that this pycaffe's Caffe schema does not have; "
                          "use --engine numpy, or a Caffe build that has it") from exc
    return out


class CaffeNet:
    """``caffe.Net`` behind the engine interface (see module docstring)."""

    engine = "caffe"

    def __init__(self, net: Union[str, Path, object], phase: Union[int, str] = netio.TEST,
                 weights: Optional[Union[str, Path]] = None, *, level: int = 0,
                 stages: Sequence[str] = (), input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                 seed: int = 0, gpu: Optional[int] = None) -> None:
        caffe = import_caffe(gpu)
        self.gpu = gpu
        if isinstance(phase, str):
            phase = netio.PHASES[phase.upper()]
        self.phase = phase
        self.net_param = _in_caffe_schema(netio.read_net(net, phase, level, stages))
        if seed is not None:
            caffe.set_random_seed(int(seed))
        self._net = self._build(caffe, input_shapes or {}, probe=True)
        self._check_memory()
        self._caffe_layer_index = {n: i for i, n in enumerate(self._net._layer_names)}
        # Caffe's own Split layers copy a blob read by several layers; restoring a blob's data
        # must restore those copies too
        self._split_tops: Dict[str, List[str]] = {}
        for lname, layer in zip(self._net._layer_names, self._net.layers):
            if layer.type == "Split":
                src = self._net.bottom_names[lname][0]
                self._split_tops.setdefault(src, []).extend(self._net.top_names[lname])
        self.bottom_names = OrderedDict((lp.name, list(lp.bottom)) for lp in self.net_param.layer)
        self.top_names = OrderedDict((lp.name, list(lp.top)) for lp in self.net_param.layer)
        #: the engine interface's switch for the input blobs' diffs. pycaffe fixes at build time
        #: which blobs get a backward pass (an input blob only with ``force_backward``), and this
        #: adapter builds with ``force_backward: true``, so backward always computes them here;
        #: False only tells that the caller does not read them (the numpy engine then skips them)
        self.input_diffs = True
        #: layers whose backward in this Caffe build passes no gradient (:meth:`_passes_no_gradient`)
        self.no_gradient_layers = [n for i, (n, layer) in enumerate(zip(self._net._layer_names, self._net.layers))
                                   if layer.type in MAYBE_NO_GRADIENT and self._passes_no_gradient(i)]
        if weights is not None:
            self.copy_from(weights)

    def _build(self, caffe, input_shapes: Mapping[str, Sequence[int]], probe: bool):
        """A ``caffe.Net`` of ``net_param`` with ``force_backward`` and the given input shapes;
        with ``probe``, first built in a child process (:func:`probe_net`), where an abort of
        Caffe's cannot take this process down."""
        param = type(self.net_param)()
        param.CopyFrom(self.net_param)
        param.force_backward = True
        for lp in param.layer:
            if lp.type == "Input":
                for k, t in enumerate(lp.top):
                    if t in input_shapes and k < len(lp.input_param.shape):
                        del lp.input_param.shape[k].dim[:]
                        lp.input_param.shape[k].dim.extend(int(d) for d in input_shapes[t])
        known = set(caffe.layer_type_list()) if hasattr(caffe, "layer_type_list") else None
        for lp in param.layer:
            if known is not None and lp.type not in known:
                raise UnsupportedLayerError(
                    f"layer '{lp.name}' has type '{lp.type}', which this Caffe does not know (known: "
                    f"{', '.join(sorted(known))}); fix the type, use --engine numpy, or use a Caffe build that has it")
        fd, tmp = tempfile.mkstemp(suffix=".prototxt")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(netio.net_to_text(param))
            if probe:
                probe_net(caffe, param, self.phase)
            return caffe.Net(tmp, int(self.phase))
        finally:
            os.unlink(tmp)

    def set_lrn_alphas(self, alphas: Mapping[str, float]) -> None:
        """Set LRN layers' ``alpha``. Caffe reads a layer's parameters when it builds the net,
        so the net is built again, at its inputs' current shapes, and gets the params' and the
        inputs' data (a changed alpha cannot make a net that built fail to build: no probe)."""
        if not netio.set_lrn_alphas(self.net_param, alphas):
            return
        old = self._net
        shapes = {name: tuple(old.blobs[name].data.shape) for name in old.inputs}
        self._net = self._build(import_caffe(self.gpu), shapes, probe=False)
        for name, blobs in old.params.items():
            for src, dst in zip(blobs, self._net.params[name]):
                dst.data[...] = src.data
        for name in old.inputs:
            self.set_data(name, old.blobs[name].data)

    def _passes_no_gradient(self, i: int) -> bool:
        """Whether layer ``i``'s backward leaves its bottom's diff at zero for a top diff of ones
        (an empty ``Backward_cpu``). Only that layer runs; the diffs are zero again afterwards."""
        name = self._net._layer_names[i]
        tops = [self._net.blobs[t] for t in self._net.top_names[name]]
        bottoms = [self._net.blobs[b] for b in self._net.bottom_names[name]]
        if not tops or not bottoms:
            return False
        for b in bottoms:
            b.diff[...] = 0
        for t in tops:
            t.diff[...] = 1
        self._net._backward(i, i)
        silent = not any(np.any(b.diff) for b in bottoms)
        for b in tops + bottoms:
            b.diff[...] = 0
        return silent

    def _check_memory(self) -> None:
        """Refuse a net whose blobs and parameters (data and diff, float32) cannot fit in this
        machine's RAM: Caffe allocates activations lazily and would abort the process mid-run."""
        limit = physical_memory()
        counts = [b.count for b in self._net.blobs.values()]
        counts += [p.count for ps in self._net.params.values() for p in ps]
        need = 8 * sum(counts)
        if limit and need > limit:
            big = max(self._net.blobs.items(), key=lambda kv: kv[1].count)
            raise EngineError(f"the net's blobs need {need / 2 ** 30:.1f} GiB (the largest, '{big[0]}', has shape "
                              f"{tuple(big[1].shape)}), more than this machine's "
                              f"{limit / 2 ** 30:.1f} GiB; lower --batch-size or the net's input size")

    # pycaffe passthroughs
    @property
    def blobs(self):
        return self._net.blobs

    @property
    def params(self):
        return self._net.params

    @property
    def inputs(self) -> List[str]:
        return list(self._net.inputs)

    @property
    def outputs(self) -> List[str]:
        """Caffe's net outputs in the numpy engine's order, the net's (pycaffe sorts them by
        name), and then the blobs only ``propagate_down: false`` bottoms read (a head's inputs,
        :func:`~caffe_utils.engine.numpy_net.gradient_starts`): the between-layer stage draws
        one random top gradient per output in this order, so that a seed gives both engines the
        same."""
        theirs = list(self._net.outputs)
        ours = [o for o in _never_consumed(self.net_param) if o in theirs]
        ours += [o for o in gradient_starts(self.net_param) if o not in ours]
        return ours + [o for o in theirs if o not in ours]

    @property
    def layers(self):
        return [self._net.layers[self._caffe_layer_index[lp.name]] for lp in self.net_param.layer]

    @property
    def layer_names(self) -> List[str]:
        return [lp.name for lp in self.net_param.layer]

    @property
    def layer_types(self) -> List[str]:
        return [lp.type for lp in self.net_param.layer]

    def reshape(self) -> None:
        self._net.reshape()

    def forward(self, start: Optional[str] = None, end: Optional[str] = None, **kwargs):
        return self._net.forward(start=start, end=end, **kwargs)

    def check_backward(self, start: Optional[str] = None, end: Optional[str] = None) -> None:
        """Refuse (an :class:`EngineError` naming the layer) a backward from ``start`` to ``end``
        that would reach a layer whose backward Caffe lacks (Caffe would abort the process) or
        whose backward in this build passes no gradient (the gradients would be silently wrong)."""
        names = list(self._net._layer_names)
        first = names.index(start) if start else len(names) - 1
        last = names.index(end) if end else 0
        for i in range(last, first + 1):
            layer = self._net.layers[i]
            if layer.type in NO_BACKWARD:
                raise EngineError(f"layer '{names[i]}' ({layer.type}) has no backward in Caffe, which would abort; "
                                  "remove it from the net (or end the net before it) or use --engine numpy")
            if layer.type in NO_CPU_BACKWARD and self.gpu is None:
                raise EngineError(f"layer '{names[i]}' ({layer.type}) has no CPU backward in Caffe, which would "
                                  "abort; use --gpu with a CUDA Caffe, or --engine numpy")
            if names[i] in self.no_gradient_layers:
                raise EngineError(f"layer '{names[i]}' ({layer.type}) has an empty backward in this Caffe build "
                                  "(it passes no gradient), so the between-layer stage would be wrong; "
                                  "use --engine numpy")

    def backward(self, start: Optional[str] = None, end: Optional[str] = None, **kwargs):
        """pycaffe's backward, refused where :meth:`check_backward` refuses it, and skipping the
        layers that pass no gradient (:meth:`_silent_layers`), whose bottoms' diffs (the random
        top gradient on a head's inputs) Caffe's ``force_backward`` would otherwise overwrite."""
        self.check_backward(start, end)
        names = list(self._net._layer_names)
        first = names.index(start) if start else len(names) - 1
        last = names.index(end) if end else 0
        skip = [i for i in self._silent_layers() if last <= i <= first]
        if not skip:
            return self._net.backward(start=start, end=end, **kwargs)
        wanted = list(kwargs.pop("diffs", None) or [])
        for name, diff in kwargs.items():
            self._net.blobs[name].diff[...] = diff
        hi = first
        for i in sorted(skip, reverse=True) + [last - 1]:
            if hi > i:
                self._net._backward(hi, i + 1)
            hi = i - 1
        return {n: self._net.blobs[n].diff for n in set(self._net.inputs) | set(wanted)}

    def _silent_layers(self) -> List[int]:
        """Caffe indices of the layers whose every bottom has ``propagate_down: false`` (cut
        heads, see :mod:`caffe_utils.magic.prepare`), and of Caffe's Split layers of the blobs
        only such bottoms read: their backward would overwrite a diff that is a gradient start."""
        silent = {lp.name for lp in self.net_param.layer
                  if len(lp.bottom) and len(lp.propagate_down) == len(lp.bottom) and not any(lp.propagate_down)}
        starts = set(gradient_starts(self.net_param))
        out = []
        for i, (name, layer) in enumerate(zip(self._net._layer_names, self._net.layers)):
            if name in silent or (layer.type == "Split" and self._net.bottom_names[name][0] in starts):
                out.append(i)
        return out

    def set_data(self, name: str, data: np.ndarray) -> None:
        """Set blob ``name``'s data and that of Caffe's Split copies of it."""
        self._net.blobs[name].data[...] = data
        for copy in self._split_tops.get(name, ()):
            self.set_data(copy, data)

    def expect_backward(self, follows: bool) -> None:
        """pycaffe's layers always keep what backward needs: nothing to tell them."""

    def bind_data(self, name: str, array: np.ndarray) -> bool:
        """pycaffe's blobs own their memory: never bound (the caller copies)."""
        return False

    def unbind_data(self) -> None:
        """Nothing is ever bound (see :meth:`bind_data`)."""

    def clear_param_diffs(self) -> None:
        for blobs in self._net.params.values():
            for b in blobs:
                b.diff[...] = 0

    def param_shapes(self) -> "OrderedDict[str, List[Tuple[int, ...]]]":
        return OrderedDict((n, [tuple(b.data.shape) for b in bl]) for n, bl in self._net.params.items())

    def copy_from(self, weights: Union[str, Path]) -> None:
        targets = OrderedDict((n, [b.data for b in bl]) for n, bl in self._net.params.items())
        for _ in caffemodel.copy_caffemodel_into(weights, targets):  # streams from the file into the blobs
            pass

    def save(self, path: Union[str, Path]) -> None:
        caffemodel.write_caffemodel(path, self.net_param,
                               OrderedDict((n, [b.data for b in bl]) for n, bl in self._net.params.items()))
