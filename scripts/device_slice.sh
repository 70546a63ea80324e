#!/usr/bin/env bash
# One device call (~10 minutes of a lent GPU) for issues 11 and 12, in order of importance, each part cut to fit:
#   1. database build throughput on the GPU against the bare encoder (Wikipedia summaries), pre-tokenized, in
#      exact-length batches, and the encoder alone with and without an attention mask;
#   2. RETRO at the paper's width: memory and throughput with and without recomputing the neighbour encoder;
#   3. scripts/evidence_gpu.py: evidence v2 on every kernel document with dense keys and GPU neighbour search;
#   4. build throughput on the kernel docs and the Python docs, if time is left.
# Re-running it on the still-warm machine continues where it stopped. Results come back as $OUT/slice.tar.gz
# (JSON, logs, the results page; one file, since a call returns at most 8).
#
#   run(command="bash scripts/device_slice.sh", carry=[".whl", ".enc", ".corp"], timeout_s=600)
#   run(command="EVIDENCE_ONLY=1 bash scripts/device_slice.sh", ...)    # the next slice: evidence alone
# When the three and the tree exceed the 64 MiB a call carries (scripts/device_prepare.sh says), two calls, the second
# within the machine's 30 s idle window (.site/ and the unpacked corpora stay on the warm machine):
#   run(command="SETUP_ONLY=1 bash scripts/device_slice.sh", carry=[".whl", ".corp"], timeout_s=120)
#   run(command="bash scripts/device_slice.sh", carry=[".enc"], timeout_s=600)
#
# Prepared here beforehand by scripts/device_prepare.sh (all ignored by git):
#   .whl/  faiss-cpu, omegaconf, datasketch, bm25s wheels for Python 3.12 (pip download, see the device README)
#   .enc/minilm-int8/  python scripts/device_encoder.py pack <all-MiniLM-L6-v2 folder> .enc/minilm-int8
#   .corp/evidence-gpu.tar.xz  train.jsonl, heldout.jsonl, noise.jsonl of runs/evidence-retro/gpu (prepare() of
#          scripts/evidence_retro.py --profile gpu), tar | xz -9e
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device/out}  # not runs/device: the end empties $OUT, and runs/device keeps what is done
mkdir -p "$OUT"
T0=$(date +%s)
BUDGET=${BUDGET:-560}  # seconds this call may use; parts are cut to end before it
left() { echo $((BUDGET - ($(date +%s) - T0))); }
export PYTHONPATH=$PWD/.site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ENC=/tmp/all-MiniLM-L6-v2
W=runs/evidence-retro/gpu-slice
if [ ! -d .site/faiss ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl || exit 3
fi
if [ ! -f $ENC/model.safetensors ] && [ -d .enc/minilm-int8 ]; then
  python3 scripts/device_encoder.py unpack .enc/minilm-int8 $ENC || exit 3
fi
if [ ! -f $W/heldout.jsonl ]; then
  mkdir -p $W && tar xJf .corp/evidence-gpu.tar.xz -C $W || exit 3
  # the build benchmark's corpora, cut from the same files: Wikipedia, kernel 6.1, Python docs (= noise.jsonl)
  python3 - "$W" <<'EOF'
import json, sys
w = sys.argv[1]
rows = [json.loads(x) for x in open(f"{w}/train.jsonl", encoding="utf-8")]
for name, prefix in (("bench-wiki", "wiki/"), ("bench-linux61", "6.1/")):
    with open(f"{w}/{name}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if r["id"].startswith(prefix))
EOF
fi
if [ "${SETUP_ONLY:-0}" = 1 ]; then  # the first of two calls: what it set up stays on the warm machine
  ls .site "$W"; echo "set up in $(( $(date +%s) - T0 )) s"; exit 0
fi
[ -f $ENC/model.safetensors ] || { echo "no encoder at $ENC: carry .enc"; exit 3; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
echo "setup done at $(( $(date +%s) - T0 )) s"

bench_build() {  # corpus name
  [ -f "$OUT/bench_build_$2.json" ] || [ -f runs/device/bench_build_$2.json ] && return
  timeout "$3" python3 benchmarks/bench_build.py --corpus "$1" --device cuda --batch-size 1024 --encoder $ENC \
    --json runs/device/bench_build_$2.json 2>&1 | grep -v "Loading weights" | tail -25 | tee "$OUT/bench_build_$2.log"
}
mkdir -p runs/device
# EVIDENCE_ONLY=1: the whole call for the evidence (on 2026-12-04 the benchmarks took 231 s of 560, and the database
# build plus baseline-medium the next 217 s, so RETRO-small did not fit)
[ "${EVIDENCE_ONLY:-0}" = 1 ] || bench_build $W/bench-wiki.jsonl wiki 100
# the mask hypothesis apart from the build: the same batch with no padding, and with 20% padding and its mask
if [ "${EVIDENCE_ONLY:-0}" != 1 ] && [ ! -f runs/device/bench_encoder_pad.json ]; then
  timeout 60 python3 benchmarks/bench_encoder.py --encoder $ENC --lengths 80 --batches 1024 --pad 0,0.2 \
    --json runs/device/bench_encoder_pad.json 2>&1 | grep -v "Loading weights" | tail -6 | tee "$OUT/bench_encoder_pad.log"
fi
if [ "${EVIDENCE_ONLY:-0}" != 1 ] && [ ! -f runs/device/bench_train_ckpt.json ]; then
  timeout 170 python3 benchmarks/bench_train.py --shape paper --compile yes --models retro \
    --checkpoint-activations none,encoder --steps 10 --warmup 3 --json runs/device/bench_train_ckpt.json 2>&1 \
    | grep -v Warning | tail -12 | tee "$OUT/bench_train_ckpt.log"
fi
echo "benchmarks done at $(( $(date +%s) - T0 )) s"

L=$(left)
if [ "$L" -gt 120 ]; then
  timeout $((L - 40)) python3 scripts/evidence_gpu.py --encoder $ENC --work $W --deadline $(( $(date +%s) + L - 45 )) \
    2>&1 | grep -v "Loading weights\|it/s\]" > "$OUT/evidence.log"
  echo "evidence exit ${PIPESTATUS[0]} at $(( $(date +%s) - T0 )) s"
  tail -15 "$OUT/evidence.log"
else
  echo "evidence skipped: ${L} s left"
fi

L=$(left)
[ "$L" -gt 100 ] && bench_build $W/bench-linux61.jsonl linux61 $((L / 2 - 10))
L=$(left)
[ "$L" -gt 60 ] && bench_build $W/noise.jsonl python $((L - 25))
# at most 8 files come back from $OUT: everything but the console log goes into one tarball
tar czf "$OUT/slice.tar.gz" runs/device/*.json "$OUT"/*.log "$OUT/gpu.txt" docs/results/retro-gpu-slice \
  $W/timings.json $W/*/metrics.jsonl $W/*/config.yaml $W/db/meta.json $W/neighbours/neighbours.json 2>/dev/null
find "$OUT" -type f ! -name slice.tar.gz -delete
ls -la "$OUT"
echo "total $(( $(date +%s) - T0 )) s"
