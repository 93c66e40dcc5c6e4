"""The measurement (change rates, column variation, activation statistics) against sums by hand."""
from __future__ import annotations

import numpy as np
import pytest

from caffe_utils import measure
from caffe_utils.engine.numpy_net import Net

TINY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "fc1" type: "InnerProduct" bottom: "data" top: "fc1" inner_product_param { num_output: 4 } }
layer { name: "relu" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2" inner_product_param { num_output: 2 } }
"""


def test_measure_equals_sums_by_hand(tmp_path):
    p = tmp_path / "tiny.prototxt"
    p.write_text(TINY)
    net = Net(p)
    rng = np.random.RandomState(3)
    w1, b1 = rng.standard_normal((4, 3)), rng.standard_normal(4)
    w2, b2 = rng.standard_normal((2, 4)), rng.standard_normal(2)
    for blob, v in zip(net.params["fc1"], (w1, b1)):
        blob.data[...] = v
    for blob, v in zip(net.params["fc2"], (w2, b2)):
        blob.data[...] = v
    x = rng.standard_normal((5, 3)).astype(np.float32)  # 5 images, batches of 2: the last is partial
    stats = measure.measure(net, "data", x, seed=11)

    eta_rng = np.random.RandomState(11)
    g1 = np.zeros((4, 3))
    g2 = np.zeros((2, 4))
    pre = []
    for start in (0, 2, 4):
        xb = x[start:start + 2].astype(np.float64)
        eta = eta_rng.standard_normal((2, 2))[:len(xb)]
        z = xb @ w1.T + b1
        pre.append(z)
        h = np.maximum(z, 0)
        dw2 = eta.T @ h
        dw1 = ((eta @ w2) * (z > 0)).T @ xb
        g2 += dw2 ** 2
        g1 += dw1 ** 2
    for name, g, w in (("fc1", g1, w1), ("fc2", g2, w2)):
        rate = np.sqrt(g.sum() * 2 / 5 / (w ** 2).sum())
        assert stats[name].rate == pytest.approx(rate, rel=1e-4)
        col = g.sum(axis=0)
        assert stats[name].column_cv == pytest.approx(col.std() / col.mean(), rel=1e-4)
    z = np.concatenate(pre)  # fc1 before the in-place ReLU, every image once
    assert stats["fc1"].act_mean == pytest.approx(z.mean(axis=0).mean(), rel=1e-4)
    assert stats["fc1"].act_std == pytest.approx(z.std(axis=0).mean(), rel=1e-4)
    s = z.std(axis=0)
    assert stats["fc1"].channel_std_cv == pytest.approx(s.std() / s.mean(), rel=1e-4)
    assert measure.flatness(measure.rates_of(stats)) == pytest.approx(
        max(stats["fc1"].rate, stats["fc2"].rate) / min(stats["fc1"].rate, stats["fc2"].rate))


def _two_models(small, photos, tmp_path):
    from caffe_utils.magic import InitOptions
    from caffe_utils.pipeline import RunConfig, SampleSpec, run
    paths = []
    for between in (False, True):
        out = tmp_path / f"between_{between}.caffemodel"
        run(RunConfig(prototxt=str(small), output=str(out), sample=SampleSpec(data=photos, images=16),
                      options=InitOptions(batch_size=8, init="gaussian", between=between, damping=0.9),
                      engine="numpy"))
        paths.append(out)
    return paths


def _measure_stat():
    """scripts/measure_stat.py as a module."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "measure_stat", Path(__file__).resolve().parent.parent / "scripts" / "measure_stat.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_measure_stat_script_table_json_and_plot(small, photos, tmp_path):
    import json

    from click.testing import CliRunner

    mod = _measure_stat()
    a, b = _two_models(small, photos, tmp_path)
    js, png = tmp_path / "m.json", tmp_path / "m.png"
    res = CliRunner().invoke(mod.cli, [str(small), "-w", str(a), "-w", str(b), "-d", photos, "-n", "16",
                                       "--batch-size", "8", "--engine", "numpy", "--json", str(js),
                                       "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert res.output.count("flatness (max/min change rate)") == 2
    data = json.loads(js.read_text())
    flat = [m["flatness"] for m in data["models"]]
    assert [l["name"] for l in data["models"][0]["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    assert flat[1] < flat[0] / 3  # the between-layer stage flattened the rates
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the figures equal the library's measurement
    from caffe_utils.pipeline import MeasureConfig, SampleSpec, measure_models
    models, _, _ = measure_models(MeasureConfig(prototxt=str(small), weights=[str(a), str(b)],
                                                sample=SampleSpec(data=photos, images=16), batch_size=8,
                                                engine="numpy"))
    assert [m.flatness for m in models] == pytest.approx(flat, rel=1e-9)
    bad = CliRunner().invoke(mod.cli, [str(small), "-w", str(a), "-d", photos, "--engine", "numpy",
                                       "--plot", str(tmp_path / "missing" / "x.png")])
    assert bad.exit_code != 0 and "Traceback" not in bad.output


def test_measure_stat_refuses_gpu_with_the_numpy_engine(small, tmp_path):
    """The same one-line bad-option error (exit 2) as magic_init.py's, before anything is read."""
    from click.testing import CliRunner
    weights = tmp_path / "w.caffemodel"
    weights.write_bytes(b"")
    res = CliRunner().invoke(_measure_stat().cli, [str(small), "-w", str(weights), "--engine", "numpy", "--gpu", "0"])
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "'--gpu'" in lines[0] and "numpy engine runs on the CPU" in lines[0], lines


def test_magic_init_plot(small, photos, tmp_path):
    from click.testing import CliRunner

    import magic_init
    png = tmp_path / "run.png"
    res = CliRunner().invoke(magic_init.cli, [str(small), "-o", str(tmp_path / "o.caffemodel"), "-d", photos,
                                              "-n", "16", "--batch-size", "8", "--engine", "numpy",
                                              "--plot", str(png), "-q"])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    res = CliRunner().invoke(magic_init.cli, [str(small), "-o", str(tmp_path / "p.caffemodel"), "-d", photos,
                                              "--engine", "numpy", "--plot", str(tmp_path / "no" / "x.png")])
    assert res.exit_code != 0 and "plot folder" in res.output
    assert not (tmp_path / "p.caffemodel").exists()


def test_valid_rows_counts_the_rows_of_the_real_images():
    """A padded last batch of 3 real images in 4: an image blob has 3 real rows, Faster
    R-CNN's rois blob (8 per image) 24, PriorBox's one row (not per image) stays whole."""
    from caffe_utils.measure import valid_rows
    assert valid_rows(4, 3, 4) == 3
    assert valid_rows(32, 3, 4) == 24
    assert valid_rows(1, 3, 4) == 1
    assert valid_rows(4, 4, 4) == 4
