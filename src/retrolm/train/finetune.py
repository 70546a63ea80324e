"""Plain fine-tuning of a pretrained causal LM on a list of texts: how knowledge gets into the weights, the
alternative to reading it from a database that the knowledge-injection study measures (SPEC K)."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from retrolm.core.errors import RetrolmError
from retrolm.models.hf import CausalLM, pad_rows
from retrolm.text.tokenizer import LMTokenizer

logger = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """Full fine-tuning of every weight with AdamW, constant learning rate after a short warm-up."""

    epochs: int = 10
    lr: float = 3e-5
    batch_size: int = 8
    weight_decay: float = 0.0
    warmup_steps: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.warmup_steps < 0:
            raise RetrolmError("finetune: epochs and batch_size must be >= 1, warmup_steps >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise RetrolmError(f"finetune: lr must be > 0, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise RetrolmError(f"finetune: weight_decay must be >= 0, got {self.weight_decay}")


def finetune(lm: CausalLM, tokenizer: LMTokenizer, texts: Sequence[str], cfg: FinetuneConfig,
             show_progress: bool = True) -> list[float]:
    """Train every weight of ``lm`` (in place) to predict ``texts``, each a sequence of its own ending with the
    tokenizer's EOS (as a prompt made of the text's start would be read: nothing before it); shuffled every epoch
    with ``cfg.seed``. Returns the mean loss (nats per token) of each epoch; ``lm`` is left in eval mode."""
    if not texts:
        raise RetrolmError("finetune: no texts")
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    rows = [tokenizer.encode(t) + eos for t in texts]
    if max(len(r) for r in rows) > lm.context_len:
        raise RetrolmError(f"finetune: a text of {max(len(r) for r in rows)} tokens exceeds the context of {lm.name}")
    hf = lm.hf
    hf.requires_grad_(True)
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    dev = lm.device
    losses, step = [], 0
    try:
        for _ in tqdm(range(cfg.epochs), desc="fine-tuning", unit="epoch", disable=not show_progress):
            order = list(range(len(rows)))
            rng.shuffle(order)
            total, count = 0.0, 0
            for start in range(0, len(order), cfg.batch_size):
                ids, mask = pad_rows([rows[i] for i in order[start : start + cfg.batch_size]], tokenizer.pad_id)
                ids, mask = ids.to(dev), mask.to(dev)
                logits = hf(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * min(1.0, (step + 1) / (cfg.warmup_steps + 1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                n = int((target != -100).sum())
                total, count = total + float(loss.detach()) * n, count + n
            losses.append(total / count)
            logger.info("fine-tuning epoch %d: loss %.4f", len(losses), losses[-1])
    finally:
        hf.requires_grad_(False)
        hf.eval()
    return losses


__all__ = ["FinetuneConfig", "finetune"]
