"""Sample images for the initialization: where they come from and how Caffe would preprocess them.

Sources (:func:`list_source`):

* a glob pattern (``'images/*.jpg'``), or a directory (searched recursively for common image
  types);
* a Caffe image-list file (``path label`` per line, paths relative to ``root``; the label is the
  last space-separated token, so paths may contain spaces, as in Caffe's ImageData layer);
* an LMDB of Caffe ``Datum`` records, encoded (JPEG/PNG bytes) or raw (uint8 CHW, BGR) — needs
  the ``lmdb`` package.

Preprocessing (:class:`Transform`) follows Caffe's data layers: decode to BGR 0..255, resize to
``resize`` x ``resize`` (what ``convert_imageset --resize_*`` does for ImageNet; skipped for LMDB
records, which are stored resized), a random ``crop`` (and optional mirror), subtract the mean
(per-channel values or a mean image, cropped like the data), multiply by ``scale``.

Unreadable, empty, corrupt or oversized (decompression-bomb: over ``MAX_PIXELS``, judged from the
header before any pixel is decoded) files are skipped and counted; the caller reports the count
once. Grey, RGBA, 16-bit, palette and CMYK images are converted. Images over ``REDUCE_PIXELS`` are
reduced by an integer box filter while decoding (JPEG at DCT scale) so a 60-megapixel photo costs
about 200 MB, not gigabytes; their resized pixels then differ slightly from Caffe's direct resize.
Limit: only 2-D images (no video, no multi-frame TIFF beyond the first frame).
"""
from __future__ import annotations

import glob as globlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from caffe_utils.errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".gif"}
#: OpenCV's BGR->grey weights (B, G, R), as Caffe's is_color: false path uses them
GREY_WEIGHTS = (0.114, 0.587, 0.299)
_LABEL = re.compile(r"-?[0-9]+")  # an integer label (ASCII digits, as Caffe's atoi reads)
MAX_PIXELS = 64_000_000  # refuse larger images before decoding them (decompression bombs)
REDUCE_PIXELS = 16_000_000  # larger images are box-reduced by an integer factor right after decoding


@dataclass
class Record:
    """One sample: a file path, or an LMDB key with its value bytes."""
    path: Optional[Path] = None
    label: Optional[int] = None
    datum: Optional[bytes] = None
    key: str = ""

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"lmdb key {self.key}"


def _is_lmdb(path: Path) -> bool:
    return (path.is_dir() and (path / "data.mdb").exists()) or path.name == "data.mdb"


def _is_image_list(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def list_source(source: Union[str, Path], root: Optional[Union[str, Path]] = None) -> List[Record]:
    """The records of ``source`` (see module docstring), in a stable order."""
    spec = str(source)
    path = Path(spec)
    if any(ch in spec for ch in "*?[") and not path.exists():
        files = sorted(Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"the pattern '{spec}' matches no files; check it (quote it so the shell "
                            "does not expand it)")
        return [Record(path=p) for p in files]
    if not path.exists():
        raise DataError(f"data source '{spec}' does not exist; pass a folder, a glob, an image list or an LMDB")
    if _is_lmdb(path):
        return _list_lmdb(path if path.is_dir() else path.parent)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"folder '{spec}' contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return [Record(path=p) for p in files]
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return [Record(path=path)]
    if _is_image_list(path):
        return _list_image_list(path, root)
    raise DataError(f"data source '{spec}' is neither an image, a folder, an image list nor an LMDB")


def _list_image_list(path: Path, root: Optional[Union[str, Path]]) -> List[Record]:
    base = Path(root) if root is not None else path.parent
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image list '{path}': {exc.strerror}; check its permissions") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"image list '{path}' line {line} is not UTF-8 text; save the list as UTF-8") from exc
    out: List[Record] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "\0" in line:
            raise DataError(f"image list '{path}' line {lineno} contains a NUL byte; "
                            "write one 'path label' per line as plain text")
        name, label = line, None
        head, sep, tail = line.rpartition(" ")
        if sep and _LABEL.fullmatch(tail):
            name, label = head.rstrip(), int(tail)
        p = Path(name)
        out.append(Record(path=p if p.is_absolute() else base / p, label=label, key=f"{path.name}:{lineno}"))
    if not out:
        raise DataError(f"image list '{path}' has no entries; write one 'path label' per line")
    return out


def lmdb_image_shape(source: Union[str, Path]) -> Optional[Tuple[int, int, int]]:
    """(C, H, W) of the first Datum when ``source`` is an LMDB (what Caffe's Data layer feeds
    without a crop), else None."""
    path = Path(source)
    if not _is_lmdb(path):
        return None
    first = _list_lmdb(path if path.is_dir() else path.parent, limit=1)[0]
    img = load_record(first)[0]
    return (1 if img.ndim == 2 else int(img.shape[2]), int(img.shape[0]), int(img.shape[1]))


def _list_lmdb(path: Path, limit: Optional[int] = None) -> List[Record]:
    try:
        import lmdb
    except ImportError as exc:
        raise DataError(f"'{path}' is an LMDB; reading it needs the lmdb package: pip install lmdb") from exc
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True)
    except lmdb.Error as exc:
        raise DataError(f"cannot open LMDB '{path}': {exc}") from exc
    out = []
    with env.begin() as txn:
        for key, value in txn.cursor():
            out.append(Record(datum=bytes(value), key=key.decode("utf-8", "replace")))
            if limit is not None and len(out) >= limit:
                break
    env.close()
    if not out:
        raise DataError(f"LMDB '{path}' is empty")
    return out


