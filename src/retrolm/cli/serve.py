"""``retrolm serve``: the HTTP service (JSON API and a web page of sources)."""

from __future__ import annotations

import socket
from typing import Annotated

import typer

from retrolm.cli.app import EXTRA, ConfigFile, app, command_config
from retrolm.core.errors import RetrolmError
from retrolm.serve import ServeConfig, Service


@app.command("serve", context_settings=EXTRA)
def serve_cmd(
    ctx: typer.Context,
    db: Annotated[str | None, typer.Option("--db", help="Database folder, or a shards file (the front of a "
                                           "sharded database).")] = None,
    reader: Annotated[str | None, typer.Option(help="Causal LM that answers questions (HF folder, smollm2-135m, "
                                               "hub name); omit to only search.")] = None,
    generator: Annotated[str | None, typer.Option(help="RETRO checkpoint or causal LM that continues text "
                                                  "(default: the reader).")] = None,
    host: Annotated[str | None, typer.Option(help="Interface (default 127.0.0.1; 0.0.0.0 = all, no "
                                             "authentication).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    config: ConfigFile = None,
) -> None:
    """Serve a database over HTTP: search, answers and generation, each with its sources, as a JSON API and a web page.

    Extra ``key=value`` arguments override ServeConfig fields, e.g. ``retriever=bm25 rag.top_n=10
    generate.max_new_tokens=64``. Edits to the database by ``retrolm db add / delete`` show at the next request."""
    cfg = command_config(ServeConfig, ctx, config, db=db, reader=reader, generator=generator, host=host, port=port,
                         device=device)
    _check_port(cfg.host, cfg.port)  # before minutes of model loading
    try:
        import uvicorn

        from retrolm.serve.app import create_app
    except ImportError as e:
        raise RetrolmError(f"serve needs FastAPI and uvicorn ({e.name} is missing): pip install fastapi uvicorn") \
            from None
    service = Service(cfg)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host  # an IPv6 address in a URL
    typer.echo(f"retrolm serve: {cfg.db} on http://{host}:{cfg.port}/ (API: /api/search, /api/answer, "
               f"/api/generate, /api/document, /api/info; docs: /docs). Ctrl-C stops it.", err=True)
    uvicorn.run(create_app(service), host=cfg.host, port=cfg.port, log_level="warning")


def _check_port(host: str, port: int) -> None:
    """One line instead of uvicorn's log when the address is taken or not this machine's.

    uvicorn listens through asyncio's ``create_server``, which binds every address the host resolves to (``localhost``:
    ``::1`` and ``127.0.0.1``), IPv6 ones v6-only; each is tried the same way here."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise RetrolmError(f"serve: cannot resolve host {host!r} ({e.strerror})") from None
    for family, _, _, _, addr in dict.fromkeys(infos):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as e:
                shown = f"[{addr[0]}]" if family == socket.AF_INET6 else addr[0]
                raise RetrolmError(f"serve: cannot listen on {shown}:{port} ({e.strerror})") from None
