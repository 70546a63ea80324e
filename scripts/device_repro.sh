#!/usr/bin/env bash
# Second chained device call (after scripts/device_setup.sh): the build throughput benchmark on the GPU, the GPU
# reproduction (scripts/reproduce.py --profile gpu), and generation speed over its database. Resumable: if the call
# runs out of time, running it again on the still-warm machine continues where it stopped. Results come back as
# $OUT/*.json, logs and results-gpu.tar.gz (docs/results-gpu.md, its plots, every run's metrics and eval JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
mkdir -p "$OUT" runs/device
export PYTHONPATH=$PWD/.site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ENC=.enc/all-MiniLM-L6-v2
[ -d .site/faiss ] && [ -f data/full/wiki.jsonl ] && [ -f $ENC/model.safetensors ] || {
  echo "missing .site, data/full or $ENC: run scripts/device_setup.sh first on the same warm machine"; exit 3; }
BUDGET=${BUDGET:-540}  # seconds this call may spend; the reproduction is cut before the device limit
T0=$(date +%s)

if [ ! -f runs/device/bench_build.json ]; then
  python3 benchmarks/bench_build.py --corpus data/full/linux-docs.jsonl --device cuda --batch-size 4096 \
    --encoder $ENC --json runs/device/bench_build.json 2>&1 | grep -v "Loading weights" | tee "$OUT/bench_build.log"
fi
cp runs/device/bench_build.json "$OUT/" 2>/dev/null

LEFT=$((BUDGET - ($(date +%s) - T0) - 45))
timeout $LEFT python3 scripts/reproduce.py --profile gpu --encoder $ENC 2>&1 | grep -v "Loading weights" \
  > "$OUT/reproduce.log"
echo "reproduce exit ${PIPESTATUS[0]}"
tail -40 "$OUT/reproduce.log"
if [ -f docs/results-gpu.md ] && [ ! -f runs/device/bench_gen.json ]; then
  timeout 40 python3 benchmarks/bench_train.py --shape paper --models none --db runs/repro/gpu/db \
    --json runs/device/bench_gen.json 2>&1 | tail -3
fi
cp runs/device/bench_gen.json "$OUT/" 2>/dev/null
cp runs/repro/gpu/timings.json "$OUT/" 2>/dev/null
tar czf "$OUT/results-gpu.tar.gz" docs/results-gpu.md docs/results-gpu runs/repro/gpu/timings.json \
  runs/repro/gpu/*/metrics.jsonl runs/repro/gpu/*/config.yaml runs/repro/gpu/eval*/*.json runs/repro/gpu/scale-*/*.json \
  runs/repro/gpu/*/report.md runs/repro/gpu/db/meta.json 2>/dev/null
ls -la "$OUT"
