#!/usr/bin/env bash
# FlashAttention-4 for a lent GPU machine that cannot reach a package index.
#
#   bash experiments/fa4_carry.sh          # here: writes .fa4a/ to .fa4d/ and .whl/ (git-ignored)
#
# flash-attn-4 needs the CUTLASS DSL, whose CUDA 13 libraries make a 92 MB wheel: more than one
# call may carry (64 MiB with the working tree, itself ~42 MB by now). So the packages are unpacked
# here into one site folder, packed as tar.xz (69 MB) and split in four parts that travel in four
# calls while the machine stays warm (it is released after ~30 s idle, so send each call at once), with the
# wheels in .whl/ (beartype, the cuDNN frontend) in a call of their own: experiments/fa4_env.sh
# says how, and sets everything up there, in short:
#
#   call 1, carry [".fa4a"]: mkdir -p /tmp/fa4 && cp .fa4a/* /tmp/fa4/
#   call 2, carry [".fa4b"]: mkdir -p /tmp/fa4 && cp .fa4b/* /tmp/fa4/
#   call 3, carry [".fa4d"]: mkdir -p /tmp/fa4 && cp .fa4d/* /tmp/fa4/
#   call 4, carry [".whl"]:  mkdir -p /tmp/whl && cp .whl/* /tmp/whl/
#   call 5, carry [".fa4c"]: cp .fa4c/* /tmp/fa4/ && mkdir -p /tmp/site && cat /tmp/fa4/* | xz -d -T8 |
#       tar -x -C /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile
#       --no-cache-dir --upgrade --target /tmp/site /tmp/whl/*.whl &&
#       export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD ...
#
# (the CUTLASS DSL's own .pth file, which adds dsl_packages to the path, is not read from a
# PYTHONPATH entry, hence the second entry). Versions: those of docs/benchmarks/h200_perf.md,
# step 19. Everything else the device image has (torch 2.11, cuda-bindings, protobuf).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$work/wheels" \
    flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
    quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
mkdir -p "$work/site"
for wheel in "$work"/wheels/*.whl; do  # a wheel is a zip of its site-packages entries
    unzip -q -o "$wheel" -d "$work/site"
done
tar -C "$work/site" -cf - . | xz -9 -T2 >"$work/fa4site.tar.xz"
# four parts of ~17 MB (three of 23 MB no longer fit beside a 42 MB working tree, stop 86); they
# sort by name (aa, ab, ac, ad) and the last, ad, is the one in .fa4c, which travels with the
# call that unpacks them (fa4_env.sh)
rm -rf .fa4a .fa4b .fa4c .fa4d && mkdir .fa4a .fa4b .fa4c .fa4d
split -n 4 "$work/fa4site.tar.xz" "$work/fa4part."
mv "$work/fa4part.aa" .fa4a/ && mv "$work/fa4part.ab" .fa4b/
mv "$work/fa4part.ac" .fa4d/ && mv "$work/fa4part.ad" .fa4c/
mkdir -p .git/info
for ignored in /.fa4a/ /.fa4b/ /.fa4c/ /.fa4d/ /.whl/; do
    grep -qx "$ignored" .git/info/exclude || echo "$ignored" >>.git/info/exclude
done
# the wheels the device image lacks (its package list: /work/.library/device/KINDS.md): beartype,
# and the cuDNN frontend (docs/benchmarks/h200_perf.md, step 11)
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    beartype nvidia-cudnn-frontend==1.32.0
ls -l .fa4a .fa4b .fa4c .fa4d .whl
