"""Shared pytest fixtures: pycaffe (required in CI), and real models fetched into the cache."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GLOG_minloglevel", "2")

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


@pytest.fixture(scope="session")
def nsfw_model():
    from scripts.support.datasets import open_nsfw
    return open_nsfw()


@pytest.fixture(scope="session")
def mtcnn_models():
    from scripts.support.datasets import mtcnn
    return mtcnn()


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
