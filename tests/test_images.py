"""Image sources and Caffe-style preprocessing."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from caffe_utils import images
from caffe_utils.errors import DataError
from caffe_utils.schema import caffe_pb2


def _png(path, rgb):
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    rng = np.random.RandomState(0)
    d = tmp_path / "imgs"
    (d / "sub dir").mkdir(parents=True)
    for i in range(3):
        _png(d / f"a{i}.png", rng.randint(0, 255, (40, 50, 3), dtype=np.uint8))
    _png(d / "sub dir" / "b.png", rng.randint(0, 255, (30, 30, 3), dtype=np.uint8))
    (d / "notes.txt").write_text("not an image")
    return d


def test_folder_glob_and_list(folder, tmp_path):
    assert len(images.list_source(folder)) == 4  # recursive, non-images ignored
    assert len(images.list_source(str(folder / "*.png"))) == 3
    lst = tmp_path / "list.txt"
    lst.write_text("a0.png 3\nsub dir/b.png 7\n\n# comment\n")
    recs = images.list_source(lst, root=folder)
    assert [(r.path.name, r.label) for r in recs] == [("a0.png", 3), ("b.png", 7)]
    assert all(r.path.exists() for r in recs)


def test_transform_is_caffe_like(folder):
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[..., 0] = 200  # red
    img, pre = images.decode_bytes(_buf(rgb), "x"), False
    t = images.Transform(3, 8, 8, resize=8, mean_values=(1.0, 2.0, 3.0), scale=0.5)
    out = t(img, pre, np.random.RandomState(0))
    assert out.shape == (3, 8, 8)
    # BGR order: channel 2 is red; mean subtracted per channel, then scaled
    np.testing.assert_allclose(out[:, 0, 0], [(0 - 1) * 0.5, (0 - 2) * 0.5, (200 - 3) * 0.5])
    grey = images.Transform(1, 8, 8, resize=8, mean_values=(0.0,))(img, pre, np.random.RandomState(0))
    assert grey.shape == (1, 8, 8) and abs(grey[0, 0, 0] - 200 * 0.299) < 1e-3


def _buf(rgb, fmt="PNG", mode=None):
    im = Image.fromarray(rgb)
    if mode:
        im = im.convert(mode)
    b = io.BytesIO()
    im.save(b, fmt)
    return b.getvalue()


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"),
                                      ("I;16", "PNG"), ("RGB", "JPEG")])
def test_image_modes_decode_to_bgr(mode, fmt):
    rgb = np.random.RandomState(1).randint(0, 255, (12, 14, 3), dtype=np.uint8)
    out = images.decode_bytes(_buf(rgb, fmt, mode), "x")
    assert out.shape == (12, 14, 3) and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 255


def test_unreadable_images_are_skipped_and_counted(folder):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "empty.jpg").write_bytes(b"")
    recs = images.list_source(folder)
    s = images.load_sample(recs, 8, images.Transform(3, 16, 16), np.random.RandomState(0))
    assert s.used == 4 and len(s.skipped) == 2 and s.reused
    assert s.data.shape == (8, 3, 16, 16)


def _naive_sample(recs, n, transform, seed):
    """load_sample's oracle: every readable record decoded (in the permutation's order), then
    the ``n`` crops drawn in turn, reusing the images in that order."""
    rng = np.random.RandomState(seed)
    decoded = []
    for idx in rng.permutation(len(recs))[:n + len(recs)]:
        try:
            decoded.append(images.load_record(recs[idx]))
        except images.ImageReadError:
            continue
    decoded = decoded[:n]
    return np.stack([transform(*decoded[i % len(decoded)], rng) for i in range(n)])


@pytest.mark.parametrize("n", [3, 5, 8])
def test_sample_crops_match_decoding_everything_first(folder, n):
    # 3: no reuse; 5: the 2 unreadable records leave 4 images, decoded again for the 5th crop;
    # 8: fewer records than crops, the resized images kept
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "empty.jpg").write_bytes(b"")
    recs = images.list_source(folder)
    assert len(recs) == 6
    t = images.Transform(3, 16, 16, resize=20, mirror=True)
    s = images.load_sample(recs, n, t, np.random.RandomState(7))
    np.testing.assert_array_equal(s.data, _naive_sample(recs, n, t, 7))
    assert s.used == min(n, 4) and s.reused == (n > 4)


def test_too_few_images(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="only 0 usable image"):
        images.load_sample(images.list_source(tmp_path), 4, images.Transform(3, 8, 8), np.random.RandomState(0))
    with pytest.raises(DataError, match="matches no files"):
        images.list_source(str(tmp_path / "*.jpg"))


def test_lmdb_of_datums(tmp_path):
    import lmdb  # installed by the test extra (setup.cfg)
    rng = np.random.RandomState(2)
    pb2 = caffe_pb2()
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 24)
    rgb = rng.randint(0, 255, (10, 12, 3), dtype=np.uint8)
    with env.begin(write=True) as txn:
        enc = pb2.Datum(encoded=True, data=_buf(rgb), label=1)
        txn.put(b"000", enc.SerializeToString())
        raw = pb2.Datum(channels=3, height=10, width=12, data=rgb[:, :, ::-1].transpose(2, 0, 1).tobytes(), label=2)
        txn.put(b"001", raw.SerializeToString())
    env.close()
    recs = images.list_source(tmp_path / "db")
    assert len(recs) == 2
    a, pre_a = images.load_record(recs[0])
    b, pre_b = images.load_record(recs[1])
    assert pre_a and pre_b
    np.testing.assert_array_equal(a, b)  # encoded (decoded to BGR) == raw (stored BGR)
    np.testing.assert_array_equal(a[..., 2], rgb[..., 0])
