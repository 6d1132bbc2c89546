#!/usr/bin/env bash
# The peers' packages for a machine without network (the GPU slot): downloads the wheels of
# pytorch_optimizer and heavyball into .peers/wheels and unpacks them into .peers/site, which
# bench/run_gpu.sh puts on PYTHONPATH (wheels are zip files: unpacked, a plain path entry
# imports them). Run from the repository root where PyPI is reachable; .peers/ is git-ignored,
# so a device call carries it by name (carry: [".peers"]).
#
# Only pure-Python wheels (py3-none-any), without their dependencies (--no-deps): the one of
# theirs that torch lacks and that is pure Python, opt-einsum (heavyball's), comes along;
# numpy, which both import, is compiled and is not fetched (the GPU image has it: run_gpu.sh
# records its version in env.json).
set -euo pipefail
PY=${PYTHON:-python3}
DEST=${DEST:-.peers}
rm -rf "$DEST/wheels" "$DEST/site"
mkdir -p "$DEST/wheels" "$DEST/site"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST/wheels" \
  "pytorch-optimizer==4.1.*" "heavyball==3.2.*" "opt-einsum>=3.4"
for wheel in "$DEST"/wheels/*.whl; do
  case "$(basename "$wheel")" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl) ;;
    *) echo "not a pure-Python wheel: $wheel" >&2; exit 1 ;;
  esac
  "$PY" -m zipfile -e "$wheel" "$DEST/site"
done
ls "$DEST/wheels"
