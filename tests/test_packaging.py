"""The wheel holds only the tool: setup.cfg selects caffe_utils and its subpackages, and the
tool never imports the helpers (scripts.support) that stay in the checkout."""
from __future__ import annotations

import ast
import configparser
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_setup_cfg_packages_only_the_tool():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = cfg["options.packages.find"]["include"].replace(",", " ").split()
    found = find_packages(str(ROOT), include=include)
    assert "caffe_utils" in found and "caffe_utils.engine" in found
    assert all(p == "caffe_utils" or p.startswith("caffe_utils.") for p in found), found
    assert cfg["options"]["py_modules"].split() == ["magic_init"]


def test_tool_does_not_import_the_checkout_helpers():
    for path in [ROOT / "magic_init.py", *sorted((ROOT / "caffe_utils").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in ("scripts", "tests")], path
