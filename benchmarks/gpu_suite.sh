#!/usr/bin/env bash
# The GPU check of the Triton kernels (issue 36) in one command, for a lent GPU machine:
#
#     bash benchmarks/gpu_suite.sh            # results and the log under ${OUT:-benchmarks/results}
#
# 1. the kernels compiled on CUDA against the op references (tests/triton at the
#    interpreter's shapes, then tests/cuda/test_triton_kernels.py at larger ones, bf16 too;
#    fp32 dots in IEEE precision so the tolerances are the interpreter's);
# 2. attnlab bench's "gpu" suite on CUDA, bf16: every op with a triton kernel (sigmoid,
#    LSSA/LSSAR, neighborhood, linear, decode) at compute-bound shapes (B=4, H=16, L=4k-32k,
#    D=64/128) next to SDPA, FlexAttention and fla, with the issue's targets checked; each
#    workload is recorded as it finishes, so a timeout keeps what was measured.
# Each step has its own time limit, so one failing or slow step leaves time for the others;
# the whole script stays under ~8 minutes. The exit status is the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log="$out/gpu-suite.log"
status=0
step() {  # step <seconds> <command...>: run, log, remember the first failure
    local limit=$1; shift
    echo "\$ $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "(exit $rc)" | tee -a "$log"
    [ "$status" -eq 0 ] && [ "$rc" -ne 0 ] && status=$rc
    return 0
}
: > "$log"
step 60 pip install -q --no-deps -e .
step 30 python -c "import torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, torch.cuda.get_device_name())"
step 120 env TRITON_F32_DEFAULT=ieee python -m pytest -q -p no:cacheprovider tests/triton
step 120 env TRITON_F32_DEFAULT=ieee python -m pytest -q -p no:cacheprovider -m cuda \
    tests/cuda/test_triton_kernels.py
step 210 attnlab bench run gpu --device cuda --dtype bf16 --rounds 3 --no-plots --out "$out"
exit "$status"
