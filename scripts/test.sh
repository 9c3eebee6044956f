#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs DCMTK and Orthanc (Debian/Ubuntu,
# the real peers of the interoperability tests) and PostgreSQL (the index's other
# backend), creates .venv with dicomnet and its test dependencies, then runs ruff, mypy,
# builds the user guide (mkdocs, warnings are errors) and runs pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

MISSING=""
command -v storescp >/dev/null 2>&1 || MISSING="$MISSING dcmtk"
[ -x /usr/sbin/Orthanc ] || command -v Orthanc >/dev/null 2>&1 || MISSING="$MISSING orthanc"
# PostgreSQL's server binaries: Debian keeps them off PATH (/usr/lib/postgresql/N/bin).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 \
    || MISSING="$MISSING postgresql"
if [ -n "$MISSING" ]; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        # The packages would start a system Orthanc and PostgreSQL: the tests start their
        # own instead.
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $MISSING >/dev/null
        if [ -d /run/systemd/system ]; then
            $SUDO systemctl stop orthanc postgresql 2>/dev/null || true
        fi
    else
        echo "warning:$MISSING not installed and apt-get is unavailable; their tests will skip" >&2
    fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"

.venv/bin/ruff check dicomnet tests examples benchmarks fuzz
.venv/bin/ruff format --check dicomnet tests examples benchmarks fuzz
.venv/bin/mypy
DOCS_SITE="$(mktemp -d)"
trap 'rm -rf "$DOCS_SITE"' EXIT
.venv/bin/mkdocs build --strict --quiet --site-dir "$DOCS_SITE"
.venv/bin/pytest "$@"
