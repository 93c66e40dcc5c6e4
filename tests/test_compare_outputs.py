"""scripts/compare_outputs.py on a small inline net: same code gives identical outputs, other
output gives DIFFERENT (exit 1) with the differing blobs, and each run uses its own tree."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from nets import SMALL

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("compare_outputs", ROOT / "scripts" / "compare_outputs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


co = _script()

# A copy of the project whose magic_init.py runs the real one with the next seed: a stand-in for
# a change that alters the outputs.
SEED_SHIFT = '''import runpy, sys
from pathlib import Path
from typing import Optional
i = sys.argv.index("--seed")
sys.argv[i + 1] = str(int(sys.argv[i + 1]) + 1)
runpy.run_path(str(Path(__file__).with_name("real_magic_init.py")), run_name="__main__")
'''


@pytest.fixture
def setup(tmp_path):
    """A tiny job (the small net, k-means), its inputs and an output folder."""
    net = tmp_path / "small.prototxt"
    net.write_text(SMALL)
    photos = co.photo_files("skimage")
    inputs = co.Inputs(co.write_image_list(photos, tmp_path / "images.txt"), 8, 0)
    out = tmp_path / "out"
    out.mkdir()
    return co.Job("tiny-kmeans", net, ("-t", "kmeans", "--iterations", "2")), inputs, out


def _copy_tree(dest: Path, magic_init: Optional[str] = None) -> Path:
    """A second tree: a copy of caffe_utils, and magic_init.py (or the given stand-in for it)."""
    shutil.copytree(ROOT / "caffe_utils", dest / "caffe_utils", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "magic_init.py", dest / "real_magic_init.py")
    (dest / "magic_init.py").write_text(magic_init or (ROOT / "magic_init.py").read_text())
    return dest


def test_the_same_code_gives_identical_outputs(setup, capsys):
    job, inputs, out = setup
    assert co.compare_all([job], (ROOT, ROOT), inputs, out) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "tiny-kmeans" and "identical" in lines[0]
    ref, work = lines[0].split()[2], lines[0].split()[4]
    assert ref == work and len(ref) == 12
    assert lines[-1].startswith("summary: 1/1 pairs identical")


def test_a_change_of_output_is_different_and_exit_1(setup, tmp_path, capsys):
    job, inputs, out = setup
    other = _copy_tree(tmp_path / "other", SEED_SHIFT)
    assert co.compare_all([job], (other, ROOT), inputs, out) == 1
    text = capsys.readouterr().out
    first = text.splitlines()[0]
    assert "DIFFERENT" in first and first.split()[2] != first.split()[4]
    assert "conv1[0]: max abs difference" in text      # the diagnostic names the blob
    assert "summary: 0/1 pairs identical, 1 DIFFERENT" in text


def test_describe_differences_sees_one_changed_value(setup):
    job, inputs, out = setup
    a = out / "a.caffemodel"
    co.run_job(ROOT, job, inputs, a)
    from caffe_utils import netio
    weights = netio.read_caffemodel(a)
    params = {name: [b.copy() for b in lw.blobs] for name, lw in weights.items()}
    params["fc1"][1][3] += 0.25
    b = out / "b.caffemodel"
    netio.write_caffemodel(b, netio.read_net(str(job.prototxt)), params)
    digests, same, diffs = co.compare_files(a, b)
    assert not same and digests[0] != digests[1]
    assert diffs == ["fc1[1]: max abs difference 0.25 (1 of 20 values)"]


def test_a_failing_run_is_an_error_with_its_stderr(setup, tmp_path):
    job, inputs, out = setup
    bad = co.Inputs(tmp_path / "missing.txt", inputs.images, inputs.seed)
    with pytest.raises(co.CompareError, match="(?s)tiny-kmeans failed.*error: data source .*missing.txt. does not exist"):
        co.compare_job(job, (ROOT, ROOT), bad, out)


def test_each_run_imports_its_own_tree(tmp_path, monkeypatch):
    """PYTHONPATH puts the tree first, ahead of another caffe_utils already on the path."""
    decoy = tmp_path / "decoy" / "caffe_utils"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(decoy.parent))
    assert co.check_imports(ROOT) == ROOT / "caffe_utils" / "__init__.py"
    other = _copy_tree(tmp_path / "other")
    assert co.check_imports(other) == (other / "caffe_utils" / "__init__.py").resolve()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(co.CompareError, match="imported from .*decoy.*not from this tree"):
        co.check_imports(empty)


def test_the_worktree_is_removed_even_on_error(tmp_path):
    def registered():
        return subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
    with pytest.raises(RuntimeError):
        with co.worktree("HEAD", tmp_path) as tree:
            assert (tree / "magic_init.py").is_file() and str(tree) in registered()
            raise RuntimeError("stop")
    assert not tree.exists() and str(tree) not in registered()
