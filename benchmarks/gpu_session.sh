#!/usr/bin/env bash
# Both benchmarks on a lent GPU in one call: a fail-fast smoke run, throughput.py on cuda, then the recipe grid
# as parallel single-run jobs in priority order until a deadline; unfinished runs are left out of the report.
#
#   FRUGALDIFF_CACHE=DIR OUT=DIR [RECIPES="ddpm sd3 …"] [SET="--set KEY=VALUE …"] [THROUGHPUT=0] \
#       bash benchmarks/gpu_session.sh [IMAGES] [SECONDS] [WORKERS]
#
# DIR (FRUGALDIFF_CACHE) must hold mnist5000.npz and the domain classifier (carry them: nothing is downloaded).
# IMAGES is the batch-8 budget (default 24000; ddpm also runs at twice it), SECONDS the training deadline
# (default 420), WORKERS the parallel runs (default 14). Results: $OUT/gpu.tgz (tables, results.json, curves,
# each run's metrics.csv) and $OUT/throughput-cuda.json.
set -u
images=${1:-24000}
deadline=$(( $(date +%s) + ${2:-420} ))
workers=${3:-14}
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
grid=/tmp/grid
mkdir -p "$grid" "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

recipes="python3 benchmarks/recipes.py --recipe-file benchmarks/frugal-candidates.json --eval-every $((images / 2)) \
    ${SET:-}"
$recipes --out /tmp/smoke --smoke || { echo "smoke run failed: stopping"; exit 1; }
if [ "${THROUGHPUT:-1}" = 1 ]; then
    timeout 120 python3 benchmarks/throughput.py --device cuda --blocks 3 --steps 20 \
        --json "$OUT/throughput-cuda.json" || echo "throughput.py failed or timed out"
fi

# Jobs, most important first: batch 8 one seed at a time, ddpm at twice the images, then batch 64.
main=${RECIPES:-ddpm sd3 edm frugal sd3-strat sd3-strat-low flow-mixed edm-strat min-snr iddpm}
jobs=/tmp/jobs.txt
{
    for seed in 0 1 2; do
        for r in $main; do echo "--out $grid/main --images $images --batch-sizes 8 --recipes $r --seeds $seed"; done
    done
    for seed in 0 1 2; do
        echo "--out $grid/double --images $((2 * images)) --batch-sizes 8 --recipes ddpm --seeds $seed"
    done
    for seed in 0 1 2; do
        for r in $main; do echo "--out $grid/main --images $images --batch-sizes 64 --recipes $r --seeds $seed"; done
    done
} >"$jobs"
mkdir -p "$grid/logs"
(cat "$jobs" | nl -nln | xargs -P "$workers" -L 1 bash -c \
    'n=$1; shift; '"$recipes"' "$@" >'"$grid"'/logs/job-$n.log 2>&1 || echo "job $n failed: $*"' _) &
runner=$!
while kill -0 "$runner" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
pkill -f -- "--out $grid/"; kill "$runner" 2>/dev/null; sleep 2
echo "finished runs: $(find "$grid" -name heldout_x0.json | wc -l) of $(wc -l <"$jobs")"

$recipes --out "$grid/main" --images "$images" --batch-sizes 8 64 --recipes $main --report-only
$recipes --out "$grid/double" --images $((2 * images)) --batch-sizes 8 --recipes ddpm --report-only
(cd "$grid" && tar czf "$OUT/gpu.tgz" --exclude=checkpoints --exclude='*.safetensors' --exclude=tensorboard .)
ls -la "$OUT"
