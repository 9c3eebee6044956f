#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs DCMTK (Debian/Ubuntu), creates
# .venv with dicomnet and its test dependencies, then runs ruff, mypy and pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v storescp >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dcmtk >/dev/null
    else
        echo "warning: DCMTK is not installed and apt-get is unavailable; DCMTK tests will skip" >&2
    fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"

.venv/bin/ruff check dicomnet tests examples benchmarks
.venv/bin/ruff format --check dicomnet tests examples benchmarks
.venv/bin/mypy
.venv/bin/pytest "$@"
