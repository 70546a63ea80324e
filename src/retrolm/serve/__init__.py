"""``retrolm serve``: a database, a reader and a generator behind an HTTP API with a web page of sources.

:class:`Service` holds what is served (no HTTP); :func:`retrolm.serve.app.create_app` puts it behind FastAPI (imported
on its own, so that the rest of retrolm does not load the web stack)."""

from retrolm.serve.service import ServeConfig, Service

__all__ = ["ServeConfig", "Service"]
