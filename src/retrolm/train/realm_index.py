"""REALM's document index and its asynchronous refresh.

Documents are database chunks (:class:`DatabaseDocuments`; deleted ones are never retrieved) or a plain list of
texts (:class:`TextDocuments`, for tests and small experiments). A :class:`DocumentIndex` is an immutable snapshot:
the (N, D) embeddings of every document by one snapshot of the document encoder, searched by exact inner product
(``torch.topk`` over ``queries @ embeddings.T``; flat search is what REALM's MIPS index approximates).

:class:`IndexRefresher` keeps the current index and refreshes it the way REALM's separate index-builder job does:
:meth:`~IndexRefresher.start` deep-copies the document encoder (a snapshot, taken between optimizer steps) and a
background thread re-embeds every document with it while training continues on the old index; the trainer calls
:meth:`~IndexRefresher.poll` once per step, which swaps the finished index in with one reference assignment (a
search holds the object it started with, so it never sees a half-built index) and records the **refresh lag**:
steps between the snapshot and the swap.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from retrolm.core.errors import RetrolmError
from retrolm.db import DatabaseView
from retrolm.models.realm import RealmModel, retrieval_vectors

logger = logging.getLogger(__name__)


class Documents(Protocol):
    """What REALM retrieves from: ``len(docs)`` documents, their texts by id, and which ones may be retrieved."""

    def __len__(self) -> int: ...

    def texts(self, ids: Sequence[int]) -> list[str]: ...

    def live(self) -> np.ndarray | None:
        """Bool mask of retrievable documents (None: all)."""
        ...


class TextDocuments:
    """Documents given as a list of texts."""

    def __init__(self, texts: Sequence[str]) -> None:
        self._texts = list(texts)

    def __len__(self) -> int:
        return len(self._texts)

    def texts(self, ids: Sequence[int]) -> list[str]:
        return [self._texts[int(i)] for i in ids]

    def live(self) -> np.ndarray | None:
        return None


class DatabaseDocuments:
    """The chunks of a retrolm database as REALM documents (chunks of deleted documents are never retrieved)."""

    def __init__(self, db: DatabaseView) -> None:
        self.db = db

    def __len__(self) -> int:
        return int(self.db.store.n_chunks)

    def texts(self, ids: Sequence[int]) -> list[str]:
        return self.db.store.texts(np.asarray(ids, dtype=np.int64), self.db.tokenizer)

    def live(self) -> np.ndarray | None:
        deleted = np.asarray(self.db.deleted_chunks, dtype=bool)
        return ~deleted if deleted.any() else None


class DocEmbedder(nn.Module):
    """A frozen copy of Embed_doc (document encoder + projection + its own tokenizer copy, for use in a thread)."""

    def __init__(self, model: RealmModel, max_len: int) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(model.doc_encoder).eval().requires_grad_(False)
        self.proj = copy.deepcopy(model.doc_proj).eval().requires_grad_(False)
        self.shape = model.shape
        self.tokenizer = copy.deepcopy(model.tokenizer)  # HF fast tokenizers must not be shared between threads
        self.max_len = max_len

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        device = next(self.encoder.parameters()).device
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_len, padding=True, return_tensors="pt")
        h = self.encoder(input_ids=enc["input_ids"].to(device),
                         attention_mask=enc["attention_mask"].to(device)).last_hidden_state
        return retrieval_vectors(h, enc["attention_mask"].to(device), self.shape, self.proj).float().cpu()  # (n, D)


def embed_documents(embedder: DocEmbedder, docs: Documents, batch_size: int = 64) -> Tensor:
    """(N, D) float32 embeddings of every document."""
    n = len(docs)
    out = [embedder.embed(docs.texts(range(i, min(i + batch_size, n)))) for i in range(0, n, batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 1)


@dataclass(frozen=True)
class DocumentIndex:
    """An immutable exact inner-product index over the documents' embeddings."""

    embeddings: Tensor
    """(N, D) float32 on the CPU."""
    step: int
    """Training step of the document-encoder snapshot that made it."""
    live: Tensor | None = None
    """(N,) bool: retrievable documents (None: all)."""

    @classmethod
    def build(cls, model: RealmModel, docs: Documents, step: int = 0, max_len: int = 128, batch_size: int = 64
              ) -> DocumentIndex:
        """Embed every document with a snapshot of ``model``'s document encoder."""
        live = docs.live()
        return cls(embed_documents(DocEmbedder(model, max_len), docs, batch_size), step,
                   None if live is None else torch.from_numpy(live))

    def __len__(self) -> int:
        return len(self.embeddings)

    def search(self, queries: Tensor, k: int, exclude: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """Top-k (scores, ids), best first: queries (B, D) → (B, k) each. ``exclude`` gives per query one id it must
        not retrieve (-1: none), e.g. the chunk a pre-training sentence comes from."""
        scores = queries.detach().float().cpu() @ self.embeddings.T  # (B, N)
        if self.live is not None:
            scores = scores.masked_fill(~self.live, float("-inf"))
        if exclude is not None:
            rows = [i for i, e in enumerate(exclude) if e >= 0]
            scores[rows, [int(exclude[i]) for i in rows]] = float("-inf")
        # never more than every row can fill with retrievable documents: a -inf candidate would be an excluded
        # source or a deleted chunk coming back
        available = len(self) if self.live is None else int(self.live.sum())
        if exclude is not None and any(e >= 0 for e in exclude):
            available -= 1
        if available < 1:
            raise RetrolmError("no retrievable document: every document is deleted or excluded")
        return scores.topk(min(k, available), dim=1)


@dataclass
class RefreshRecord:
    """One finished refresh."""

    snapshot_step: int
    swap_step: int
    seconds: float

    @property
    def lag(self) -> int:
        """Steps the trainer took on the old index while this one was being built."""
        return self.swap_step - self.snapshot_step


@dataclass
class IndexRefresher:
    """The current :class:`DocumentIndex` and a background thread that rebuilds it (see the module docstring)."""

    docs: Documents
    index: DocumentIndex
    max_len: int = 128
    batch_size: int = 64
    history: list[RefreshRecord] = field(default_factory=list)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _result: DocumentIndex | None = field(default=None, repr=False)
    _error: BaseException | None = field(default=None, repr=False)
    _started: float = field(default=0.0, repr=False)

    @property
    def busy(self) -> bool:
        """A refresh was started and has not been swapped in yet."""
        return self._thread is not None

    def start(self, model: RealmModel, step: int) -> bool:
        """Snapshot the document encoder now and re-embed in the background; False if a refresh is in flight."""
        if self.busy:
            return False
        embedder = DocEmbedder(model, self.max_len)  # the snapshot: later optimizer steps do not change it
        live = self.index.live

        def work() -> None:
            try:
                self._result = DocumentIndex(embed_documents(embedder, self.docs, self.batch_size), step, live)
            except BaseException as e:  # re-raised in the trainer's thread by poll()
                self._error = e

        self._started = time.perf_counter()
        self._thread = threading.Thread(target=work, name=f"realm-refresh-{step}", daemon=True)
        self._thread.start()
        return True

    def poll(self, step: int, wait: bool = False) -> RefreshRecord | None:
        """Swap a finished index in (waiting for it if ``wait``); returns the refresh's record, or None."""
        if self._thread is None or (not wait and self._thread.is_alive()):
            return None
        self._thread.join()
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        new, self._result = self._result, None
        assert new is not None
        self.index = new  # the atomic swap: searches that started on the old index keep their reference
        record = RefreshRecord(new.step, step, time.perf_counter() - self._started)
        self.history.append(record)
        logger.info("index refreshed: snapshot of step %d swapped in at step %d (lag %d steps, %.1f s)",
                    record.snapshot_step, step, record.lag, record.seconds)
        return record

    def close(self) -> None:
        """Wait for a refresh in flight and drop it."""
        if self._thread is not None:
            self._thread.join()
        self._thread, self._result, self._error = None, None, None
