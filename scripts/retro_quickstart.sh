#!/usr/bin/env bash
# RETRO from scratch, end to end on the bundled defaults (local files, FAISS, the offline MiniLM encoder and the bundled
# 1,200 Wikipedia summaries in data/wiki-sample.jsonl), about 7 minutes on 2 CPU cores:
#   1. split the corpus by document: 95% for the database (and training), 5% held out for evaluation
#   2. build the retrieval database and search it
#   3. train a tiny RETRO model and the same-size baseline decoder (same data, same steps)
#   4. generate with RETRO, showing the database chunks every generated chunk was conditioned on
#   5. evaluate on the held-out documents: bits-per-byte with and without retrieval, and the baseline
# Re-running skips finished steps (training resumes from its last checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN=${RUN:-runs/retro-quickstart}
R=.venv/bin/retrolm

echo "== 1. corpus split"
[ -f "$RUN/corpus/heldout.jsonl" ] || $R corpus split data/wiki-sample.jsonl --out "$RUN/corpus" --heldout 0.05

echo "== 2. retrieval database"
[ -f "$RUN/db/meta.json" ] || $R db build "$RUN/corpus/train.jsonl" --out "$RUN/db" --tokenizer train:8192
$R db info "$RUN/db"
$R db search "$RUN/db" "the planet closest to the sun" -k 3

echo "== 3. training (RETRO, then the baseline)"
$R train --config configs/tiny.yaml db="$RUN/db" out_dir="$RUN/retro-tiny"
$R train --config configs/tiny-baseline.yaml db="$RUN/db" out_dir="$RUN/baseline-tiny"

echo "== 4. generation with sources (sampled; 160 tokens even past end-of-text, so that several chunks show)"
$R generate --checkpoint "$RUN/retro-tiny" --db "$RUN/db" --prompt "The history of the Roman Empire" \
  --max-new-tokens 160 --temperature 0.8 --top-p 0.95 --ignore-eos

echo "== 5. held-out evaluation: with vs without retrieval"
$R eval --checkpoint "$RUN/retro-tiny" --baseline "$RUN/baseline-tiny" --db "$RUN/db" \
  --data "$RUN/corpus/heldout.jsonl" --out "$RUN/eval" -q
echo "report: $RUN/eval/report.md"
