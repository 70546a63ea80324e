"""Evaluation: bits-per-byte with and without retrieval on held-out text, leakage, scaling curves, reports."""

from retrolm.eval.config import EvalConfig, ScaleConfig
from retrolm.eval.evaluator import EvalModel, Evaluator
from retrolm.eval.run import run_eval
from retrolm.eval.scaling import scale_db_size, scale_neighbours

__all__ = ["EvalConfig", "EvalModel", "Evaluator", "ScaleConfig", "run_eval", "scale_db_size", "scale_neighbours"]
