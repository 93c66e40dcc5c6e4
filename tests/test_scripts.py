"""The experiment scripts run end to end in their reduced modes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_figure1_reduced(tmp_path, capsys):
    out = tmp_path / "fig1.png"
    assert _script("figure1").main(["--reduced", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(out.with_suffix(".json").read_text())
    flat = {m["weights"]: m["flatness"] for m in data["models"]}
    assert list(flat) == ["Caffe fillers", "Gaussian 0.01", "k-means, no between", "ours (Gaussian)",
                          "ours (k-means)"]
    # without the between-layer stage conv1 learns orders of magnitude faster than the rest
    assert flat["k-means, no between"] > 100 * flat["ours (k-means)"]
    assert "flatness (max/min change rate)" in capsys.readouterr().out
