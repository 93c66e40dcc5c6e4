"""What an initialization did: per affine layer and for the whole net (printed and saved as JSON)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Dict, List, Optional

from caffe_utils.measure import flatness


class Fallback(str, Enum):
    """Why a layer got Gaussian weights instead of the data-driven ones asked for."""
    NOT_CONVOLUTION = "data-driven init is for convolutions"
    TOO_FEW_PATCHES = "too few patches"


@dataclass
class LayerReport:
    """One affine layer: how its weights were made, its change rate before and after stage 3
    (and the rate's coefficient of variation across its input columns), and its output's
    activation statistics on the between-layer batch.

    ``init`` is the weight initialization it got, None when it kept the caffemodel's weights;
    ``fallback`` says why it got Gaussian weights instead of ``requested``; ``zeroed`` is set
    by ``--zero-classifier``."""
    name: str
    type: str
    init: Optional[str] = None
    requested: Optional[str] = None
    fallback: Optional[Fallback] = None
    zeroed: bool = False
    rate_before: float = float("nan")
    rate_after: float = float("nan")
    #: the standard error of log(rate_before) over the calibration's batches
    #: (:func:`~caffe_utils.measure.log_rate_errors`; nan where too few batches tell)
    rate_error: float = float("nan")
    cv_before: float = float("nan")
    cv_after: float = float("nan")
    act_mean: float = float("nan")
    act_std: float = float("nan")
    channel_std_cv: float = float("nan")
    dead_channels: int = 0

    @property
    def kept(self) -> bool:
        """The layer kept the weights it was loaded with."""
        return self.init is None

    @property
    def initialized(self) -> str:
        """How the weights were made, in words (the report table's column)."""
        text = "kept" if self.init is None else self.init
        if self.fallback is Fallback.NOT_CONVOLUTION:
            text += f" ({self.fallback.value})"
        elif self.fallback is Fallback.TOO_FEW_PATCHES:
            text += f" (too few patches for {self.requested})"
        return text + (" (zeroed)" if self.zeroed else "")


@dataclass
class RoundReport:
    """One round of stage 3: the change rates its solve predicted (with the correction the
    earlier measured rounds taught the model) and, behind inexact layers, the ones its
    correcting pass measured (None where the model is exact and nothing was measured), and
    the flatness that rescaling only the groups the model is exact for reaches from there
    (``polished``; the round is judged by it, see :func:`caffe_utils.magic.between._polish`)."""
    predicted: Dict[str, float]
    measured: Optional[Dict[str, float]] = None
    polished: Optional[float] = None

    @property
    def flatness_predicted(self) -> float:
        return flatness(self.predicted)

    @property
    def flatness_measured(self) -> Optional[float]:
        return None if self.measured is None else flatness(self.measured)


@dataclass
class InitReport:
    """The whole run: per-layer reports, stage 3's rounds (``iterations`` solves applied,
    ``passes`` of them corrected by a measured pass, ``rounds`` their predicted and measured
    rates) and flatness (max/min change rate) before and after, the layers stage 3 could not rescale exactly (``inexact_layers``), could
    not rescale at all (``pinned_layers``: their output is the net's), or passed no scale
    through because no scale rule knows their type (``unknown_scale_layers``), the layers
    whose rates the flatness leaves out because they do not learn (``frozen_layers``,
    ``lr_mult: 0``), the LRN layers that got a new alpha (``lrn_alphas``), the heads the
    method ended at (``heads``: see :func:`caffe_utils.magic.prepare.prepare_net`), and how much
    the net's outputs moved under stage 3."""
    layers: List[LayerReport] = field(default_factory=list)
    iterations: int = 0
    passes: int = 0
    #: the images stage 3's calibration ran forward and backward, and those each measured pass
    #: ran again (the calibration's first ones): with ``passes``, the work stage 3 did
    calibration_images: int = 0
    pass_images: int = 0
    rounds: List[RoundReport] = field(default_factory=list)
    converged: bool = False
    flatness_before: float = float("nan")
    flatness_after: float = float("nan")
    #: the flatness after each between-layer round, measured where a pass measured it; behind
    #: inexact layers a round whose polish was no flatter than the best so far was undone, and
    #: flatness_after is the flatness of the best state's polish (``RoundReport.polished``)
    flatness_rounds: List[float] = field(default_factory=list)
    inexact_layers: List[str] = field(default_factory=list)
    pinned_layers: List[str] = field(default_factory=list)
    unknown_scale_layers: List[str] = field(default_factory=list)
    frozen_layers: List[str] = field(default_factory=list)
    heads: List[str] = field(default_factory=list)
    #: the LRN layers whose alpha stage 3 changed (``InitOptions.lrn_alpha``): their new alpha
    lrn_alphas: Dict[str, float] = field(default_factory=dict)
    output_deviation: Optional[float] = None
    function_preserved: Optional[bool] = None
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready: non-finite figures become None, each layer says how it was initialized."""
        out = _clean(asdict(self))
        for layer, rep in zip(out["layers"], self.layers):
            layer["initialized"] = rep.initialized
        for entry, rnd in zip(out["rounds"], self.rounds):
            entry["flatness_predicted"] = _clean(rnd.flatness_predicted)
            entry["flatness_measured"] = _clean(rnd.flatness_measured)
        return out


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v
