"""Hostile input and failures (issue 6): every user error ends in one clear line on stderr and a
non-zero exit, with no traceback, no output file (nor temporary file) left behind and every input
unchanged; damaged images are skipped and counted once; signals and a full disk leave nothing
partial.

Most cases run the click command in-process (CliRunner keeps stderr apart); the signal and
disk-full cases run ``magic_init.py`` in a subprocess.
"""
from __future__ import annotations

import hashlib
import io
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from magic_init import cli
from nets import SMALL

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("numpy", "caffe")


# ----------------------------------------------------------------------------- helpers

def _hashes(paths: Iterable[Path]) -> Dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders), with their modes."""
    out: Dict[str, str] = {}
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest() + oct(f.stat().st_mode)
    return out


def _listing(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir())


def invoke(args: Sequence[str]) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_lines(res: Result) -> List[str]:
    """stderr lines that are not warnings."""
    return [l for l in res.stderr.splitlines() if l.strip() and not l.startswith("warning:")]


def assert_refused(args: Sequence[str], match: str, inputs: Sequence[Path], outdir: Path,
                   exit_code: Optional[int] = None) -> str:
    """Run the CLI and check the issue's contract for a user error; returns the error line."""
    before = _hashes(inputs)
    listing = _listing(outdir)
    res = invoke(args)
    assert res.exit_code != 0, res.output
    if exit_code is not None:
        assert res.exit_code == exit_code, res.output
    assert res.exc_info is None or res.exc_info[0] is SystemExit, f"uncaught {res.exc_info}"
    assert "Traceback" not in res.output
    lines = error_lines(res)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("magic_init.py: error: "), lines[0]
    assert match in lines[0], lines[0]
    assert res.stdout == "", res.stdout
    assert _listing(outdir) == listing, "a file was left in the output folder"
    assert _hashes(inputs) == before, "an input changed"
    return lines[0]


