"""scripts/device_encoder.py: the encoder carried to a GPU machine as int8 rows comes back as a working fp16 model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import REPO
from retrolm.core.hub import resolve_model
from retrolm.text.encoder import SentenceEncoder

SCRIPT = REPO / "scripts" / "device_encoder.py"


def test_pack_halves_the_weights_and_unpack_gives_the_same_embeddings(tmp_path):
    src = Path(resolve_model("minilm").path)
    for action, a, b in (("pack", src, tmp_path / "int8"), ("unpack", tmp_path / "int8", tmp_path / "fp16")):
        subprocess.run([sys.executable, str(SCRIPT), action, str(a), str(b)], check=True, capture_output=True)
    packed = (tmp_path / "int8" / "model.int8.safetensors").stat().st_size
    assert packed < 0.3 * (src / "model.safetensors").stat().st_size  # int8 of fp32: ~1/4, the carry limit's point
    assert (tmp_path / "fp16" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    orig, back = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "fp16" / "model.safetensors"))
    assert orig.keys() == back.keys()
    for name, w in orig.items():
        if w.ndim == 2:  # rows quantised: error at most half a step of that row's scale (+ fp16 rounding)
            step = w.abs().amax(dim=1, keepdim=True) / 127
            assert ((back[name].float() - w).abs() <= 0.5 * step + 1e-3 * w.abs() + 1e-6).all(), name
    texts = ["The scheduler picks the next task to run.", "Paris is the capital of France.", "def f(x): return x"]
    a = SentenceEncoder(str(src), device="cpu").encode(texts)
    b = SentenceEncoder(str(tmp_path / "fp16"), device="cpu", dtype=torch.float32).encode(texts)
    assert np.einsum("ij,ij->i", a, b).min() > 0.999
