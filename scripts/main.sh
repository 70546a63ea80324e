#!/usr/bin/env bash
# The main job, end to end on the bundled defaults: build a retrieval database from the bundled corpus
# (1,200 Wikipedia summaries, data/wiki-sample.jsonl) with the offline MiniLM encoder and FAISS, then search it.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN=${RUN:-runs/quickstart}
mkdir -p "$RUN"
R=.venv/bin/retrolm
if [ ! -f "$RUN/db/meta.json" ]; then
  $R db build data/wiki-sample.jsonl --out "$RUN/db" --tokenizer train:8192
fi
$R db info "$RUN/db"
$R db search "$RUN/db" "the planet closest to the sun" -k 3
$R db search "$RUN/db" "a famous science fiction film by Stanley Kubrick" -k 3
