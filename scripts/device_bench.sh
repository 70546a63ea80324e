#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool): training-step throughput, MFU and peak memory of RETRO and the
# same-size baseline at the issue's shape (d=768, 12 layers, vocab 32k, T=2048, k=2 neighbours of 128 tokens,
# CCA at [6, 9, 12], batch 8, bf16), eager and torch.compile'd, plus RETRO with a 384-wide encoder. Results go to $OUT.
#
#   run(command="bash scripts/device_bench.sh", carry=[".whl"], timeout_s=600)
#
# The device image has torch, einops, safetensors, tokenizers, transformers, rich and tqdm; retrolm itself is used
# from the source tree (PYTHONPATH). Wheels it lacks (faiss-cpu, datasketch, omegaconf; see benchmarks/RESULTS.md)
# travel in .whl/ and are installed into .site/, which stays on the machine for a following call while it is warm.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
export PYTHONPATH=.site:src PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
python3 benchmarks/bench_train.py --shape paper --compile both --json "$OUT/bench_train.json" \
  --out "$OUT/RESULTS.md" 2>&1 | tee "$OUT/bench_train.log"
python3 benchmarks/bench_train.py --shape paper --compile yes --models retro --enc-d-model 384 \
  --json "$OUT/bench_train_enc384.json" --out "$OUT/RESULTS.md" 2>&1 | tee "$OUT/bench_train_enc384.log"
cat "$OUT/RESULTS.md"
