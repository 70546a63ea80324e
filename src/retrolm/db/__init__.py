"""The retrieval database: chunks of a corpus, their frozen-encoder keys, FAISS and BM25 indexes, live updates."""

from retrolm.db.build import BuildConfig, tokenize_corpus
from retrolm.db.chunks import ChunkStore
from retrolm.db.database import Database, noisy_copy
from retrolm.db.index import SearchSettings, VectorIndex
from retrolm.db.view import DatabaseView, Hit

__all__ = ["BuildConfig", "ChunkStore", "Database", "DatabaseView", "Hit", "SearchSettings", "VectorIndex",
           "noisy_copy", "tokenize_corpus"]
