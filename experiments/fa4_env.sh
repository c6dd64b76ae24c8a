# shellcheck shell=bash
# Sourced on the lent GPU machine after experiments/fa4_carry.sh's first three parts and the wheels
# arrived, in five calls sent one right after the other (the machine is released after ~30 s idle;
# a call carries at most 64 MiB with the working tree, whose recorded runs are ~42 MB by now):
#
#   call 1, carry [".fa4a"]: mkdir -p /tmp/fa4 && cp .fa4a/* /tmp/fa4/
#   call 2, carry [".fa4b"]: mkdir -p /tmp/fa4 && cp .fa4b/* /tmp/fa4/
#   call 3, carry [".fa4d"]: mkdir -p /tmp/fa4 && cp .fa4d/* /tmp/fa4/
#   call 4, carry [".whl"]:  mkdir -p /tmp/whl && cp .whl/* /tmp/whl/
#   call 5, carry [".fa4c"]: source experiments/fa4_env.sh && python -m experiments...
#   later calls (machine still warm): source experiments/fa4_env.sh && ...
# Unpacks FlashAttention-4 and the carried wheels into /tmp/site once, and sets the environment
# every run of docs/benchmarks/h200_perf.md used: the CUTLASS DSL's packages on the path (its .pth
# file is not read from a PYTHONPATH entry), FA4's compiled kernels cached on disk, NCCL's
# multicast off (the device README's rule).
if [ ! -d /tmp/site/flash_attn ]; then
    wheels=(.whl/*.whl)
    [ -e "${wheels[0]}" ] || wheels=(/tmp/whl/*.whl)
    # the last part travels with this call (.fa4c), the others arrived in /tmp/fa4 before
    mkdir -p /tmp/site /tmp/fa4 && cp .fa4c/* /tmp/fa4/ &&
        cat /tmp/fa4/fa4part.* | xz -d -T8 | tar -x -C /tmp/site &&
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "${wheels[@]}" || return 1
fi
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_DISABLE_NVLS=1 FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4cache