def _png_with_size(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims ``width`` x ``height`` (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _rgb(rng: np.random.RandomState, h: int = 60, w: int = 70) -> Image.Image:
    return Image.fromarray(rng.randint(0, 256, (h, w, 3), np.uint8))


@pytest.fixture
def work(tmp_path):
    """A net, a folder of 6 photos-like images, and an empty output folder."""
    (tmp_path / "small.prototxt").write_text(SMALL)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.RandomState(0)
    for i in range(6):
        _rgb(rng).save(imgs / f"{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    return tmp_path


def _base(work: Path, *extra, engine: str = "numpy") -> List[str]:
    return [work / "small.prototxt", "-o", work / "out" / "init.caffemodel", "-d", work / "imgs", "-n", "4",
            "--batch-size", "2", "--iterations", "2", "--engine", engine, "-q", *extra]


def _inputs(work: Path) -> List[Path]:
    return [p for p in work.iterdir() if p.name != "out"]


def _save_weights(work: Path, name: str = "w.caffemodel", mutate=None) -> Path:
    """A caffemodel of the small net written by the tool itself (optionally mutated)."""
    res = invoke(_base(work, "-o", work / name))
    assert res.exit_code == 0, res.output
    path = work / name
    if mutate is not None:
        from caffe_utils import netio
        weights = netio.read_caffemodel(path)
        params = {n: [np.array(b) for b in lw.blobs] for n, lw in weights.items() if lw.blobs}
        mutate(params)
        netio.write_caffemodel(path, netio.read_net(work / "small.prototxt"), params)
    return path


# ----------------------------------------------------------------------------- paths and options

def test_missing_and_wrong_kind_of_paths(work):
    out = work / "out"
    (work / "adir.prototxt").mkdir()
    (work / "adir.caffemodel").mkdir()
    inputs = _inputs(work)
    cases = [
        ([work / "missing.prototxt", "-o", out / "x.caffemodel"], "'PROTOTXT'"),
        (_base(work, "-w", work / "missing.caffemodel"), "'--weights'"),
        (_base(work, "-d", work / "missing"), "does not exist"),
        (_base(work, "-d", str(work / "nothing" / "*.jpg")), "matches no files"),
        ([work / "adir.prototxt", "-o", out / "x.caffemodel"], "is a directory"),
        (_base(work, "-w", work / "adir.caffemodel"), "is a directory"),
        (_base(work, "--root", work / "small.prototxt"), "is a file"),
        (_base(work, "-o", out), "is a directory"),
        (_base(work, "-o", work / "nodir" / "x.caffemodel"), "does not exist"),
        (_base(work, "-o", work / "small.prototxt" / "x.caffemodel"), "is a file, not a folder"),
        (_base(work, "--report", out / "r.json", "--plot", out / "r.json"), "same file"),
        (_base(work, "-o", work / "small.prototxt"), "network definition"),
        (_base(work, "--report", work / "small.prototxt"), "network definition"),
    ]
    for args, match in cases:
        line = assert_refused(args, match, inputs, out)
        assert "--help" in line or "'" in line  # names the option or the file


def test_unwritable_output_folder(work):
    if os.geteuid() == 0:
        target = Path("/proc") / "init.caffemodel"  # not creatable, even for root
    else:
        ro = work / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "init.caffemodel"
    assert_refused(_base(work, "-o", target), "not writable", _inputs(work), work / "out")
    assert_refused(_base(work, "--report", target.with_suffix(".json")), "not writable", _inputs(work),
                   work / "out")


@pytest.mark.parametrize("args,match", [
    (["-n", "-5"], "'-n' / '--images': must be positive"),
    (["-n", "0"], "must be positive"),
    (["--batch-size", "0"], "'--batch-size': must be positive"),
    (["--damping", "0"], "in (0, 1]"),
    (["--damping", "1.5"], "in (0, 1]"),
    (["--damping", "-0.5"], "in (0, 1]"),
    (["--iterations", "-1"], "'--iterations'"),
    (["--mem-limit", "0"], "'--mem-limit'"),
    (["--resize", "0"], "'--resize'"),
    (["--seed", "-1"], "'--seed'"),
    (["--seed", str(2 ** 32)], "'--seed'"),
    (["-t", "bogus"], "'-t' / '--init'"),
    (["--engine", "tpu"], "'--engine'"),
    (["--gpu", "-1"], "'--gpu'"),
    (["--gpu", "0"], "numpy engine runs on the CPU"),
    (["--bogus-option"], "No such option"),
])
def test_options_out_of_range(work, args, match):
    line = assert_refused(_base(work, *args), match, _inputs(work), work / "out", exit_code=2)
    assert line.endswith("(see 'magic_init.py --help')")


def test_gpu_with_cpu_only_caffe(work, caffe):
    from caffe_utils.engine.caffe_net import caffe_has_cuda
    if caffe_has_cuda(caffe):
        pytest.skip("this Caffe has CUDA; the CPU-only refusal cannot be shown here")
    assert_refused(_base(work, "--gpu", "0", engine="caffe"), "CPU-only", _inputs(work), work / "out")


@pytest.mark.parametrize("mean,match", [
    ("1,2", "2 mean values"),
    ("a,b,c", "--mean 'a,b,c'"),
    ("missing.binaryproto", "does not exist"),
])
def test_bad_mean(work, mean, match):
    assert_refused(_base(work, "--mean", mean), match, _inputs(work), work / "out")


# ----------------------------------------------------------------------------- prototxt

BROKEN_NETS = {
    "syntax": (SMALL.replace("kernel_size: 5", "kernel_size 5 }"), "small.prototxt:4:"),
    "unknown field": (SMALL.replace("convolution_param { num_output: 12", "convolutin_param { num_output: 12"),
                      'no field named "convolutin_param"'),
    "unknown layer type": (SMALL.replace('"Softmax"', '"FancyLayer"'), "'FancyLayer'"),
    "bottom before produced": (SMALL.replace('bottom: "pool1" top: "conv2"', 'bottom: "fc1" top: "conv2"'),
                               "'fc1'"),
    "no input": ("\n".join(l for l in SMALL.splitlines() if '"Input"' not in l), "no input"),
    "no affine layer": ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 '
                        'dim: 48 dim: 48 } } }\nlayer { name: "r" type: "ReLU" bottom: "data" top: "r" }',
                        "no Convolution, InnerProduct or Deconvolution"),
    "kernel larger than input": (SMALL.replace("kernel_size: 5 stride: 2", "kernel_size: 99 stride: 2"),
                                 "layer 'conv1'"),
    "four-channel input": (SMALL.replace("dim: 1 dim: 3 dim: 48", "dim: 1 dim: 4 dim: 48"), "4 channels"),
    "binary": ("\x00\x01\x02\xff", "not a text file"),
    # 64 blobs of 2x16x6000x6000 floats (each under Caffe's INT_MAX elements): ~590 GB with diffs
    "too big for memory": ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 '
                           'dim: 6000 dim: 6000 } } }\n' + "".join(
                               f'layer {{ name: "c{i}" type: "Convolution" bottom: "{"data" if i == 0 else f"c{i - 1}"}" '
                               f'top: "c{i}" convolution_param {{ num_output: 16 kernel_size: 1 bias_term: false }} }}\n'
                               for i in range(64)), "GiB"),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", sorted(BROKEN_NETS))
def test_broken_prototxt(work, case, engine, request):
    if engine == "caffe":
        request.getfixturevalue("caffe")
    text, match = BROKEN_NETS[case]
    (work / "small.prototxt").write_bytes(text.encode("latin-1"))
    line = assert_refused(_base(work, engine=engine), match, _inputs(work), work / "out")
    if case == "syntax":  # line and column
        assert "small.prototxt:4:" in line


# ----------------------------------------------------------------------------- caffemodel

def test_damaged_caffemodels(work):
    good = _save_weights(work).read_bytes()
    rng = np.random.RandomState(1)
    files = {
        "truncated": (good[:len(good) // 2], "truncated"),
        "empty": (b"", "is empty"),
        "random": (rng.randint(0, 256, 5000, np.uint8).tobytes(), "caffemodel"),
        "prototxt": (SMALL.encode(), "looks like a text prototxt"),
    }
    for name, (data, match) in files.items():
        (work / f"{name}.caffemodel").write_bytes(data)
    for name, (data, match) in files.items():
        assert_refused(_base(work, "-w", work / f"{name}.caffemodel"), match, _inputs(work), work / "out")


def test_weights_that_do_not_fit(work):
    def wrong_shape(params):
        params["fc1"][0] = np.zeros((21, 1936), np.float32)

    def nan(params):
        params["conv2"][0][0, 0, 0, 0] = np.nan

    def inf(params):
        params["fc2"][1][3] = np.inf

    def no_bias(params):
        params["fc2"] = params["fc2"][:1]

    _save_weights(work, "shape.caffemodel", wrong_shape)
    _save_weights(work, "nan.caffemodel", nan)
    _save_weights(work, "inf.caffemodel", inf)
    _save_weights(work, "nobias.caffemodel", no_bias)
    inputs = _inputs(work)
    line = assert_refused(_base(work, "-w", work / "shape.caffemodel"), "layer 'fc1'", inputs, work / "out")
    assert "(21, 1936)" in line and "(20, 1936)" in line
    assert_refused(_base(work, "-w", work / "nan.caffemodel"), "layer 'conv2' holds NaN or Inf", inputs, work / "out")
    assert_refused(_base(work, "-w", work / "inf.caffemodel"), "layer 'fc2' holds NaN or Inf", inputs, work / "out")
    assert_refused(_base(work, "-w", work / "nobias.caffemodel"), "layer 'fc2' has 1 blobs", inputs, work / "out")


def test_output_equal_to_weights_needs_force(work):
    weights = _save_weights(work)
    assert_refused(_base(work, "-w", weights, "-o", weights), "--force", _inputs(work), work / "out")
    res = invoke(_base(work, "-w", weights, "-o", weights, "--force"))
    assert res.exit_code == 0, res.output
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------------------- images

def _hostile_folder(folder: Path) -> Dict[str, int]:
    """Good and damaged images of every kind the issue lists; returns the expected counts."""
    folder.mkdir()
    rng = np.random.RandomState(2)
    for i in range(3):
        _rgb(rng).save(folder / f"good{i}.png")
    _rgb(rng).convert("L").save(folder / "grey.png")
    rgba = _rgb(rng).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.randint(0, 256, (60, 70), np.uint8)))
    rgba.save(folder / "rgba.png")
    Image.fromarray(rng.randint(0, 65536, (60, 70)).astype(np.uint16)).save(folder / "sixteen.png")
    _rgb(rng).convert("P", palette=Image.ADAPTIVE).save(folder / "palette.gif")
    _rgb(rng).convert("CMYK").save(folder / "cmyk.jpg")
    _rgb(rng, 9, 7).save(folder / "tiny.png")  # smaller than the 48x48 crop
    buf = io.BytesIO()
    _rgb(rng).save(buf, "JPEG")
    (folder / "corrupt.jpg").write_bytes(buf.getvalue()[:200] + b"\xff\x00" * 50)
    (folder / "empty.png").write_bytes(b"")
    (folder / "bomb.png").write_bytes(_png_with_size(100_000, 100_000))
    (folder / "big.png").write_bytes(_png_with_size(9_000, 8_000))  # 72 Mpx: under PIL's limit, over ours
    (folder / "text.jpg").write_text("not an image\n")
    (folder / "notes.txt").write_text("ignored: not an image extension\n")
    (folder / "sub.jpg").mkdir()  # a folder with an image name
    skipped = 5
    if os.geteuid() != 0:  # root reads any file: a permission problem cannot be made for it
        _rgb(rng).save(folder / "locked.png")
        (folder / "locked.png").chmod(0)
        skipped += 1
    return {"usable": 9, "skipped": skipped}


def test_damaged_and_odd_images_are_skipped_and_counted_once(work):
    counts = _hostile_folder(work / "mixed")
    before = _hashes(_inputs(work))
    res = invoke(_base(work, "-d", work / "mixed", "-n", "12", "--report", work / "out" / "r.json"))
    assert res.exit_code == 0, res.output
    warnings = [l for l in res.stderr.splitlines() if l.startswith("warning:")]
    skipped = [l for l in warnings if "skipped" in l]
    assert len(skipped) == 1 and f"skipped {counts['skipped']} unreadable image(s)" in skipped[0], res.stderr
    assert any(f"only {counts['usable']} usable image(s)" in l for l in warnings), res.stderr
    assert _hashes(_inputs(work)) == before
    from caffe_utils import netio
    for lw in netio.read_caffemodel(work / "out" / "init.caffemodel").values():
        for b in lw.blobs:
            assert np.all(np.isfinite(b))


def test_decompression_bombs_are_refused_without_decoding():
    import resource
    from caffe_utils import images
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for w, h in ((100_000, 100_000), (9_000, 8_000), (70_000, 1_000)):
        with pytest.raises(images.ImageReadError, match="pixels|readable"):
            images.decode_bytes(_png_with_size(w, h), "bomb.png")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50, f"refusing the bombs cost {grown_mb:.0f} MB"


def test_image_list_with_missing_files_and_spaces(work):
    spaced = work / "my photos"
    spaced.mkdir()
    rng = np.random.RandomState(3)
    for i in range(3):
        _rgb(rng).save(spaced / f"holiday {i}.png")
    (work / "sub.jpg").mkdir()
    lines = [f"my photos/holiday {i}.png {i}" for i in range(3)] + ["missing.png 3", "sub.jpg 4", "",
                                                                    "# a comment", "imgs/0.png"]
    (work / "list.txt").write_text("\n".join(lines) + "\n")
    res = invoke(_base(work, "-d", work / "list.txt", "-n", "10"))  # more than there are: all are tried
    assert res.exit_code == 0, res.output
    skipped = [l for l in res.stderr.splitlines() if "skipped" in l]
    assert len(skipped) == 1 and "skipped 2 unreadable" in skipped[0], res.stderr
    assert "only 4 usable image(s) for -n 10" in res.stderr
    # every line missing: an error that names the list's problem
    (work / "gone.txt").write_text("missing1.png 0\nmissing2.png 1\n")
    assert_refused(_base(work, "-d", work / "gone.txt"), "only 0 usable image(s)", _inputs(work), work / "out")


def test_too_few_images(work):
    few = work / "few"
    few.mkdir()
    _rgb(np.random.RandomState(4)).save(few / "one.png")
    (few / "broken.png").write_bytes(b"\x89PNG garbage")
    line = assert_refused(_base(work, "-d", few), "only 1 usable image(s)", _inputs(work), work / "out")
    assert "at least 2" in line and "1 unreadable" in line
    # above the minimum: a warning, and the run goes on
    _rgb(np.random.RandomState(5)).save(few / "two.png")
    res = invoke(_base(work, "-d", few, "-n", "8"))
    assert res.exit_code == 0, res.output
    assert "only 2 usable image(s) for -n 8" in res.stderr
    # nothing usable at all
    (few / "one.png").write_bytes(b"")
    (few / "two.png").write_bytes(b"")
    assert_refused(_base(work, "-d", few), "only 0 usable image(s)", _inputs(work), work / "out")


def test_all_constant_images_warn_and_stay_finite(work):
    flat = work / "flat"
    flat.mkdir()
    for i in range(4):
        Image.fromarray(np.full((60, 70, 3), 128, np.uint8)).save(flat / f"{i}.png")
    for init in ("kmeans", "gaussian"):
        res = invoke(_base(work, "-d", flat, "-t", init))
        assert res.exit_code == 0, res.output
        assert "constant" in res.stderr
        from caffe_utils import netio
        for lw in netio.read_caffemodel(work / "out" / "init.caffemodel").values():
            for b in lw.blobs:
                assert np.all(np.isfinite(b)), lw.name


# ----------------------------------------------------------------------------- signals and disk full

def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GLOG_minloglevel", "2")
    return env


def _slow_args(work: Path, out: Path) -> List[str]:
    """A run of the small net long enough to interrupt in each stage."""
    many = work / "many"
    many.mkdir(exist_ok=True)
    rng = np.random.RandomState(6)
    for i in range(40):
        _rgb(rng, 300, 400).save(many / f"{i}.png")
    return [sys.executable, str(ROOT / "magic_init.py"), str(work / "small.prototxt"), "-o", str(out),
            "-d", str(many), "-n", "160", "--batch-size", "8", "--engine", "numpy", "--iterations", "10",
            "--report", str(out.with_suffix(".json"))]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("stage", ["loading images", "within-layer", "between-layer", "writing"])
def test_signal_in_each_stage_leaves_no_partial_file(work, stage, sig):
    out = work / "out" / "init.caffemodel"
    # as from a terminal: a job started in the background inherits SIGINT ignored, and Python
    # (like any program) keeps it ignored
    proc = subprocess.Popen(_slow_args(work, out), stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=_env(), cwd=str(work),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = b""
    deadline = time.time() + 300
    try:
        while stage.encode() not in seen:
            assert time.time() < deadline, seen.decode()
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stderr.fileno(), 4096)
                assert chunk or proc.poll() is None, f"exited before '{stage}': {seen.decode()}"
                seen += chunk
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=120)[1], None
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = (seen + (rest or b"")).decode()
    assert "Traceback" not in stderr, stderr
    left = _listing(work / "out")
    if proc.returncode == 0:  # finished before the signal arrived (only possible while writing)
        assert stage == "writing", stderr
        assert left == ["init.caffemodel", "init.json"]
        return
    assert proc.returncode == 128 + sig, stderr
    last = [l for l in stderr.splitlines() if l.strip()][-1]
    assert f"interrupted ({signal.Signals(sig).name})" in last, stderr
    if "was written before it" in last:  # the signal came during the final renames
        assert stage == "writing" and left == ["init.caffemodel", "init.json"]
        from caffe_utils import netio
        assert "fc2" in netio.read_caffemodel(out)
    else:
        assert "no output written" in last
        assert left == [], f"left behind: {left}"


def _unshare_works() -> Optional[str]:
    if not shutil.which("unshare"):
        return "no unshare command"
    res = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                          "mount -t tmpfs -o size=64k none /mnt"], capture_output=True, text=True)
    return None if res.returncode == 0 else res.stderr.strip()


