"""A database split over machines: N shards searched together, each an ordinary database.

A corpus too big for one machine is built in N parts, ``retrolm db build CORPUS --out db-I --shard I/N`` on machine
I: each keeps the documents whose id hashes to I (:func:`retrolm.text.corpus.shard_of`), so the parts are disjoint
and every ``db add`` of the same files puts a document in exactly one of them. Each machine then serves its part with
``retrolm serve db-I`` (FastAPI/uvicorn, ``POST /api/search``), and a shards file names them::

    shards:
      - http://10.0.0.1:8000      # a `retrolm serve` of one shard
      - /data/db-1                # or a shard folder on this machine
    retriever: auto

A search asks every shard at once (one thread each) for its own top-k and merges them: the scatter-gather of
Elasticsearch and FAISS's ``IndexShards``. Dense scores are inner products of one frozen encoder, so the merged top-k
is exactly the top-k of one database holding every chunk (exact indexes; approximate ones are as approximate as on
their shard); the parts on this machine share one embedding of the queries, each remote part embeds them itself.
BM25 first sums every part's statistics for the query terms (chunks, their total length, how many hold each term:
Elasticsearch's ``dfs_query_then_fetch``), and every part scores with the sums, so the merged scores are the one
database's too, to float32 rounding (``global_stats: false``: each part's own statistics, as ``query_then_fetch``;
benchmarks/RESULTS.md measures both). Hybrid merges the dense and BM25 rankings over all shards first, then fuses
them by reciprocal rank.
Chunk ids are the shard's own; a hit says which shard it came from.

Every answer carries its part's build id: when a part was rebuilt since the front last looked (another encoder, or
another shard label), the parts are checked again before the search is run once more. A part is a database folder or
the service of one; a front of shards is not a part (list its parts instead).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrolm.core.config import load_config
from retrolm.core.errors import RetrolmError
from retrolm.db import DatabaseView, Hit
from retrolm.db.lexical import TermStats
from retrolm.db.meta import is_shards_file
from retrolm.retrieval import get_retriever
from retrolm.retrieval.base import Exclusion, Retriever
from retrolm.retrieval.bm25 import BM25Retriever
from retrolm.retrieval.hybrid import RRF_K

logger = logging.getLogger(__name__)

class PartUnavailable(RetrolmError):
    """A remote part could not be reached or failed (the front's service answers 502)."""


class PartRefused(RetrolmError):
    """A remote part refused a request (4xx): its limits may have changed since the front read them."""


@dataclass
class ShardsConfig:
    """A shards file: the parts of one database and how to search them."""

    shards: list[str] = field(default_factory=list)
    """Each part: a database folder (relative to the shards file) or the URL of a ``retrolm serve`` of it."""
    retriever: str = "auto"
    """auto | dense | bm25 | hybrid (auto: dense when every shard has dense keys, else BM25)."""
    complete: bool = True
    """Require the shards to be the N parts of one database (built with ``shard=I/N``, each I once); false searches
    any databases of one tokenizer and encoder together (their document ids should not collide)."""
    timeout: float = 60.0
    """Seconds to wait for a remote shard's answer."""
    hybrid_depth: int = 4
    """Hybrid: each ranking fetches this many times k before fusion (as :class:`HybridRetriever`)."""
    global_stats: bool = True
    """BM25 scores every part with the statistics of all parts (term frequencies and mean chunk length, summed: one
    more round trip to each remote part per search), so that the merged ranking is the one database's; false: each
    part's own statistics."""

    def __post_init__(self) -> None:
        if not self.shards:
            raise RetrolmError("`shards` lists no database")
        if self.timeout <= 0 or self.hybrid_depth < 1:
            raise RetrolmError("timeout must be > 0 and hybrid_depth >= 1")
        if self.retriever not in ("auto", "dense", "bm25", "hybrid"):
            raise RetrolmError(f"retriever must be one of auto, dense, bm25, hybrid; got {self.retriever!r}")


@dataclass
class ShardHit(Hit):
    """A :class:`Hit` from one shard; ``chunk_id`` is that shard's."""

    shard: str = ""
    """The shard it came from (its folder or URL, as the shards file names it)."""


@dataclass
class ShardAnswer:
    """One part's top-k for a batch of queries: scores first, hits made only for those the merge keeps (a local part
    decodes no chunk text that loses to another part's)."""

    scores: list[list[float]]
    """Per query, the part's scores, best first."""
    fetch: Callable[[int, list[int]], list[Hit]]
    """``fetch(q, ranks)``: query q's hits at those ranks of :attr:`scores`."""
    flops: list[dict] | None = None
    """Per query, the FLOPs of the search when the part reports them (remote parts; None for local ones)."""
    build_id: str | None = None
    """The build of the part that answered (checked against the one the front checked)."""

    def hits(self, q: int) -> list[Hit]:
        """Query q's hits, all of them."""
        return self.fetch(q, list(range(len(self.scores[q]))))


class Shard(ABC):
    """One part of a sharded database."""

    def __init__(self, name: str) -> None:
        self.name = name

    max_k: int | None = None
    """Most results one request may ask of this part (a remote part's service limit; None: no limit)."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """The part's ``db info``: counts, tokenizer, encoder, shard label, build id."""

    @abstractmethod
    def search(self, queries: Sequence[str], k: int, kind: str, exclude_docs: Sequence[Sequence[str]] | None = None,
               vectors: np.ndarray | None = None, stats: TermStats | None = None) -> ShardAnswer:
        """Per query, its top-k in this part (``exclude_docs``: per query, document ids it must not return;
        ``vectors``: the queries already embedded by this encoder, for a dense search; ``stats``: BM25 statistics of
        all parts, to score with instead of this part's own)."""

    @abstractmethod
    def term_stats(self, queries: Sequence[str]) -> TermStats:
        """This part's BM25 statistics for the queries' terms."""

    @abstractmethod
    def document(self, doc_id: str) -> dict[str, Any] | None:
        """A live document (``text``, ``source``: the file it came from), or None when this part does not hold it."""

    def close(self) -> None:  # noqa: B027 (a local part has nothing to release)
        """Release connections."""


def exclusion_by_ids(db: DatabaseView, doc_ids: Sequence[Sequence[str]] | None) -> Exclusion | None:
    """Per query, documents named by id that it must not retrieve (ids ``db`` does not hold are ignored: another
    part holds them)."""
    if doc_ids is None:
        return None
    store = db.store
    return Exclusion(docs=[[i for i in map(store.doc_index, ids) if i is not None] for ids in doc_ids])


class LocalShard(Shard):
    """A part stored on this machine (a database folder), followed like ``retrolm serve`` follows its database."""

    def __init__(self, path: str | Path, device: str | None = None) -> None:
        super().__init__(str(path))
        self.db = DatabaseView.open(path, device=device, follow=True)
        self._retrievers: dict[str, tuple[str | None, Retriever]] = {}

    def info(self) -> dict[str, Any]:
        self.db.refresh()
        return self.db.info()

    def retriever(self, kind: str) -> Retriever:
        """The part's retriever of ``kind``, made again when the folder was rebuilt (another encoder perhaps)."""
        self.db.refresh()
        build = self.db.meta.get("build_id")
        made = self._retrievers.get(kind)
        if made is None or made[0] != build:
            made = self._retrievers[kind] = (build, get_retriever(self.db, kind))
        return made[1]

    def search(self, queries: Sequence[str], k: int, kind: str, exclude_docs: Sequence[Sequence[str]] | None = None,
               vectors: np.ndarray | None = None, stats: TermStats | None = None) -> ShardAnswer:
        asked = vectors if vectors is not None and kind == "dense" else list(queries)
        retriever = BM25Retriever(self.db, stats) if stats is not None and kind == "bm25" else self.retriever(kind)
        self.db.refresh()  # the excluded documents' indices are the ones the search sees
        build = self.db.meta.get("build_id")
        result = retriever.search(asked, k, exclusion_by_ids(self.db, exclude_docs))
        found = [np.flatnonzero(row >= 0) for row in result.ids]  # -1: nothing more in this part

        def fetch(q: int, ranks: list[int]) -> list[Hit]:
            at = found[q][ranks]
            return self.db.hits(result.scores[q][at], result.ids[q][at])

        return ShardAnswer([result.scores[q][f].tolist() for q, f in enumerate(found)], fetch, None, build)

    def term_stats(self, queries: Sequence[str]) -> TermStats:
        self.db.refresh()
        return self.db.lexical.term_stats(list(queries))

    def document(self, doc_id: str) -> dict[str, Any] | None:
        self.db.refresh()
        doc = self.db.document(doc_id)
        return None if doc is None else {"text": doc["text"], "source": doc["source"]}


class RemoteShard(Shard):
    """A part served by ``retrolm serve`` on another machine, asked over HTTP (httpx)."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        import httpx

        super().__init__(url.rstrip("/"))
        self._client = httpx.Client(base_url=self.name, timeout=timeout)
        self.max_queries = 256

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any] | None:
        import httpx

        try:
            r = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise PartUnavailable(f"shard {self.name}: {type(e).__name__}: {e}") from None
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code == 404 and path == "/api/document" and isinstance(body, dict) and \
                str(body.get("error", "")).startswith("no document"):
            return None
        if r.status_code != 200 or not isinstance(body, dict):
            why = body.get("error") if isinstance(body, dict) else None
            error = PartRefused if 400 <= r.status_code < 500 else PartUnavailable
            raise error(f"shard {self.name}: {path} answered {r.status_code}: {why or r.text[:200]!r}")
        return body

    def _fields(self, body: dict[str, Any], path: str, **expected: type | tuple[type, ...]) -> list[Any]:
        """``body[key]`` for each key, of the type ``expected`` names; one line naming what is missing or of another
        type (a part running another retrolm release)."""
        missing = [k for k in expected if k not in body]
        if missing:  # a part answering what the front cannot use is its upstream failing (502), not the client
            raise PartUnavailable(f"shard {self.name}: {path} answered without {', '.join(missing)} (is it a retrolm "
                                  f"serve of this release?)")
        odd = [k for k, kind in expected.items() if not isinstance(body[k], kind)]
        if odd:
            raise PartUnavailable(f"shard {self.name}: {path} answered {', '.join(odd)} of another type (is it a "
                                  "retrolm serve of this release?)")
        return [body[k] for k in expected]

    def info(self) -> dict[str, Any]:
        db, max_k, max_queries = self._fields(self._call("GET", "/api/info"), "/api/info", db=dict, max_k=int,
                                              max_queries=int)
        if "num_shards" in db:
            raise RetrolmError(f"shard {self.name} is the front of a sharded database itself: list its parts instead")
        self.max_k, self.max_queries = max_k, max_queries  # whole numbers: _fields checked them
        return db

    def search(self, queries: Sequence[str], k: int, kind: str, exclude_docs: Sequence[Sequence[str]] | None = None,
               vectors: np.ndarray | None = None, stats: TermStats | None = None) -> ShardAnswer:
        # the part embeds the texts itself (on its machine, at the same time as the other parts)
        return self._limited(lambda: self._search(queries, k, kind, exclude_docs, stats))

    def _limited(self, request: Callable[[], Any]) -> Any:
        """``request()``; refused, once more after reading the part's limits again (it may have been restarted with
        others since the front read them)."""
        try:
            return request()
        except PartRefused:
            self.info()
            return request()

    def _search(self, queries: Sequence[str], k: int, kind: str, exclude_docs: Sequence[Sequence[str]] | None,
                stats: TermStats | None) -> ShardAnswer:
        if self.max_k is not None and k > self.max_k:
            raise RetrolmError(f"shard {self.name}: k={k} is more than its service allows (max_k={self.max_k}; start "
                               f"it with max_k={k} or more)")
        hits: list[list[Hit]] = []
        flops: list[dict] = []
        builds = set()
        for start in range(0, len(queries), self.max_queries):  # the service's limit per request
            batch = list(queries[start : start + self.max_queries])
            body = {"queries": batch, "k": k, "retriever": kind, "term_stats": stats and stats.to_dict(),
                    "exclude_doc_ids": None if exclude_docs is None else
                    [list(d) for d in exclude_docs[start : start + self.max_queries]]}
            results, reported, build = self._fields(self._call("POST", "/api/search", json=body), "/api/search",
                                                    results=list, flops=list, build_id=(str, type(None)))
            if len(results) != len(batch) or len(reported) != len(batch):
                raise PartUnavailable(f"shard {self.name}: {len(results)} results for {len(batch)} queries")
            try:
                hits += [[Hit(**h) for h in row] for row in results]
            except TypeError as e:
                raise PartUnavailable(f"shard {self.name}: /api/search answered hits of another shape ({e})") from None
            flops += reported
            builds.add(build)
        # two builds in one search: report none of them, so that the front looks again
        build = builds.pop() if len(builds) == 1 else None
        return ShardAnswer([[h.score for h in row] for row in hits], lambda q, ranks: [hits[q][r] for r in ranks],
                           flops, build)

    def term_stats(self, queries: Sequence[str]) -> TermStats:
        return self._limited(lambda: self._term_stats(queries))

    def _term_stats(self, queries: Sequence[str]) -> TermStats:
        stats = TermStats(0, 0, {})
        for start in range(0, len(queries), self.max_queries):  # the counts are the index's: one batch's as good
            out = self._call("POST", "/api/terms", json={"queries": list(queries[start : start + self.max_queries])})
            n, total, df = self._fields(out, "/api/terms", n_chunks=int, total_length=int, df=dict)
            if not all(isinstance(c, int) for c in df.values()):
                raise PartUnavailable(f"shard {self.name}: /api/terms answered counts that are not whole numbers")
            stats = TermStats(n, total, {**stats.df, **df})
        return stats

    def document(self, doc_id: str) -> dict[str, Any] | None:
        out = self._call("GET", "/api/document", params={"id": doc_id})
        if out is None:
            return None
        text, source = self._fields(out, "/api/document", text=str, source=str)
        return {"text": text, "source": source}

    def close(self) -> None:
        self._client.close()


@dataclass
class ShardedResult:
    """The merged top-k of each query over every shard, best first (like :class:`SearchResult`)."""

    results: list[list[ShardHit]]
    flops: list[list[dict | None]]
    """Per query, per shard: the FLOPs a remote shard reported for it (None for local shards)."""
    kind: str = "dense"
    """The retriever: dense | bm25 | hybrid."""

    def hits(self, i: int) -> list[ShardHit]:
        return self.results[i]

    def texts(self, i: int) -> list[str]:
        return [h.text for h in self.results[i]]

    def __len__(self) -> int:
        return len(self.results)


def _compared(value: object, key: str) -> object:
    """What of a part's description must agree: a BM25 scorer's text form does not (each part puts queries in its
    index's own; a part rebuilt by db add records NFC where its older siblings record none)."""
    if key == "bm25_scorer" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "text_form"}
    return value


