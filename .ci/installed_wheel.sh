#!/usr/bin/env bash
# CI: prove the installed package, not the checkout. Build the wheel, install it non-editable into a
# fresh venv (torch pinned first), and from a directory outside the checkout build a tiny model,
# convert it, check it, verify it and export it back byte-identical.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m venv "$work/venv"
# torch first and pinned exactly: an unpinned torch would pull a multi-GB CUDA build.
"$work/venv/bin/python" -m pip install -q torch==2.13.0
"$work/venv/bin/python" -m pip wheel -q --no-deps -w "$work/dist" "$repo"
"$work/venv/bin/python" -m pip install -q "$work"/dist/ckptconv-*.whl

cd "$work"   # nothing of the checkout is importable from here
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
ckptconv="$work/venv/bin/ckptconv"
"$ckptconv" --version
"$work/venv/bin/python" - <<PY
import ckptconv
assert ckptconv.__file__.startswith("$work/venv/"), f"imported from {ckptconv.__file__}, not the installed wheel"
from ckptconv.fixtures import make_tiny
make_tiny("qwen2_5_vl", "tiny")
PY
"$ckptconv" hf-to-mcore tiny mcore --json > convert.json
"$ckptconv" check mcore
"$ckptconv" verify tiny mcore --device cpu --no-image --json > verify.json
"$ckptconv" mcore-to-hf mcore back --json > export.json
cmp tiny/model.safetensors back/model.safetensors
echo "installed wheel: converted, checked, verified and exported back byte-identical from $work"
