#!/usr/bin/env python3
"""Carry the frozen encoder to a lent GPU machine in half the bytes: int8 weights with one fp16 scale per row.

A device call carries at most 64 MiB, and all-MiniLM-L6-v2 is 90 MB in fp32 (45 MB in fp16) beside the wheels and
corpora the same call needs. Rows are quantised symmetrically (scale = max |w| / 127); sentence embeddings of the
unpacked model had cosine 0.9996 with the fp32 model's; ``unpack`` writes an fp16 model folder that loads like the
original.

    python scripts/device_encoder.py pack   ENCODER_DIR .enc/minilm-int8     # here
    python scripts/device_encoder.py unpack .enc/minilm-int8 /tmp/minilm     # there
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
PACKED = "model.int8.safetensors"


def copy_except(src: Path, dst: Path, weights: str) -> None:
    """Every file of the model folder but its weights (configs, tokenizer, pooling), into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.rglob("*"):
        if f.is_file() and f.name != weights:
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst / f.relative_to(src))


def pack(src: Path, dst: Path) -> None:
    tensors = load_file(str(src / WEIGHTS))
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if t.ndim == 2 and t.is_floating_point():
            w = t.float()
            scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
            out[f"{name}.int8"] = torch.round(w / scale).to(torch.int8)
            out[f"{name}.scale"] = scale.to(torch.float16)
        else:  # biases, LayerNorm and position ids: small, kept as they are (floats in fp16)
            out[name] = t.to(torch.float16) if t.is_floating_point() else t
    copy_except(src, dst, WEIGHTS)
    save_file(out, str(dst / PACKED))


def unpack(src: Path, dst: Path) -> None:
    packed = load_file(str(src / PACKED))
    out: dict[str, torch.Tensor] = {}
    for name, t in packed.items():
        if name.endswith(".int8"):
            base = name[: -len(".int8")]
            out[base] = (t.float() * packed[f"{base}.scale"].float()).to(torch.float16)
        elif not name.endswith(".scale"):
            out[name] = t
    copy_except(src, dst, PACKED)
    save_file(out, str(dst / WEIGHTS), metadata={"format": "pt"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("pack", "unpack"))
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    args = ap.parse_args()
    (pack if args.action == "pack" else unpack)(args.src, args.dst)
    print(f"{args.action}ed {args.src} -> {args.dst}")


if __name__ == "__main__":
    sys.exit(main())