class ShardedRetriever:
    """Top-k chunks over the parts of a sharded database (see the module's docstring). Open with :meth:`open`.

    Args:
        shards: the parts.
        kind: auto | dense | bm25 | hybrid.
        complete: require the N parts of one database, each once.
        hybrid_depth: hybrid fetches this many times k per ranking before fusion.
    """

    def __init__(self, shards: Sequence[Shard], kind: str = "auto", complete: bool = True,
                 hybrid_depth: int = 4, global_stats: bool = True) -> None:
        if not shards:
            raise RetrolmError("a sharded database needs at least one shard")
        self.shards, self.complete, self.hybrid_depth = list(shards), complete, hybrid_depth
        self.global_stats = global_stats
        self.path = "shards"
        """The shards file (when opened from one)."""
        self._pool = ThreadPoolExecutor(max_workers=len(self.shards), thread_name_prefix="shard")
        self._index = {s.name: i for i, s in enumerate(self.shards)}
        try:
            self.infos = self._each(lambda s: s.info())
            self.kind = self.name = self._resolve(kind)
            self._check(self.kind)
        except BaseException:
            self._pool.shutdown(wait=False)
            raise

    @classmethod
    def open(cls, path: str | Path, overrides: Sequence[str] = (), device: str | None = None,
             retriever: str | None = None) -> ShardedRetriever:
        """The retriever a shards file describes (``overrides``: ``key=value`` changes to it; ``retriever``, unless
        None or auto, wins over the file's). Folders are relative to the file."""
        path = Path(path)
        if not path.is_file():
            raise RetrolmError(f"{path}: no such shards file")
        try:
            cfg = load_config(ShardsConfig, path, overrides)
        except RetrolmError as e:
            raise RetrolmError(e if str(e).startswith(str(path)) else f"{path}: {e}") from None
        shards: list[Shard] = []
        try:
            for entry in cfg.shards:
                if entry.startswith(("http://", "https://")):
                    shards.append(RemoteShard(entry, cfg.timeout))
                    continue
                folder = Path(entry).expanduser()
                folder = folder if folder.is_absolute() else path.parent / folder
                if is_shards_file(folder) and folder.is_file():
                    raise RetrolmError(f"{path}: {entry} is a shards file itself; list its parts instead")
                shards.append(LocalShard(folder, device))
            kind = cfg.retriever if retriever in (None, "auto") else retriever
            made = cls(shards, kind, cfg.complete, cfg.hybrid_depth, cfg.global_stats)
            made.path = str(path)
            return made
        except BaseException:
            for s in shards:
                s.close()
            raise

    def kinds(self) -> list[str]:
        """The retrievers every shard serves: BM25 always (built in memory where not stored), dense and hybrid when
        every shard has dense keys."""
        return ["dense", "bm25", "hybrid"] if all(i.get("encoder") for i in self.infos) else ["bm25"]

    def _resolve(self, kind: str) -> str:
        if kind == "auto":
            return self.kinds()[0]
        if kind not in ("dense", "bm25", "hybrid"):
            raise RetrolmError(f"retriever must be one of auto, dense, bm25, hybrid; got {kind!r}")
        if kind not in self.kinds():
            lacking = [s.name for s, i in zip(self.shards, self.infos, strict=True) if not i.get("encoder")]
            raise RetrolmError(f"{kind} search needs dense keys in every shard; {', '.join(lacking)} "
                               f"{'has' if len(lacking) == 1 else 'have'} none")
        return kind

    def _each(self, fn: Any) -> list:
        """``fn(shard)`` for every shard at once, in shard order; the first error is raised."""
        return list(self._pool.map(fn, self.shards))

    def _check(self, kind: str, infos: list[dict] | None = None) -> None:
        """Refuse parts that cannot be searched together (as ``infos`` describe them, by default the last checked),
        naming the first that differs."""
        infos = self.infos if infos is None else infos
        first, name0 = infos[0], self.shards[0].name
        keys = ["chunk_len", "tokenizer_sha256"] + (["encoder", "encoder_fingerprint"] if kind != "bm25" else [])
        for shard, info in zip(self.shards[1:], infos[1:], strict=True):
            scored = kind != "dense" and None not in (info.get("bm25_scorer"), first.get("bm25_scorer"))
            # (a BM25 index stored before its scorer was recorded cannot be compared)
            own = [*keys, "bm25_scorer"] if scored else keys
            if info.get("encoder_fingerprint") and first.get("encoder_fingerprint"):
                own = [k for k in own if k != "encoder"]  # the same weights in another folder are the same encoder
            for key in own:
                if _compared(info.get(key), key) != _compared(first.get(key), key):
                    raise RetrolmError(f"shard {shard.name}: {key} {info.get(key)!r} differs from {name0}'s "
                                       f"{first.get(key)!r}; shards must share chunk length, tokenizer, encoder and "
                                       f"BM25 scorer")
        seen: dict[str, str] = {}
        for shard, info in zip(self.shards, infos, strict=True):
            build = info.get("build_id")
            if build is not None and build in seen:
                raise RetrolmError(f"shard {shard.name} is the same database as {seen[build]} (build {build[:8]}): "
                                   f"list each part once")
            seen.setdefault(build, shard.name)
        if not self.complete:
            return
        labels = [i.get("shard") for i in infos]
        unlabelled = [s.name for s, lab in zip(self.shards, labels, strict=True) if not lab]
        if unlabelled:
            raise RetrolmError(f"shard {unlabelled[0]} was not built as a shard (db build --shard I/N); set "
                               f"complete=false to search separate databases together")
        counts = {int(lab.split("/")[1]) for lab in labels}
        if len(counts) > 1:
            raise RetrolmError(f"shards of different splits: {', '.join(sorted(set(labels)))}")
        n = counts.pop()
        have = sorted(int(lab.split("/")[0]) for lab in labels)
        if have != list(range(n)):
            missing = sorted(set(range(n)) - set(have))
            twice = sorted({i for i in have if have.count(i) > 1})
            raise RetrolmError(f"the shards are not the {n} parts of one database: "
                               + "; ".join(x for x in (f"missing {', '.join(f'{i}/{n}' for i in missing)}" if missing
                                                       else "", f"twice {', '.join(f'{i}/{n}' for i in twice)}"
                                                       if twice else "") if x))

    # --------------------------------------------------------------------------------------------------- search
    @property
    def num_chunks(self) -> int:
        return sum(int(i["num_chunks"]) for i in self.infos)

    def refresh_infos(self) -> None:
        """Ask every shard for its counts again (after edits), and check the parts again (one may have been
        rebuilt)."""
        infos = self._each(lambda s: s.info())
        self._check(self.kind, infos)  # kept only once checked: a search compares its answers' build ids with them
        self.infos = infos

    def search(self, queries: str | Sequence[str], k: int, exclude_docs: Sequence[Sequence[str]] | None = None,
               kind: str | None = None) -> ShardedResult:
        """The ``k`` best chunks per query over every shard (a blank query retrieves nothing); ``exclude_docs``: per
        query, document ids it must not retrieve; ``kind``: another retriever than the one opened (checked like it;
        None or auto: the one opened)."""
        kind = self.kind if kind in (None, "auto") else self._resolve(kind)
        if kind != self.kind:
            self._check(kind)  # e.g. dense asked of shards opened for BM25: their encoders must agree
        if k < 1:
            raise RetrolmError(f"k must be >= 1, got {k}")
        queries = [queries] if isinstance(queries, str) else list(queries)
        if exclude_docs is not None and len(exclude_docs) != len(queries):
            raise RetrolmError(f"exclusion lists {len(exclude_docs)} document sets for {len(queries)} queries")
        asked = [i for i, q in enumerate(queries) if q.strip()]
        results: list[list[ShardHit]] = [[] for _ in queries]
        flops: list[list[dict | None]] = [[None] * len(self.shards) for _ in queries]
        if asked:
            sub = [queries[i] for i in asked]
            excl = None if exclude_docs is None else [exclude_docs[i] for i in asked]
            for i, r, f in zip(asked, *self._search_asked(sub, k, kind, excl), strict=True):
                results[i], flops[i] = r, f
        return ShardedResult(results, flops, kind)

    def _search_asked(self, queries: list[str], k: int, kind: str, exclude_docs: Sequence[Sequence[str]] | None
                      ) -> tuple[list[list[ShardHit]], list[list[dict | None]]]:
        if kind != "hybrid":
            return self._merged(queries, k, kind, exclude_docs)
        # as deep as every part's service allows, never under k
        depth = max(k, min([self.hybrid_depth * k] + [s.max_k for s in self.shards if s.max_k is not None]))
        dense, f_dense = self._merged(queries, depth, "dense", exclude_docs)
        bm25, f_bm25 = self._merged(queries, depth, "bm25", exclude_docs)
        fused = [_fuse(d, b, k, self._order) for d, b in zip(dense, bm25, strict=True)]
        return fused, [[_add_flops(a, b) for a, b in zip(x, y, strict=True)] for x, y in zip(f_dense, f_bm25,
                                                                                          strict=True)]

    def _merged(self, queries: list[str], k: int, kind: str, exclude_docs: Sequence[Sequence[str]] | None,
                again: bool = True) -> tuple[list[list[ShardHit]], list[list[dict | None]]]:
        stats = self.term_stats(queries) if kind == "bm25" and self.global_stats and len(self.shards) > 1 else None

        def ask(s: Shard, vectors: np.ndarray | None = None) -> ShardAnswer:
            return s.search(queries, k, kind, exclude_docs, vectors, stats)

        # remote parts first (they embed on their machines meanwhile), then the parts here
        remote = {i: self._pool.submit(ask, s) for i, s in enumerate(self.shards) if not isinstance(s, LocalShard)}
        local = [i for i, s in enumerate(self.shards) if isinstance(s, LocalShard)]
        # parts on this machine share one encoder (checked): the queries are embedded once, not once a part
        vectors = None
        if kind == "dense" and len(local) > 1:
            rebuilt = []
            for i in local:
                db = self.shards[i].db  # type: ignore[attr-defined]
                db.refresh()
                if db.meta.get("build_id") != self.infos[i].get("build_id"):
                    rebuilt.append(i)
            if rebuilt and again:  # checked before one part's encoder embeds for all (another width: wrong blame)
                return self._recheck(rebuilt, queries, k, kind, exclude_docs)
            vectors = self.shards[local[0]].retriever("dense").prepare(queries)
        running = {**remote, **{i: self._pool.submit(ask, self.shards[i], vectors) for i in local}}
        answers: list[ShardAnswer] = [running[i].result() for i in range(len(self.shards))]
        changed = [i for i, a in enumerate(answers) if a.build_id != self.infos[i].get("build_id")]
        if changed and again:  # a part was rebuilt: check the parts again, then search once more
            return self._recheck(changed, queries, k, kind, exclude_docs)
        merged, flops = [], []
        for q in range(len(queries)):
            # best first; a tie keeps shard order, then the shard's own order
            pool = [(score, p, r) for p, a in enumerate(answers) for r, score in enumerate(a.scores[q])]
            best = sorted(pool, key=lambda t: (-t[0], t[1], t[2]))[:k]
            kept: dict[tuple[int, int], ShardHit] = {}
            for p, a in enumerate(answers):  # one fetch per part, for the ranks the merge kept
                ranks = [r for _, pp, r in best if pp == p]
                for r, h in zip(ranks, a.fetch(q, ranks) if ranks else [], strict=True):
                    kept[p, r] = ShardHit(**h.to_dict(), shard=self.shards[p].name)
            merged.append([kept[p, r] for _, p, r in best])
            flops.append([a.flops[q] if a.flops is not None else None for a in answers])
        return merged, flops

    def _recheck(self, rebuilt: list[int], queries: list[str], k: int, kind: str,
                 exclude_docs: Sequence[Sequence[str]] | None) -> tuple[list[list[ShardHit]], list[list[dict | None]]]:
        """Parts ``rebuilt`` since they were checked: check every part again, then search once more."""
        logger.info("%s rebuilt since the parts were checked: checking again",
                    ", ".join(self.shards[i].name for i in rebuilt))
        self.refresh_infos()
        if kind != self.kind:
            self._check(kind)
        return self._merged(queries, k, kind, exclude_docs, again=False)

    def term_stats(self, queries: Sequence[str]) -> TermStats:
        """BM25's statistics over all parts for the queries' terms (Elasticsearch's ``dfs_query_then_fetch``): chunks,
        their total length, and per term the chunks that hold it, each summed over the parts."""
        return TermStats.merged(self._each(lambda s: s.term_stats(queries)))

    def _order(self, h: ShardHit) -> tuple[int, int]:
        """Where a hit sorts among hits of the same score: its part's place in the shards file, then its chunk id (as
        one database sorts ties)."""
        return self._index[h.shard], h.chunk_id

    def document(self, doc_id: str) -> tuple[str, dict[str, Any]] | None:
        """(shard name, document: ``text``, ``source``) of a live document, or None when no shard holds it."""
        for shard, doc in zip(self.shards, self._each(lambda s: s.document(doc_id)), strict=True):
            if doc is not None:
                return shard.name, doc
        return None

    def describe(self) -> dict[str, Any]:
        """The parts and their counts (what ``retrolm db info`` prints for a shards file)."""
        return {"path": self.path, "retriever": self.kind, "num_shards": len(self.shards),
                "num_docs": sum(int(i["num_docs"]) for i in self.infos), "num_chunks": self.num_chunks,
                "chunk_len": self.infos[0]["chunk_len"], "tokenizer": self.infos[0]["tokenizer"],
                "encoder": _one_or_mixed([i.get("encoder") for i in self.infos]),
                "shards": [{"shard": s.name, "label": i.get("shard"), "num_docs": i["num_docs"],
                            "num_chunks": i["num_chunks"], "index_factory": i.get("index_factory"),
                            "bm25": i.get("bm25")} for s, i in zip(self.shards, self.infos, strict=True)]}

    @property
    def max_k(self) -> int | None:
        """The most results one search may ask for: the smallest limit of the remote parts' services (None: none)."""
        limits = [s.max_k for s in self.shards if s.max_k is not None]
        return min(limits) if limits else None

    def close(self) -> None:
        for s in self.shards:
            s.close()
        self._pool.shutdown(wait=False)


