#!/usr/bin/env bash
# Create the separate Python 3.12 venv used by benchmarks/annbatch_loader.py.
#
#   bash benchmarks/setup_annbatch_venv.sh
#
# annbatch needs Python >= 3.12 (the atlasvi venv is 3.11), so it lives in its own venv at
# benchmarks/.cache/annbatch-venv (git-ignored). Idempotent: re-running only (re)installs missing or
# mismatching pins. Override the interpreter with PYTHON312=/path/to/python3.12.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${ANNBATCH_VENV:-$HERE/.cache/annbatch-venv}"
ANNBATCH_VERSION="0.3.1"

find_python312() {
    if [[ -n "${PYTHON312:-}" ]]; then
        echo "$PYTHON312"; return 0
    fi
    if command -v pyenv >/dev/null 2>&1; then
        # newest installed 3.12.x known to pyenv
        local v
        v="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n1 || true)"
        if [[ -n "$v" ]]; then
            local prefix
            prefix="$(pyenv prefix "$v" 2>/dev/null || true)"
            if [[ -n "$prefix" && -x "$prefix/bin/python3.12" ]]; then
                echo "$prefix/bin/python3.12"; return 0
            fi
        fi
    fi
    local p
    p="$(command -v python3.12 2>/dev/null || true)"
    if [[ -n "$p" ]] && "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        echo "$p"; return 0
    fi
    return 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
    if ! PY="$(find_python312)"; then
        echo "error: no Python 3.12 interpreter found (tried \$PYTHON312, 'pyenv prefix 3.12.x'," \
             "'command -v python3.12'). Install one (e.g. 'pyenv install 3.12') or set PYTHON312." >&2
        exit 1
    fi
    echo "creating $VENV with $PY ($("$PY" -V 2>&1))" >&2
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi

"$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] >= (3, 12), sys.version' || {
    echo "error: $VENV is not a Python >= 3.12 venv; remove it and re-run" >&2; exit 1; }

if "$VENV/bin/python" - "$ANNBATCH_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
assert version("annbatch") == sys.argv[1]
for pkg in ("zarrs", "anndata", "psutil", "zarr", "h5py"):
    version(pkg)
EOF
then
    echo "annbatch venv up to date: $VENV" >&2
else
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "annbatch==$ANNBATCH_VERSION" zarrs anndata psutil h5py
fi

"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
print("  ".join(f"{p}=={version(p)}" for p in ("annbatch", "zarrs", "zarr", "anndata", "numpy", "psutil")))
EOF
