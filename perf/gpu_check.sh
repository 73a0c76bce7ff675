#!/usr/bin/env bash
# The GPU checks of one lent-device session, in one go (a few minutes on an H100):
#   1. the gpu-marked tests (flash-attn and SDPA kernels against each other);
#   2. perf/mae_step.py: eoforge's MAE step under ZeRO-2 (bf16-autocast: eager, compiled, and
#      compiled with the loop's non-finite guard; DeepSpeed's bf16: eager and compiled) and in
#      plain torch, beside the reference MAE under DeepSpeed ZeRO-2 + compile (bf16 and
#      bf16-autocast) and in plain compiled torch, with the MFU (target 1);
#   3. perf/selective_mae.py: SelectiveMAE beside the compiled reference MAE (target 2).
# JSON and Markdown results go to $OUT (the device tool's output folder) or perf/results. A step
# that fails is reported and the next one still runs; the exit status says whether every step
# ran (the gates' verdicts are in the results, not in the status).
#
#   perf/gpu_check.sh           on the GPU machine: carried wheels in .whl/ are installed into
#                               .site/ first, and .ref/ref_mae.py is the reference if present
#   perf/gpu_check.sh --smoke   the same steps at tiny shapes on a CPU (the test suite runs it)
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1
python=${PYTHON:-python3}
ref=${REF_MAE:-../shared/bench/ref_mae.py}
[ -f .ref/ref_mae.py ] && ref=.ref/ref_mae.py

if [ "$smoke" = 1 ]; then
    out=${OUT:-$(mktemp -d)}  # smoke figures never overwrite the committed results
    export DS_ACCELERATOR=cpu
    "$python" perf/mae_step.py --smoke --ref "$ref" --out "$out"
    "$python" perf/selective_mae.py --smoke --ref "$ref" --out "$out"
    exit 0
fi

out=${OUT:-perf/results}
if [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --target .site .whl/*.whl
    export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
fi
"$python" -c "import torch; print('device:', torch.cuda.get_device_name())"
status=0
# Only the files holding gpu-marked tests: collecting the rest needs packages this machine lacks.
mapfile -t files < <(grep -l "mark.gpu" tests/test_*.py || true)
if [ "${#files[@]}" -gt 0 ]; then
    "$python" -m pytest -q -m gpu -p no:cacheprovider "${files[@]}" > "$out/gpu_tests.txt" 2>&1 \
        || status=1
    tail -n 15 "$out/gpu_tests.txt"
fi
"$python" perf/mae_step.py --ref "$ref" --out "$out" > "$out/mae_step.log" 2>&1 || status=1
tail -n 25 "$out/mae_step.log"
"$python" perf/selective_mae.py --ref "$ref" --out "$out" > "$out/selective_mae.log" 2>&1 \
    || status=1
tail -n 25 "$out/selective_mae.log"
exit $status
