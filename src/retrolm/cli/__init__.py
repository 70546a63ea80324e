"""The ``retrolm`` command line (thin: parse → call the API). Importing this package registers every command."""

from retrolm.cli import (  # noqa: F401 - registers the commands
    corpus,
    db,
    evaluate,
    generate,
    knowledge,
    rag,
    realm,
    retrofit,
    serve,
    train,
)
from retrolm.cli.app import app, main

__all__ = ["app", "main"]
