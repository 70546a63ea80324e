#!/usr/bin/env bash
# First of two chained device calls (the second must follow within the machine's 30 s warm window):
# installs the wheels the device image lacks into .site/ and unpacks the corpora into data/full/. Both folders are
# ignored by git, so they stay on the warm machine for the next call, which carries the encoder (.enc/); the three
# together are over the 64 MiB a single call may carry.
#
#   run(command="bash scripts/device_setup.sh", carry=[".whl", ".corp"])
#   run(command="bash scripts/device_repro.sh", carry=[".enc"])
#
# Here, beforehand: .whl/ = faiss-cpu, datasketch, omegaconf, antlr4 wheels for Python 3.12 (pip download, see the
# device README); .corp/ = data/full/{wiki,linux-docs,python-docs}.jsonl compressed with xz.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
mkdir -p data/full
for f in .corp/*.jsonl.xz; do xz -dc "$f" > "data/full/$(basename "$f" .xz)"; done
ls -la .site data/full
