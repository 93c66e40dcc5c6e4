#!/usr/bin/env bash
# Build BVLC Caffe's CPU pycaffe from the PyPI sdist brocolli-caffe==9.0.2 (BVLC commit 9b89154)
# and cache the result outside the checkout.
#
#   bash scripts/install_caffe.sh            # build once (about 12 min on 2 cores), then seconds
#   export PYTHONPATH="$(bash scripts/install_caffe.sh --print-path):$PYTHONPATH"
#
# Environment:
#   MAGIC_INIT_CACHE   cache root (default: ~/.cache/magic-init)
#   CAFFE_JOBS         parallel compile jobs (default: nproc)
#   SKIP_APT=1         do not apt-get the build dependencies (they must already be there)
#
# The sdist's setup.py insists on conda and Python <= 3.9, so we drive its CMake tree directly
# against the system Python, Debian's Boost/protobuf/glog/HDF5/OpenBLAS, and the installed numpy.
set -euo pipefail

VERSION=9.0.2
PY=${PYTHON:-python3}
CACHE_ROOT=${MAGIC_INIT_CACHE:-$HOME/.cache/magic-init}
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PYTAG=${PYVER/./}
PREFIX="$CACHE_ROOT/caffe-$VERSION-py$PYTAG"
PYCAFFE="$PREFIX/python"

log() { echo "[install_caffe] $*" >&2; }

if [ "${1:-}" = "--print-path" ]; then
  echo "$PYCAFFE"
  exit 0
fi

check_import() {
  PYTHONPATH="$PYCAFFE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
    'import caffe, caffe.proto.caffe_pb2; assert hasattr(caffe, "Net"); print(caffe.__file__)' >/dev/null 2>&1
}

python_deps() {
  # pycaffe's own Python needs; scikit-image for caffe.io, a current protobuf runtime for caffe_pb2.
  "$PY" -m pip install -q six scikit-image protobuf numpy
}

if [ -f "$PREFIX/.complete" ] && check_import; then
  log "pycaffe already built in $PYCAFFE"
  echo "export PYTHONPATH=$PYCAFFE\${PYTHONPATH:+:\$PYTHONPATH}"
  exit 0
fi

if [ "${SKIP_APT:-0}" != 1 ]; then
  log "installing build dependencies (apt)"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends \
    build-essential cmake libprotobuf-dev protobuf-compiler \
    libboost-system-dev libboost-thread-dev libboost-filesystem-dev libboost-python-dev libboost-regex-dev \
    libgoogle-glog-dev libgflags-dev libhdf5-dev libopenblas-dev libgtest-dev >/dev/null
fi
python_deps

WORK="$CACHE_ROOT/build-caffe-$VERSION-py$PYTAG"
mkdir -p "$WORK"
cd "$WORK"
if [ ! -f "src/brocolli-caffe-$VERSION/CMakeLists.txt" ]; then
  log "downloading the brocolli-caffe==$VERSION sdist"
  rm -rf src dl && mkdir -p src dl
  # Only the archive is wanted; pip still runs its metadata step, which works without conda.
  "$PY" -m pip download -q --no-deps --no-binary :all: "brocolli-caffe==$VERSION" -d dl
  tar -xzf dl/brocolli-caffe-$VERSION.tar.gz -C src
fi
SRC="$WORK/src/brocolli-caffe-$VERSION"

# A link directory with the names CMakeLists.txt links against (-lboost_python, -lhdf5, -lhdf5_hl).
MULTIARCH=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
LIBDIR=/usr/lib/$MULTIARCH
LINKS="$WORK/links"
mkdir -p "$LINKS"
ln -sf "$LIBDIR/libboost_python$PYTAG.so" "$LINKS/libboost_python.so"
ln -sf "$LIBDIR/hdf5/serial/libhdf5.so" "$LINKS/libhdf5.so"
ln -sf "$LIBDIR/hdf5/serial/libhdf5_hl.so" "$LINKS/libhdf5_hl.so"
for f in "$LINKS"/*.so; do
  [ -e "$f" ] || { log "missing library behind $f; are the apt packages installed?"; exit 1; }
done

PY_PREFIX=$("$PY" -c 'import sys; print(sys.prefix)')
PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NP_INC=$("$PY" -c 'import numpy; print(numpy.get_include())')
JOBS=${CAFFE_JOBS:-$(nproc)}

log "configuring (python $PYVER, numpy headers $NP_INC)"
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
  -DANACONDA_HOME="$PY_PREFIX" -DPYTHON_VERSION="python$PYVER" \
  -DCMAKE_CXX_FLAGS="-I$PY_INC -I$NP_INC -I/usr/include/hdf5/serial -Wno-deprecated-declarations" \
  -DCMAKE_SHARED_LINKER_FLAGS="-L$LINKS -Wl,-rpath,$LIBDIR/hdf5/serial" \
  -DCMAKE_EXE_LINKER_FLAGS="-L$LINKS" >"$WORK/cmake.log" 2>&1 \
  || { tail -40 "$WORK/cmake.log" >&2; exit 1; }

log "building with $JOBS jobs (about 12 minutes on 2 cores; log: $WORK/build.log)"
cmake --build "$WORK/build" -j"$JOBS" >"$WORK/build.log" 2>&1 \
  || { grep -m20 -B2 -A8 'error' "$WORK/build.log" >&2 || tail -40 "$WORK/build.log" >&2; exit 1; }

log "installing into $PREFIX"
rm -rf "$PREFIX"
cmake --install "$WORK/build" --prefix "$PREFIX" >"$WORK/install.log" 2>&1 \
  || { tail -20 "$WORK/install.log" >&2; exit 1; }
mkdir -p "$PYCAFFE/caffe/proto"
touch "$PYCAFFE/caffe/proto/__init__.py"
cp "$WORK"/build/include/caffe/proto/*.py "$PYCAFFE/caffe/proto/" 2>/dev/null \
  || find "$WORK/build" -name 'caffe_pb2.py' -exec cp {} "$PYCAFFE/caffe/proto/" \;

if ! check_import; then
  log "the built pycaffe does not import:"
  PYTHONPATH="$PYCAFFE" "$PY" -c 'import caffe' >&2 || true
  exit 1
fi
touch "$PREFIX/.complete"
log "pycaffe ready in $PYCAFFE"
echo "export PYTHONPATH=$PYCAFFE\${PYTHONPATH:+:\$PYTHONPATH}"
