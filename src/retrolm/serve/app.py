"""The HTTP service (FastAPI): a JSON API over :class:`retrolm.serve.service.Service` and a web page that asks it
and shows the sources of every answer.

=====================  ======================================================================================
``GET /``              the page: search, answer or continue a text; every result lists its sources
``GET /api/info``      the database, its retrievers and the loaded models
``GET /api/search``    ``?q=...&k=5&retriever=bm25``: the best chunks, their continuations and documents
``POST /api/search``   ``{"queries": [...], "k"?, "retriever"?, "exclude_doc_ids"?, "term_stats"?}``: the same for a
                       batch, with each query's FLOPs and the database's build id (a front of shards: no FLOPs); the
                       front of a sharded database asks its parts this way
``POST /api/terms``    ``{"queries": [...]}``: BM25 statistics for the queries' terms (chunks, their total length,
                       how many hold each term); a sharded front sums its parts' and sends the sums with
                       ``POST /api/search`` as ``term_stats``, so that every part scores as one database
``POST /api/answer``   ``{"question": ..., "top_n"?, "passages"?, "max_new_tokens"?, "query"?}``: retrieve → (rerank →)
                       read
``POST /api/generate`` ``{"prompt": ..., "max_new_tokens"?, "temperature"?, "top_p"?, "seed"?, "k"?,
                       "retrieval"?}``: the continuation, span by span, with the chunks each span read
``GET /api/document``  ``?id=...``: a document's text as the database holds it
=====================  ======================================================================================

A request the service cannot serve is answered ``{"error": "one line"}`` with status 400 (404 for a document that
is not there, 422 for a malformed request, 502 when a part of a sharded database it fronts is down or failing).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrolm.core.errors import RetrolmError
from retrolm.db.lexical import TermStats
from retrolm.retrieval.sharded import PartUnavailable
from retrolm.serve.page import PAGE
from retrolm.serve.service import NotFoundError, Service

logger = logging.getLogger(__name__)


class AnswerRequest(BaseModel):
    question: str
    query: str | None = Field(None, description="What retrieval searches with instead of the question.")
    top_n: int | None = Field(None, description="Candidates retrieved (and reranked).")
    passages: int | None = Field(None, description="Passages placed in the reader's prompt.")
    max_new_tokens: int | None = None


class TermStatsBody(BaseModel):
    n_chunks: int
    total_length: int
    df: dict[str, int]


class SearchRequest(BaseModel):
    queries: list[str]
    k: int | None = Field(None, description="Results per query (default 5, or the service's max_k if lower).")
    retriever: str | None = Field(None, description="dense | bm25 | hybrid (default: the service's).")
    exclude_doc_ids: list[list[str]] | None = Field(None, description="Per query, document ids it must not return.")
    term_stats: TermStatsBody | None = Field(None, description="BM25: the statistics of all parts of a sharded "
                                             "database (their /api/terms, summed), to score with.")


class TermsRequest(BaseModel):
    queries: list[str]


class GenerateRequest(BaseModel):
    prompt: str
    max_new_tokens: int | None = None
    temperature: float | None = Field(None, description="0 = greedy.")
    top_p: float | None = None
    seed: int | None = None
    k: int | None = Field(None, description="Neighbours (RETRO) or passages (in-context) per retrieval.")
    retrieval: bool = True


BODY_UNPARSED = "There was an error parsing the body"
"""FastAPI's 400 for a JSON body its parser fails on other than by a syntax error (answered as every malformed body
is: 422, "not valid JSON")."""


def create_app(service: Service) -> FastAPI:
    """The FastAPI application serving ``service`` (run it with uvicorn; tests use FastAPI's TestClient)."""
    app = FastAPI(title="retrolm", description="Search, answers and generation with their sources.",
                  version=_version())

    @app.exception_handler(RetrolmError)
    async def bad_request(_: Request, e: RetrolmError) -> JSONResponse:
        # a part of a sharded database that is down or failing is the front's upstream: 502, not the client's fault
        status = 404 if isinstance(e, NotFoundError) else 502 if isinstance(e, PartUnavailable) else 400
        return JSONResponse({"error": str(e)}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:  # unknown route, wrong method
        if e.status_code == 400 and str(e.detail) == BODY_UNPARSED:  # bytes that are not UTF-8, nesting too deep
            return JSONResponse({"error": "request body: not valid JSON (cannot be parsed)"}, status_code=422)
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:  # a bug: still one line of JSON for the page
        logger.exception("request failed")
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":  # its loc is ("body", character offset)
            why = (first.get("ctx") or {}).get("error")
            return JSONResponse({"error": "request body: not valid JSON" + (f" ({why})" if why else "")},
                                status_code=422)
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"  # loc[0]: body, query, ...
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return service.info()

    # sync endpoints run on FastAPI's thread pool; the service serialises them
    @app.get("/api/search")
    def search(q: str = Query(..., description="Query text."),
               k: int | None = Query(None, description="Results (default 5, or the service's max_k if lower)."),
               retriever: str | None = Query(None, description="dense | bm25 | hybrid (default: the service's).")
               ) -> dict[str, Any]:
        return service.search(q, k, retriever)

    @app.post("/api/search")
    def search_batch(req: SearchRequest) -> dict[str, Any]:
        stats = None if req.term_stats is None else TermStats(**req.term_stats.model_dump())
        return service.search_batch(req.queries, req.k, req.retriever, req.exclude_doc_ids, stats)

    @app.post("/api/terms")
    def terms(req: TermsRequest) -> dict[str, Any]:
        return service.terms(req.queries)

    @app.post("/api/answer")
    def answer(req: AnswerRequest) -> dict[str, Any]:
        return service.answer(req.question, req.top_n, req.passages, req.max_new_tokens, req.query)

    @app.post("/api/generate")
    def generate(req: GenerateRequest) -> dict[str, Any]:
        return service.generate(req.prompt, req.max_new_tokens, req.temperature, req.top_p, req.seed, req.k,
                                req.retrieval)

    @app.get("/api/document")
    def document(id: str = Query(..., description="Document id.")) -> dict[str, Any]:
        return service.document(id)

    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retrolm")
    except PackageNotFoundError:
        return "unknown"


__all__ = ["AnswerRequest", "GenerateRequest", "SearchRequest", "TermsRequest", "create_app"]
