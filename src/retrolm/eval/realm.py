"""REALM open-domain QA evaluation: SQuAD exact match / F1 of the predicted spans, and retrieval recall@k.

``recall_at_k`` (in %) is the fraction of questions for which a gold answer occurs (after SQuAD normalisation) in at
least one of the ``qa_k`` retrieved documents: the reader's ceiling.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from retrolm.core.config import save_config
from retrolm.core.io import output_folder, write_json
from retrolm.eval.qa import QAItem, mean_scores, normalize_answer, score_prediction
from retrolm.models.realm import RealmModel
from retrolm.train.realm import RealmConfig, predict
from retrolm.train.realm_index import DocumentIndex, Documents


def evaluate_realm(model: RealmModel, docs: Documents, items: Sequence[QAItem], cfg: RealmConfig,
                   out_dir: str | Path | None = None, index: DocumentIndex | None = None) -> dict:
    """EM, F1, n and recall@k of ``model`` on ``items``; written to ``OUT/realm.json`` (with per-question
    predictions) when ``out_dir`` is given."""
    out = None if out_dir is None else output_folder(out_dir, "realm eval")  # before the work, not after
    index = index or DocumentIndex.build(model, docs, 0, cfg.max_doc_len, cfg.embed_batch_size)
    items = [it for it in items if not it.multiple_choice]
    answers, retrieved = predict(model, index, docs, [it.question for it in items], cfg)
    scores, found, rows = [], [], []
    for it, pred, ids in zip(items, answers, retrieved.tolist(), strict=True):
        s = score_prediction(pred, it)
        texts = [f" {normalize_answer(t)} " for t in docs.texts(ids)]
        hit = any(f" {normalize_answer(a)} " in t for a in it.answers for t in texts)
        scores.append(s)
        found.append(hit)
        rows.append({"id": it.id, "prediction": pred, "answers": it.answers, **s, "retrieved": ids,
                     "answer_in_top_k": hit})
    result = {**mean_scores(scores), "recall_at_k": round(100 * sum(found) / max(1, len(found)), 2), "k": cfg.qa_k,
              "predictions": rows}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "realm.json", result)
        save_config(cfg, out / "config.yaml")
    return result
