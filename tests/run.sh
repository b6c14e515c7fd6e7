#!/usr/bin/env bash
# Sets up everything the test suite needs on a clean Debian machine, then runs it.
# This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

if ! command -v redis-server >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -q && $SUDO apt-get install -y -q redis-server
fi
# torch first, pinned: an open range with no torch present pulls a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
# Versions known to resolve together: pip's resolver otherwise backtracks for
# many minutes over the boto3/botocore/aiobotocore/s3fs pins.
python -m pip install -q -c tests/constraints.txt -e '.[test,plots]'
# The Triton kernel is checked under TRITON_INTERPRET=1; its tests skip (with the
# reason) only if triton cannot be installed here.
python -m pip install -q 'triton>=3.0' || echo "triton could not be installed: its tests will be skipped"
# Fetch the default model once, before the tests start timing anything.
python -c "from kvtier.engine.model.loader import resolve_model_path; print('model:', resolve_model_path(None))"

exec python -m pytest -q -p no:cacheprovider "$@"
