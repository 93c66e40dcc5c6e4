#!/usr/bin/env bash
# The test command: installs everything (apt packages, the pycaffe build, the project), then runs
# the whole test suite against the real pycaffe. Extra arguments go to pytest.
#   bash scripts/run_tests.sh            # everything
#   bash scripts/run_tests.sh -k netio   # a subset
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install_caffe.sh >&2
PYCAFFE="$(bash scripts/install_caffe.sh --print-path)"
export PYTHONPATH="$PYCAFFE${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "^WARNING: \(Running pip as\|Location\)" >&2 || true
python3 -m pip show -q magic-init >/dev/null || { echo "run_tests: 'pip install -e .' failed" >&2; exit 1; }

# The pycaffe comparisons must run, never be skipped.
if ! python3 -c 'import caffe; caffe.Net' 2>/dev/null; then
  echo "run_tests: pycaffe is not importable from $PYCAFFE; the Caffe build failed" >&2
  exit 1
fi
export MAGIC_INIT_REQUIRE_CAFFE=1
export GLOG_minloglevel=2
exec python3 -m pytest -p no:cacheprovider "$@"
