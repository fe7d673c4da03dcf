#!/usr/bin/env bash
# One call on the GPU machine: environment, the whole test suite (gpu-marked tests included),
# and the benchmarks. Logs and JSON results go under $OUT (default benchmarks/results/local).
#   device run:  bash benchmarks/gpu_check.sh            (carry .whl for entmax)
set -uo pipefail
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
status=0
python3 -m pytest -q -x -p no:cacheprovider ${PYTEST_ARGS:-tests} 2>&1 | tee "$OUT/tests.log" || status=1
for b in ${BENCHES:-benchmarks/bench_blockmask.py}; do
  python3 "$b" --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/$(basename "$b" .py).log" || status=1
done
exit $status