def _fuse(dense: list[ShardHit], bm25: list[ShardHit], k: int, order: Callable[[ShardHit], tuple]
          ) -> list[ShardHit]:
    """Reciprocal-rank fusion of two merged rankings; the score becomes the fused one. A chunk is keyed by its part,
    document and position (not by chunk id: a part compacted between the two rankings renumbers its chunks); ties
    sort by ``order``."""
    fused: dict[tuple[str, str, int], float] = {}
    first: dict[tuple[str, str, int], ShardHit] = {}
    for ranking in (dense, bm25):
        for rank, h in enumerate(ranking):
            key = (h.shard, h.doc_id, h.position)
            fused[key] = fused.get(key, 0.0) + 1.0 / (RRF_K + rank + 1)
            first.setdefault(key, h)
    best = sorted(fused.items(), key=lambda kv: (-kv[1], order(first[kv[0]])))[:k]
    out = []
    for key, score in best:
        h = first[key]
        out.append(ShardHit(**{**h.to_dict(), "score": float(np.float32(score))}))  # as one database's fusion
    return out


def _one_or_mixed(values: list) -> Any:
    """The value all parts share, or ``mixed: a, b`` (e.g. BM25 parts of which one also has dense keys)."""
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else "mixed: " + ", ".join(str(v) for v in distinct)


def _add_flops(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return a or b
    return {key: a.get(key, 0) + b.get(key, 0) for key in set(a) | set(b)}