class ImageReadError(DataError):
    """One sample could not be decoded (the caller skips it and counts it)."""


def _pil_to_bgr(img) -> np.ndarray:
    from PIL import Image
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        hi = arr.max() if arr.size else 0
        scale = 255.0 / 65535.0 if hi > 255 else 1.0
        arr = np.clip(arr * scale, 0, 255)
        rgb = np.repeat(arr[:, :, None], 3, axis=2)
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        rgb = np.repeat(np.clip(arr, 0, 255)[:, :, None], 3, axis=2)
    else:
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1], dtype=np.float32)  # RGB -> BGR, HxWx3


def decode_bytes(data: bytes, what: str) -> np.ndarray:
    """Decode image bytes to a float32 HxWx3 BGR array in 0..255."""
    from PIL import Image
    if not data:
        raise ImageReadError(f"{what}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageReadError(f"{what}: {w}x{h} pixels is over the {MAX_PIXELS} limit")
            factor = int(np.ceil(np.sqrt(w * h / REDUCE_PIXELS))) if w * h > REDUCE_PIXELS else 1
            if factor > 1 and img.format == "JPEG":
                img.draft("RGB", (w // factor, h // factor))  # decode at reduced scale
            img.load()
            if factor > 1:
                if img.mode not in ("L", "RGB", "RGBA", "LA", "I", "F", "CMYK", "I;16"):
                    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                factor = int(np.ceil(np.sqrt(img.size[0] * img.size[1] / REDUCE_PIXELS)))
                if factor > 1:
                    img = img.reduce(factor)
            return _pil_to_bgr(img)
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{what}: not a readable image ({exc})") from exc


def load_record(rec: Record) -> Tuple[np.ndarray, bool]:
    """The record's image as float32 HxWxC BGR 0..255, and whether it is stored pre-resized."""
    if rec.datum is not None:
        return _decode_datum(rec), True
    try:
        data = rec.path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{rec.path}: cannot read ({exc.strerror})") from exc
    return decode_bytes(data, str(rec.path)), False


def _decode_datum(rec: Record) -> np.ndarray:
    from caffe_utils.schema import caffe_pb2
    datum = caffe_pb2().Datum()
    try:
        datum.ParseFromString(rec.datum)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ImageReadError(f"{rec.describe()}: not a Caffe Datum ({exc})") from exc
    if datum.encoded:
        return decode_bytes(datum.data, rec.describe())
    c, h, w = datum.channels, datum.height, datum.width
    if len(datum.float_data):
        arr = np.asarray(datum.float_data, np.float32)
    else:
        arr = np.frombuffer(datum.data, np.uint8).astype(np.float32)
    if c * h * w == 0 or arr.size != c * h * w:
        raise ImageReadError(f"{rec.describe()}: datum of {c}x{h}x{w} holds {arr.size} values")
    return arr.reshape(c, h, w).transpose(1, 2, 0)  # stored CHW, already BGR


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an HxWxC float image (PIL's float mode, one channel at a time)."""
    if img.shape[0] == height and img.shape[1] == width:
        return img
    from PIL import Image
    out = np.empty((height, width, img.shape[2]), np.float32)
    for c in range(img.shape[2]):
        plane = Image.fromarray(np.ascontiguousarray(img[:, :, c], dtype=np.float32), mode="F")
        out[:, :, c] = np.asarray(plane.resize((width, height), Image.BILINEAR), dtype=np.float32)
    return out


@dataclass
class Transform:
    """Caffe's data transformation for a net input of ``channels`` x ``crop_h`` x ``crop_w``."""
    channels: int
    crop_h: int
    crop_w: int
    resize: Optional[int] = None
    mean_values: Sequence[float] = (104.0, 117.0, 123.0)
    mean_image: Optional[np.ndarray] = None
    scale: float = 1.0
    mirror: bool = False
    centre: bool = False  # centre crop (Caffe's TEST phase) instead of a random one

    def __call__(self, img: np.ndarray, pre_resized: bool, rng: np.random.RandomState) -> np.ndarray:
        return self.crop(self.prepare(img, pre_resized), rng)

    def prepare(self, img: np.ndarray, pre_resized: bool) -> np.ndarray:
        """The deterministic part: the channel conversion and the resize (HxWxC float32), all
        that needs keeping of an image that is cropped again later."""
        if self.channels == 1:
            # OpenCV's BGR->grey weights, as Caffe's is_color: false path
            img = (img @ np.array(GREY_WEIGHTS, np.float32))[:, :, None]
        elif self.channels != 3:
            raise DataError(f"the net's input has {self.channels} channels; images give 1 or 3")
        if not pre_resized:
            side = self.resize or max(256, self.crop_h, self.crop_w)
            img = _resize(img, max(side, self.crop_h), max(side, self.crop_w))
        h, w = img.shape[:2]
        if h < self.crop_h or w < self.crop_w:
            img = _resize(img, max(h, self.crop_h), max(w, self.crop_w))
        return img

    def crop(self, img: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        """The drawn part, on a :meth:`prepare`d image: the crop, the mean, the mirror and the
        scale; CxHxW float32."""
        h, w = img.shape[:2]
        if self.centre:
            y, x = (h - self.crop_h) // 2, (w - self.crop_w) // 2
        else:
            y = rng.randint(0, h - self.crop_h + 1)
            x = rng.randint(0, w - self.crop_w + 1)
        out = img[y:y + self.crop_h, x:x + self.crop_w].transpose(2, 0, 1).astype(np.float32)
        if self.mean_image is not None:
            m = self.mean_image
            if m.shape[0] != self.channels:
                raise DataError(f"the mean file has {m.shape[0]} channels, the net {self.channels}")
            if m.shape[1] < self.crop_h or m.shape[2] < self.crop_w:
                raise DataError(f"the mean image is {m.shape[1]}x{m.shape[2]}, smaller than the "
                                f"{self.crop_h}x{self.crop_w} crop; use --mean values instead")
            my = (m.shape[1] - self.crop_h) // 2
            mx = (m.shape[2] - self.crop_w) // 2
            out -= m[:, my:my + self.crop_h, mx:mx + self.crop_w]
        elif len(self.mean_values):
            mv = np.asarray(self.mean_values, np.float32)
            if mv.size not in (1, self.channels):
                raise DataError(f"{mv.size} mean values for a {self.channels}-channel input; give 1 or "
                                f"{self.channels}")
            out -= mv.reshape(-1, 1, 1)
        if self.mirror and rng.randint(2):
            out = out[:, :, ::-1]
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        return np.ascontiguousarray(out)


@dataclass
class Sample:
    """The preprocessed images (N x C x H x W float32) and what happened on the way."""
    data: np.ndarray
    used: int
    skipped: List[str] = field(default_factory=list)
    reused: bool = False


def load_sample(records: Sequence[Record], n: int, transform: Transform, rng: np.random.RandomState,
                min_images: int = 2) -> Sample:
    """Preprocess ``n`` images from ``records`` (random subset; reuse with new crops if too few).

    Each image is cropped as soon as it is decoded; only when there are fewer records than ``n``
    are the resized images kept for their later crops (a folder of camera photos is never held
    decoded at full size). Where unreadable records leave too few, the readable ones are decoded
    again for the reuse."""
    if n <= 0:
        raise DataError(f"the number of images must be positive, got {n}")
    order = rng.permutation(len(records))
    out = np.empty((n, transform.channels, transform.crop_h, transform.crop_w), np.float32)
    kept: List[np.ndarray] = []
    used: List[int] = []
    skipped: List[str] = []
    for idx in order:
        if len(used) >= n:
            break
        try:
            img, pre = load_record(records[idx])
        except ImageReadError as exc:
            skipped.append(str(exc))
            continue
        img = transform.prepare(img, pre)
        out[len(used)] = transform.crop(img, rng)
        used.append(int(idx))
        if len(records) < n:
            kept.append(img)
    if len(used) < min(min_images, n):
        detail = f" ({len(skipped)} unreadable, e.g. {skipped[0]})" if skipped else ""
        raise DataError(f"only {len(used)} usable image(s) in the data source{detail}; "
                        f"at least {min(min_images, n)} are needed: point --data at more images")
    if len(used) < n and not kept:
        kept = [transform.prepare(*load_record(records[idx])) for idx in used]
    for i in range(len(used), n):
        out[i] = transform.crop(kept[i % len(used)], rng)
    return Sample(out, len(used), skipped, reused=len(used) < n)
