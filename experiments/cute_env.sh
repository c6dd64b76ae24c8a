#!/usr/bin/env bash
# The CUTLASS DSL (FlashAttention-4's CuTe kernels) on this CPU machine, for compiling ringattn's
# FA4 kernels without a GPU (experiments/cute_compile.py):
#
#   bash experiments/fa4_carry.sh        # once, if .fa4a/ to .fa4d/ are missing (~4 min)
#   bash experiments/cute_env.sh         # once per machine (~2 min): /tmp/py312 and /tmp/site312
#   /tmp/py312/bin/python -m experiments.cute_compile
#
# The DSL needs Python 3.12 (the project's venv is 3.11): pyenv's 3.12 makes a venv with torch
# (the CPU machine's local wheel), ringattn with its dev extras and cuda-bindings; FA4 and the DSL
# come from the same tarball parts the GPU machine gets (docs/benchmarks/h200_perf.md step 32).
set -euo pipefail
cd "$(dirname "$0")/.."
python312=${PYTHON312:-$HOME/.pyenv/versions/3.12.1/bin/python}
[ -x /tmp/py312/bin/python ] || "$python312" -m venv /tmp/py312
/tmp/py312/bin/pip install -q torch==2.13.0 numpy cuda-bindings -e ".[dev]"
if [ ! -d /tmp/site312/flash_attn ]; then
    mkdir -p /tmp/site312
    cat .fa4a/* .fa4b/* .fa4d/* .fa4c/* | xz -d -T2 | tar -x -C /tmp/site312
fi
/tmp/py312/bin/python - <<'PY'
import site, sys
# the site's packages and the DSL's own (its .pth file is not read from a plain path entry)
path = site.getsitepackages()[0] + "/ringattn_cute.pth"
open(path, "w").write("/tmp/site312\n/tmp/site312/nvidia_cutlass_dsl/dsl_packages\n")
print("wrote", path)
PY
/tmp/py312/bin/python -c "import cutlass.cute, flash_attn.cute.flash_fwd_sm90; print('CuTe DSL ok')"
