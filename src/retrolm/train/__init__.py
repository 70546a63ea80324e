"""Training recipes on a retrieval database: the shared loop, RETRO from scratch (and its baseline)."""

from retrolm.train.config import LoopConfig, ModelSpec, TrainConfig
from retrolm.train.data import Batch, RetroSequences, chunk_bytes
from retrolm.train.scoring import Scores, bits_per_byte, score_sequences
from retrolm.train.trainer import Trainer

__all__ = ["Batch", "LoopConfig", "ModelSpec", "RetroSequences", "Scores", "TrainConfig", "Trainer",
           "bits_per_byte", "chunk_bytes", "score_sequences"]
