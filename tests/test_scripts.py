"""The experiment scripts run end to end in their reduced modes."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # importlib's recipe: a dataclass looks its module up there
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


def test_damping_sweep_reduced(capsys):
    assert _script("damping_sweep").main(["--reduced", "--engine", "numpy", "--damping", "0.5", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0.5"], ["1"])]
    assert [r[0] for r in rows] == ["0.5", "1"]
    for r in rows:
        assert r[1] == "2" or r[2] == "yes"       # two rounds, unless the 1% stop came first
        before, after, held = float(r[4]), float(r[6]), float(r[7])
        assert after < before / 10 and held < before / 10
    # the flatness of every round is listed; a full step flattens more in one round than alpha 0.5
    per_round = [[float(x) for x in line.split(":")[1].split()] for line in out.splitlines()
                 if "after each round" in line]
    assert len(per_round) == 2 and all(len(p) == 2 for p in per_round)
    assert per_round[1][0] < per_round[0][0]


def _tiny_voc(root: Path, n_trainval=8, n_test=4):
    """A VOC2007 folder layout built from real photos, with made-up class annotations."""
    from PIL import Image

    from scripts.support.datasets import opencv_doc_photos
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    photos = [p for p in opencv_doc_photos() if p.suffix.lower() in (".jpg", ".png")][:n_trainval + n_test]
    classes = _script("voc_classification").CLASSES
    ids = []
    for i, photo in enumerate(photos):
        image_id = f"{i:06d}"
        ids.append(image_id)
        Image.open(photo).convert("RGB").save(voc / "JPEGImages" / f"{image_id}.jpg")
        objs = [(classes[i % 3], 0), (classes[3 + i % 2], 1 if i % 4 == 0 else 0)]
        body = "".join(f"<object><name>{c}</name><difficult>{d}</difficult></object>" for c, d in objs)
        (voc / "Annotations" / f"{image_id}.xml").write_text(f"<annotation><filename>{image_id}.jpg</filename>"
                                                             f"{body}</annotation>")
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids[:n_trainval]) + "\n")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids[n_trainval:]) + "\n")
    return root / "VOCdevkit"


def test_voc07_ap_by_hand():
    import numpy as np
    ap = _script("voc_classification").voc07_ap(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, -1, 1, 0]))
    # difficult ignored: ranks 1 (tp), 2 (fp), 3 (tp) -> recall .5 at precision 1, recall 1 at 2/3
    assert ap == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)


def test_voc_classification_reduced(caffe, tmp_path):
    mod = _script("voc_classification")
    devkit = _tiny_voc(tmp_path)
    results = tmp_path / "voc.tsv"
    for init in ("kmeans", "caffe"):
        assert mod.main([str(devkit), "--net", "caffenet", "--init", init, "--reduced", "--batch", "4",
                         "--results", str(results)]) == 0
    lines = results.read_text().splitlines()
    assert len(lines) == 3
    header = lines[0].split("\t")
    assert header[:7] == ["date", "net", "init", "between", "weights", "iterations", "mAP"]
    assert header[-20:] == list(mod.CLASSES)
    for line, init in zip(lines[1:], ("kmeans", "caffe")):
        cells = line.split("\t")
        assert cells[1:3] == ["caffenet", init] and cells[5] == "2"
        assert 0.0 <= float(cells[6]) <= 100.0
    assert mod.main([str(tmp_path), "--reduced", "--results", str(results)]) == 1  # not a VOCdevkit


def _tiny_lmdb(path: Path, photos, size=256):
    """An LMDB of raw (not encoded) Caffe Datums, BGR uint8, labels 0-3, as convert_imageset makes."""
    import lmdb
    import numpy as np
    from PIL import Image

    from caffe_utils.schema import caffe_pb2
    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for i, photo in enumerate(photos):
            img = np.asarray(Image.open(photo).convert("RGB").resize((size, size)))[:, :, ::-1]
            datum = caffe_pb2().Datum(channels=3, height=size, width=size, label=i % 4,
                                      data=np.ascontiguousarray(img.transpose(2, 0, 1)).tobytes())
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()


def test_imagenet_train_reduced(caffe, tmp_path):
    from scripts.support.datasets import opencv_doc_photos
    mod = _script("imagenet_train")
    photos = [p for p in opencv_doc_photos() if p.suffix.lower() == ".jpg"][:12]
    _tiny_lmdb(tmp_path / "train_lmdb", photos[:8])
    _tiny_lmdb(tmp_path / "val_lmdb", photos[8:12])
    (tmp_path / "train.txt").write_text("".join(f"{p.name} {i % 4}\n" for i, p in enumerate(photos[:8])))
    results = tmp_path / "imagenet.tsv"
    for init in ("kmeans", "caffe"):
        assert mod.main(["--net", "caffenet", "--train-lmdb", str(tmp_path / "train_lmdb"), "--val-lmdb",
                         str(tmp_path / "val_lmdb"), "--init-list", str(tmp_path / "train.txt"), "--root",
                         str(photos[0].parent), "--init", init, "--reduced", "--results", str(results)]) == 0
    lines = results.read_text().splitlines()
    assert lines[0].split("\t")[:7] == ["date", "net", "init", "between", "iterations", "top-1", "top-5"]
    assert [l.split("\t")[2] for l in lines[1:]] == ["kmeans", "caffe"]
    for line in lines[1:]:
        top1, top5 = float(line.split("\t")[5]), float(line.split("\t")[6])
        assert 0 <= top1 <= top5 <= 100
    assert mod.main(["--train-lmdb", str(tmp_path), "--val-lmdb", str(tmp_path), "--init-list",
                     str(tmp_path / "train.txt"), "--reduced", "--results", str(results)]) == 1


def test_fashion_mnist_reduced(caffe, tmp_path):
    out = tmp_path / "fm"
    assert _script("fashion_mnist").main(["--reduced", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["init"] for r in data["runs"]] == ["caffe-gaussian", "ours-kmeans"]
    for r in data["runs"]:
        assert r["finite"] and len(r["loss"]) == 30 and 0.0 <= r["test_accuracy"] <= 1.0
    table = out.with_suffix(".md").read_text()
    assert "| caffe-gaussian |" in table and "| ours-kmeans |" in table
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_bench_engine_fails_loudly(tmp_path):
    """A benchmark whose engine fails says so on stderr and exits non-zero."""
    import subprocess
    import sys
    bad = tmp_path / "bad.prototxt"
    bad.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }\n'
                   'layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 0 } }\n')
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_engine.py"
    res = subprocess.run([sys.executable, "-P", str(script), "--net", str(bad), "--batch", "1", "--repeat", "1"],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert res.returncode == 1
    assert "numpy: failed:" in res.stderr and "No module named" not in res.stderr


def test_bench_corpus_generators_default_to_the_reduced_nets():
    """The sizes the benchmarks pass to resnet50 / mobilenet_v1 leave the CI corpus's text as it was."""
    import corpus
    assert corpus.resnet50() == corpus.resnet50((2, 1, 1, 1), (4, 8, 16, 32), 8, 64, 100)
    for dw in ("Convolution", "DepthwiseConvolution", "ConvolutionDepthwise"):
        assert corpus.mobilenet_v1(dw) == corpus.mobilenet_v1(dw, width_div=8, pairs_512=1, size=64, classes=100)
    full = corpus.mobilenet_v1(width_div=1, pairs_512=5, size=224, classes=1000)
    assert full.count('/dw/bn"') == 13 and "dim: 224" in full and "num_output: 1000" in full
    full = corpus.resnet50((3, 4, 6, 3), (64, 128, 256, 512), 64, 224, 1000)
    assert full.count('name: "bn') == 1 + 16 * 3 + 4  # bn_conv1, 16 blocks of 3, 4 projections
    assert "num_output: 2048" in full and "pool: AVE kernel_size: 7" in full


