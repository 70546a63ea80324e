"""The ``retrolm`` command line (thin: parse → call the API). Importing this package registers every command."""

from retrolm.cli import corpus, db, evaluate, generate, rag, realm, retrofit, serve, train  # noqa: F401 - registers
from retrolm.cli.app import app, main

__all__ = ["app", "main"]
