"""Shared pytest fixtures: pycaffe (required in CI), and real models fetched into the cache."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("GLOG_minloglevel", "2")


@pytest.fixture
def caffe():
    """The real pycaffe module (CPU mode). Skipped locally without it; a failure in CI."""
    from reference import require_caffe
    return require_caffe()


@pytest.fixture(scope="session")
def nsfw_model():
    from caffe_utils.datasets import open_nsfw
    return open_nsfw()


@pytest.fixture(scope="session")
def mtcnn_models():
    from caffe_utils.datasets import mtcnn
    return mtcnn()
