#!/usr/bin/env bash
# The main job on bundled example data: installs the project, then initializes CaffeNet
# (models/caffenet/deploy.prototxt) with k-means on the photos scikit-image installs.
# Uses real pycaffe when scripts/install_caffe.sh has built it, else the numpy engine.
#   bash scripts/run_example.sh [extra magic_init.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v "^WARNING: \(Running pip as\|Location\)" >&2 || true
PYCAFFE="$(bash scripts/install_caffe.sh --print-path)"
if [ -d "$PYCAFFE/caffe" ]; then export PYTHONPATH="$PYCAFFE${PYTHONPATH:+:$PYTHONPATH}"; fi
PHOTOS="$(python3 -c 'import os, skimage; print(os.path.join(os.path.dirname(skimage.__file__), "data"))')"
OUT="${OUT:-example_out}"
mkdir -p "$OUT"
export GLOG_minloglevel=2
exec python3 magic_init.py models/caffenet/deploy.prototxt -o "$OUT/caffenet_kmeans.caffemodel" \
  -d "$PHOTOS" -t kmeans --report "$OUT/caffenet_kmeans.json" "$@"
