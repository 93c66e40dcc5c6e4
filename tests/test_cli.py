"""The click command line, through CliRunner."""
from __future__ import annotations

import click
from click.testing import CliRunner

from caffe_utils import magic
from caffe_utils.clitools import sample_options
from caffe_utils.pipeline import RunConfig, SampleSpec
from magic_init import cli


def test_help_documents_options_and_defaults():
    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0
    for text in ("--weights", "--data", "--images", "default: 160", "--init", "kmeans", "--no-within",
                 "--no-between", "--beta", "default: 0.1", "--iterations", "default: 10", "--damping",
                 "default: 1.0", "--zero-classifier", "--engine", "--gpu", "--seed", "--report", "--quiet",
                 "orthogonal", "--reinit", "--mem-limit"):
        assert text in res.output, text


def test_cli_defaults_are_the_algorithms(small, photos, tmp_path):
    """What --help promises is what the library runs with: the options that the CLI passes on
    without being given (as the report records them) equal magic.InitOptions' defaults."""
    import json
    import re

    report = tmp_path / "r.json"
    res = CliRunner().invoke(cli, [str(small), "-o", str(tmp_path / "d.caffemodel"), "-d", photos, "-n", "8",
                                   "--engine", "numpy", "-q", "--report", str(report)])
    assert res.exit_code == 0, res.output
    used, ref = json.loads(report.read_text())["options"], magic.InitOptions()
    for name in ("init", "within", "between", "beta", "iterations", "damping", "seed"):
        assert used[name] == getattr(ref, name), name
    shown = " ".join(CliRunner().invoke(cli, ["--help"]).output.split())
    for option, value in (("--beta", ref.beta), ("--iterations", ref.iterations), ("--damping", ref.damping),
                          ("--batch-size", ref.batch_size), ("--init", ref.init), ("--seed", ref.seed),
                          ("--mem-limit", ref.mem_limit >> 20), ("--images", SampleSpec.images)):
        m = re.search(re.escape(option) + r"\b.*?\[default: ([^\]]+)\]", shown)
        assert m and m.group(1) == str(value), (option, m and m.group(1))


def test_shared_options_build_the_sample_spec():
    """Both commands' image options reach the command as one SampleSpec: its defaults when not
    given, the given values otherwise; --batch-size, --seed, --engine and --gpu stay separate."""
    got = {}

    @click.command()
    @sample_options
    def probe(sample, batch_size, seed, engine, gpu):
        got.update(sample=sample, batch_size=batch_size, seed=seed, engine=engine, gpu=gpu)

    assert CliRunner().invoke(probe, []).exit_code == 0
    assert got == dict(sample=SampleSpec(), batch_size=magic.InitOptions.batch_size, seed=magic.InitOptions.seed,
                       engine=RunConfig.engine, gpu=None)
    res = CliRunner().invoke(probe, ["-d", "a/*.jpg", "-n", "7", "--mean", "1,2,3", "--scale", "0.5",
                                     "--resize", "64", "--batch-size", "3", "--seed", "9", "--engine", "numpy"])
    assert res.exit_code == 0, res.output
    assert got["sample"] == SampleSpec(data="a/*.jpg", images=7, mean="1,2,3", scale=0.5, resize=64)
    assert (got["batch_size"], got["seed"], got["engine"]) == (3, 9, "numpy")


def test_gpu_is_checked_against_the_engine_auto_selects(small, tmp_path, monkeypatch):
    """Without pycaffe, auto is the numpy engine: --gpu is the same bad option (exit 2) as with
    --engine numpy, since resolve_engine decides both."""
    from caffe_utils import engine
    monkeypatch.setattr(engine, "pycaffe_importable", lambda: False)
    res = CliRunner().invoke(cli, [str(small), "-o", str(tmp_path / "o.caffemodel"), "--gpu", "0"])
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "'--gpu'" in lines[0] and "numpy engine runs on the CPU" in lines[0], lines
    assert not (tmp_path / "o.caffemodel").exists()


def test_run_writes_model_and_table(small, photos, tmp_path):
    out = tmp_path / "init.caffemodel"
    res = CliRunner().invoke(cli, [str(small), "-o", str(out), "-d", photos, "-n", "8", "--batch-size", "4",
                                   "--engine", "numpy", "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert out.exists() and (tmp_path / "r.json").exists()
    assert "rate before" in res.output and "conv1" in res.output and "flatness" in res.output
    import json
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [l["name"] for l in rep["layers"]] == ["conv1", "conv2", "fc1", "fc2"]


def test_user_errors_are_one_line_without_traceback(small, tmp_path):
    res = CliRunner().invoke(cli, [str(small), "-o", str(tmp_path / "o.caffemodel"), "-d", str(tmp_path / "none")])
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0]
    res = CliRunner().invoke(cli, [str(tmp_path / "missing.prototxt"), "-o", "x.caffemodel"])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_entry_points():
    """``python magic_init.py`` and the ``magic-init`` console script (pip install -e .)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, str(root / "magic_init.py"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "Usage: magic_init.py" in res.stdout
    exe = shutil.which("magic-init")
    assert exe, "the magic-init console script is not installed (pip install -e .)"
    res = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--output" in res.stdout


TRAIN_NET = """
name: "train"
layer { name: "data" type: "Data" top: "data" top: "label" data_param { source: "%s" batch_size: 4 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def _raw_lmdb(path, n=6, shape=(3, 20, 24)):
    import lmdb
    import numpy as np
    from caffe_utils.schema import caffe_pb2
    rng = np.random.RandomState(0)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(n):
            pix = rng.randint(0, 255, shape, dtype=np.uint8)
            d = caffe_pb2().Datum(channels=shape[0], height=shape[1], width=shape[2], data=pix.tobytes(), label=i % 3)
            txn.put(f"{i:03d}".encode(), d.SerializeToString())
    env.close()


def test_input_shape_for_a_data_layer_without_crop(photos, tmp_path):
    net = tmp_path / "train.prototxt"
    net.write_text(TRAIN_NET % "no_such_lmdb")
    base = [str(net), "-o", str(tmp_path / "o.caffemodel"), "-d", photos, "-n", "4", "--iterations", "1",
            "--engine", "numpy", "-q"]
    res = CliRunner().invoke(cli, base)
    assert res.exit_code == 1 and "give --input-shape C,H,W" in res.output
    res = CliRunner().invoke(cli, base + ["--input-shape", "3,32,28"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, base + ["--input-shape", "3,32"])
    assert res.exit_code == 2 and "three positive integers" in res.output


def test_input_shape_from_the_lmdbs_first_datum(tmp_path):
    """A train_val net reading an LMDB without crop_size is fed each Datum whole, as Caffe does."""
    _raw_lmdb(tmp_path / "train_lmdb")
    net = tmp_path / "train.prototxt"
    net.write_text(TRAIN_NET % "train_lmdb")
    report = tmp_path / "r.json"
    res = CliRunner().invoke(cli, [str(net), "-o", str(tmp_path / "o.caffemodel"), "-n", "4", "--iterations", "1",
                                   "--engine", "numpy", "-q", "--report", str(report)])
    assert res.exit_code == 0, res.output
    from caffe_utils import netio
    w = netio.read_caffemodel(tmp_path / "o.caffemodel")
    assert w["fc"].blobs[0].shape == (3, 4 * 18 * 22)