def test_disk_full_while_writing_leaves_nothing(work):
    """The output folder is a 64 KB tmpfs (in a private mount namespace): writing the ~170 KB
    caffemodel hits ENOSPC."""
    why = _unshare_works()
    if why:
        pytest.skip(f"cannot mount a small tmpfs here: {why}")
    full = work / "full"
    full.mkdir()
    cmd = [sys.executable, str(ROOT / "magic_init.py"), str(work / "small.prototxt"), "-o",
           str(full / "init.caffemodel"), "-d", str(work / "imgs"), "-n", "4", "--batch-size", "2", "--engine",
           "numpy", "-q", "--report", str(full / "init.json")]
    script = (f"mount -t tmpfs -o size=64k none '{full}' && "
              f"{' '.join(repr(c) for c in cmd)}; rc=$?; echo \"LEFT:$(ls -A '{full}' | tr '\\n' ' ')\"; exit $rc")
    before = _hashes(_inputs(work))
    res = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    errors = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(errors) == 1 and "No space left on device" in errors[0], res.stderr
    assert "free some space" in errors[0] or "free space" in errors[0]
    assert res.stdout.strip().endswith("LEFT:"), res.stdout  # nothing, not even a temporary file
    assert _hashes(_inputs(work)) == before


def test_outputs_follow_the_umask(work):
    """Outputs are created like any file (0666 & ~umask), not with a temporary file's 0600."""
    old = os.umask(0o022)
    try:
        res = invoke(_base(work, "--report", work / "out" / "r.json"))
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    for name in ("init.caffemodel", "r.json"):
        assert (work / "out" / name).stat().st_mode & 0o777 == 0o644, name
