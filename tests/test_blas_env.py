"""OpenBLAS's idle threads: importing caffe_utils sets OPENBLAS_THREAD_TIMEOUT (unless the user
did) before the CLI loads numpy's OpenBLAS, and the benchmarks run an older tree without it."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import caffe_utils
from scripts.support import benchrun

ROOT = Path(__file__).resolve().parent.parent
VAR = "OPENBLAS_THREAD_TIMEOUT"


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != VAR}
    env.update(extra)
    return env


def _imported(code: str, **extra: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT),
                         env=_env(**extra))
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_importing_the_package_sets_the_timeout_unless_the_user_did():
    code = f"import os, caffe_utils; print(os.environ.get('{VAR}'), caffe_utils.OPENBLAS_TIMEOUT_SET_HERE)"
    assert _imported(code) == "4 True"
    assert _imported(code, **{VAR: "7"}) == "7 False"


@pytest.mark.parametrize("program", ["magic_init.py", "scripts/fashion_mnist.py", "scripts/imagenet_train.py",
                                     "scripts/voc_classification.py"])
def test_programs_that_initialize_import_the_package_before_numpy(program):
    """OpenBLAS reads the variable when it is loaded, which importing numpy does. (The
    benchmark workers import the package first inside their worker functions.)"""
    res = subprocess.run([sys.executable, "-X", "importtime", program, "--help"], capture_output=True,
                         text=True, cwd=str(ROOT), env=_env())
    assert res.returncode == 0, res.stderr
    order = [line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")]
    assert order.index("caffe_utils") < order.index("numpy")


def test_benchmark_and_comparison_runs_get_the_timeout_only_from_their_own_tree(monkeypatch):
    """Set by this process's package: left out, so that an older tree runs as it did; set by the
    user: kept for every tree. For the benchmarks' workers and compare_outputs.py's runs."""
    spec = importlib.util.spec_from_file_location("compare_outputs", ROOT / "scripts" / "compare_outputs.py")
    compare = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, compare)
    spec.loader.exec_module(compare)
    monkeypatch.setenv(VAR, "4")
    for env_of in (benchrun.worker_env, compare.tree_env):
        monkeypatch.setattr(caffe_utils, "OPENBLAS_TIMEOUT_SET_HERE", True)
        assert VAR not in env_of(ROOT)
        monkeypatch.setattr(caffe_utils, "OPENBLAS_TIMEOUT_SET_HERE", False)
        assert env_of(ROOT)[VAR] == "4"
