#!/usr/bin/env python3
"""Regenerate caffe_utils/proto/caffe_pb2.py from caffe_utils/proto/caffe.proto.

Uses ``protoc`` from PATH (Debian: protobuf-compiler) or, failing that, ``grpc_tools.protoc``.
The generated module is committed so that ``pip install -e .`` needs no compiler.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "caffe_utils" / "proto"


def main() -> int:
    # The proto path is the repository root, so the file registers as
    # "caffe_utils/proto/caffe.proto", not "caffe.proto": pycaffe's caffe_pb2 registers that
    # name, and both must be loadable in one process (caffe_utils/schema.py).
    args = [f"--proto_path={ROOT}", f"--python_out={ROOT}", str(PROTO_DIR / "caffe.proto")]
    protoc = shutil.which("protoc")
    if protoc:
        cmd = [protoc, *args]
    else:
        try:
            import grpc_tools  # noqa: F401
        except ImportError:
            print("gen_proto: need protoc (apt-get install protobuf-compiler) or grpcio-tools", file=sys.stderr)
            return 1
        cmd = [sys.executable, "-m", "grpc_tools.protoc", *args]
    subprocess.run(cmd, check=True)
    print(f"wrote {PROTO_DIR / 'caffe_pb2.py'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