#: conv 3->4 3x3 pad 1 on 8x8, grouped 1x1 conv 4->4 (2 groups), deconv 4->2 2x2 stride 2, FC 512->10
_TINY_GEMM_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2"
        convolution_param { num_output: 4 kernel_size: 1 group: 2 weight_filler { type: "xavier" } } }
layer { name: "d3" type: "Deconvolution" bottom: "c2" top: "d3"
        convolution_param { num_output: 2 kernel_size: 2 stride: 2 weight_filler { type: "xavier" } } }
layer { name: "fc" type: "InnerProduct" bottom: "d3" top: "fc"
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
"""
#: 2*M*N*K per layer: c1 2*4*64*27, c2 2 groups of 2*2*64*2, d3 2*(2*2*2)*64*4, fc 2*10*1*512
_TINY_GEMM_FLOPS = {"c1": 13824, "c2": 1024, "d3": 4096, "fc": 10240}


def _tiny_net(tmp_path, text=_TINY_GEMM_NET) -> str:
    path = tmp_path / "tiny.prototxt"
    path.write_text(text)
    return str(path)


def test_bench_flops_by_hand(tmp_path):
    from caffe_utils.engine import open_net
    from scripts.support import floor
    net = open_net(_tiny_net(tmp_path), engine="numpy", input_shapes={"data": (3, 3, 8, 8)})
    assert {name: f for name, _, f in floor.forward_flops(net)} == {k: 3 * v for k, v in _TINY_GEMM_FLOPS.items()}
    assert floor.prototxt_forward_flops(_tiny_net(tmp_path)) == sum(_TINY_GEMM_FLOPS.values())  # one image
    assert floor.floor_seconds(2e9, 4.0) == 0.5
    assert 0.1 < floor.sgemm_rate(n=128, seconds=0.05) < 1e5


def test_bench_initialization_floor_by_hand(tmp_path):
    """4 images of the tiny net. c1: 27-dim patches, 4 filters: 94 wanted, 24 per image, m = 96;
    c2: 2 groups of 2-dim patches, 2 filters each: 24 wanted, m = 24 per group; a Deconvolution
    gets no data-driven weights. Calibration: all 4 images (fewer than rate_images)."""
    from scripts.support import floor
    within, numerics, calibration = floor.init_flops(_tiny_net(tmp_path), 4, "kmeans")
    c1 = 2 * 96 * 27 ** 2 + 27 ** 3 // 3 + 10 * 2 * 96 * 27 * 4
    c2 = 2 * (2 * 24 * 2 ** 2 + 2 ** 3 // 3 + 10 * 2 * 24 * 2 * 2)
    assert (within, numerics, calibration) == (4 * 29184, c1 + c2, 3 * 4 * 29184)
    assert floor.init_flops(_tiny_net(tmp_path), 4, "pca")[1] == 96 * 27 ** 2 + 4 * 27 ** 3 // 3 + 2 * (24 * 4 + 10)
    assert floor.init_flops(_tiny_net(tmp_path), 4, "gaussian")[1] == 0
    wide = _tiny_net(tmp_path, _TINY_GEMM_NET.replace("num_output: 4 kernel_size: 3", "num_output: 20 kernel_size: 3"))
    # one image: 64 patches for c1's 20 filters, under the 80 k-means needs (Gaussian); c2: 10-dim, m = 40
    assert floor.init_flops(wide, 1, "kmeans")[1] == 2 * (2 * 40 * 10 ** 2 + 10 ** 3 // 3 + 10 * 2 * 40 * 10 * 2)


def test_bench_work_floor_by_hand():
    """The work floor adds each measured pass's images at one image's forward and backward to
    the initialization floor; a run from a tree that does not report its passes has none."""
    floors = _script("bench_init").Floors({"GEMM floor": 1.0, "initialization floor": 2.0}, 0.25)
    assert floors.work({"passes": 3, "pass_images": 4}) == 2.0 + 3 * 4 * 0.25
    assert floors.work({"passes": 0, "pass_images": 32}) == 2.0
    assert floors.work({"passes": None, "pass_images": None}) is None
    assert type(floors)().work({"passes": 3, "pass_images": 4}) is None


def test_bench_full_size_nets_have_the_published_cost(tmp_path):
    """The named nets' forward GEMM cost matches their papers' multiply-adds (x2 for FLOPs):
    ResNet-50 3.8e9 and ResNet-101 7.6e9 (He et al. Table 1), MobileNet v1 569e6 (Howard et al.
    Table 8)."""
    from scripts.support import benchrun, floor
    for name, madds in (("resnet50", 3.8e9), ("resnet101", 7.6e9), ("mobilenet_v1", 569e6)):
        label, path = benchrun.resolve_net(name, tmp_path)
        assert label == f"{name} (full size)" and Path(path).parent == tmp_path
        assert floor.prototxt_forward_flops(path) == pytest.approx(2 * madds, rel=0.03)
    assert benchrun.resolve_net("caffenet", tmp_path)[1].endswith("models/caffenet/deploy.prototxt")


def test_bench_engine_prints_the_floor_and_both_engines(tmp_path, capsys):
    from caffe_utils.schema import pycaffe_importable
    assert _script("bench_engine").main(["--net", _tiny_net(tmp_path), "--batch", "2", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{3 * 2 * sum(_TINY_GEMM_FLOPS.values()) / 1e9:.4g} GFLOP" in out
    assert "sgemm:" in out and "GFLOP/s" in out
    assert "numpy  forward+backward, batch 2" in out and "x the GEMM floor" in out
    assert ("speed ratio pycaffe/numpy" in out) if pycaffe_importable() else ("caffe: skipped" in out)
    assert "Convolution" not in out
    assert _script("bench_engine").main(["--net", _tiny_net(tmp_path), "--batch", "2", "--repeat", "1",
                                         "--engine", "numpy", "--layers"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"    Convolution +forward \d+\.\d{3} s  backward \d+\.\d{3} s  \(\d+% of the pass\)", out), out
    if not (ROOT / ".git").exists():
        return  # --compare needs a git checkout
    assert _script("bench_engine").main(["--net", _tiny_net(tmp_path), "--batch", "1", "--repeat", "1",
                                         "--engine", "numpy", "--compare", "HEAD"]) == 0
    out = capsys.readouterr().out
    assert "numpy  at " in out and "numpy  on this tree: best" in out and "numpy  ratio new/old:" in out


def test_bench_init_both_engines_and_failure(tmp_path, capsys):
    from caffe_utils.schema import pycaffe_importable
    mod = _script("bench_init")
    assert mod.main(["--net", _tiny_net(tmp_path), "--images", "4", "--iterations", "1", "--engine", "both"]) == 0
    out = capsys.readouterr().out
    assert "floor: one forward + one backward of the 4 images" in out and "sgemm:" in out
    assert "numpy: end to end" in out and "x the GEMM floor" in out and "within-layer" in out
    assert "initialization floor:" in out and "x the initialization floor" in out
    assert re.search(r"    work floor: [\d.e+-]+ s, the initialization floor and \d+ measured pass\(es\) of \d+ images; "
                     r"[\d.]+x it", out), out
    assert ("speed ratio pycaffe/numpy" in out) if pycaffe_importable() else ("caffe: skipped" in out)
    bad = _tiny_net(tmp_path, _TINY_GEMM_NET.replace("num_output: 4 kernel_size: 3", "num_output: 0 kernel_size: 3"))
    assert mod.main(["--net", bad, "--images", "2", "--iterations", "1"]) == 1
    assert "numpy: failed:" in capsys.readouterr().err


def test_bench_init_compare_against_head(tmp_path, capsys):
    """--compare HEAD runs the job on a temporary worktree of HEAD, then here, and removes the worktree."""
    import subprocess
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    mod = _script("bench_init")
    assert mod.main(["--net", _tiny_net(tmp_path), "--images", "2", "--iterations", "1", "--compare", "HEAD",
                     "--target", "100"]) == 0
    out = capsys.readouterr().out
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert f"numpy at {head}: end to end" in out and "numpy on this tree: end to end" in out
    assert "numpy ratio new/old:" in out and "(target 100: met)" in out
    assert re.search(r"target 100: [\d.]+ s, [\d.]+x the work floor of this tree's run", out), out
    trees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert "magic-init-compare-" not in trees
    assert mod.main(["--net", _tiny_net(tmp_path), "--images", "2", "--compare", "no-such-rev"]) == 1
    assert "--compare: failed: git worktree add no-such-rev" in capsys.readouterr().err
    assert mod.main(["--net", _tiny_net(tmp_path), "--images", "2", "--iterations", "1", "--compare", "HEAD",
                     "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("(fastest of runs: ") == 2 and "numpy ratio new/old:" in out
    assert "numpy on this tree, run 2 of 2: " in out
