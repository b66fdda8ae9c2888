#!/usr/bin/env bash
# Create the separate Python 3.11 venv used by benchmarks/scvi_reference.py (scvi-tools side of the
# fidelity and speed comparison, issue 4).
#
#   bash benchmarks/setup_scvi_venv.sh
#
# scvi-tools pulls jax/flax/numpyro/lightning and pins that would fight atlasvi's own environment, so it
# lives in its own venv at benchmarks/.cache/scvi-venv (git-ignored). torch is installed FIRST at the
# same version as atlasvi's (the CPU wheel from pip's find-links where there is one), so that resolving
# scvi-tools does not pull a CUDA build of torch. Idempotent: re-running only (re)installs missing or
# mismatching pins. Override the interpreter with PYTHON311=/path/to/python3.11 and the venv with
# SCVI_VENV=/path.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${SCVI_VENV:-$HERE/.cache/scvi-venv}"
TORCH_VERSION="${SCVI_TORCH_VERSION:-2.13.0}"
SCVI_VERSION="${SCVI_VERSION:-1.4.2}"
SCIB_SPEC="scib-metrics>=0.5,<0.6"

find_python311() {
    if [[ -n "${PYTHON311:-}" ]]; then
        echo "$PYTHON311"; return 0
    fi
    local p
    for p in "$(command -v python3.11 2>/dev/null || true)" "$(command -v python3 2>/dev/null || true)"; do
        if [[ -n "$p" ]] && "$p" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
            echo "$p"; return 0
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        local v prefix
        v="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.11(\.[0-9]+)?$' | sort -V | tail -n1 || true)"
        if [[ -n "$v" ]]; then
            prefix="$(pyenv prefix "$v" 2>/dev/null || true)"
            if [[ -n "$prefix" && -x "$prefix/bin/python3.11" ]]; then
                echo "$prefix/bin/python3.11"; return 0
            fi
        fi
    fi
    return 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
    if ! PY="$(find_python311)"; then
        echo "error: no Python 3.11 interpreter found (tried \$PYTHON311, 'command -v python3.11'," \
             "'pyenv prefix 3.11.x'). Install one or set PYTHON311." >&2
        exit 1
    fi
    echo "creating $VENV with $PY ($("$PY" -V 2>&1))" >&2
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi

"$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
    echo "error: $VENV is not a Python 3.11 venv; remove it and re-run" >&2; exit 1; }

if "$VENV/bin/python" - "$TORCH_VERSION" "$SCVI_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
assert version("torch").split("+")[0] == sys.argv[1]
assert version("scvi-tools") == sys.argv[2]
v = tuple(int(x) for x in version("scib-metrics").split(".")[:2])
assert (0, 5) <= v < (0, 6)
for pkg in ("jax", "jaxlib", "scanpy", "psutil"):
    version(pkg)
EOF
then
    echo "scvi venv up to date: $VENV" >&2
else
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # 1. torch first, CPU build: a local "+cpu" wheel (pip find-links) wins, else PyTorch's CPU index
    #    is NOT reachable here, so fall back to the plain version pin.
    if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
        if ! "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
            "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
        fi
    fi
    TORCH_INSTALLED="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    # 2. scvi-tools + scib-metrics (CPU jax), with torch held at what is installed.
    CONSTRAINTS="$(mktemp)"
    trap 'rm -f "$CONSTRAINTS"' EXIT
    echo "torch==$TORCH_INSTALLED" >"$CONSTRAINTS"
    "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" \
        "scvi-tools==$SCVI_VERSION" "$SCIB_SPEC" "jax[cpu]" scanpy psutil
fi

"$VENV/bin/python" -m pip check
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
pkgs = ("scvi-tools", "torch", "lightning", "scib-metrics", "jax", "jaxlib", "anndata", "scanpy",
        "numpy", "scipy", "psutil")
print("  ".join(f"{p}=={version(p)}" for p in pkgs))
EOF
