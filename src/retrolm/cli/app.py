"""The ``retrolm`` command line: one typer app, one verb per pipeline stage (commands live in sibling modules).

Every command is configured the same way: a typed dataclass (its defaults), then ``--config FILE.yaml``, then dotted
``key=value`` arguments, then the few options users type most. Errors that are the user's to fix (a missing folder,
a corrupt index, a full disk, a mismatched encoder) are printed as one line, ``error: <file>: <problem>``, with exit
status 2 and no traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer

from retrolm.core.config import load_config
from retrolm.core.errors import RetrolmError
from retrolm.core.io import json_safe

app = typer.Typer(
    help="retrolm: semi-parametric language models (retrieval databases, RETRO, retrieval-augmented readers).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Build, update and search retrieval databases.", no_args_is_help=True)
app.add_typer(db_app, name="db")
corpus_app = typer.Typer(help="Prepare corpora.", no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")
scale_app = typer.Typer(help="Scaling curves: bits-per-byte vs database size or neighbours.", no_args_is_help=True)
app.add_typer(scale_app, name="scale")

EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
"""Context settings of commands that take dotted ``key=value`` overrides of their config."""
ConfigFile = Annotated[Path | None, typer.Option("--config", help="YAML config; key=value arguments and options "
                                                 "override it.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]

T = TypeVar("T")


def command_config(cls: type[T], ctx: typer.Context, config: Path | None, overrides: Sequence[str] = (),
                   **options: Any) -> T:
    """The command's typed config: defaults ← ``--config`` YAML ← ``key=value`` arguments (``ctx.args``, then
    ``overrides``) ← options given."""
    given = {k: v for k, v in options.items() if v not in (None, [])}
    return load_config(cls, config, [*ctx.args, *overrides], **given)


def print_json(obj: object) -> None:
    """``--json`` output: strict JSON, as the files (a missing number is null)."""
    sys.stdout.write(json.dumps(json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title))  # cells hold answers and passages: brackets in them are text, not markup
    for h in header:
        table.add_column(escape(h), justify="right")
    for r in rows:
        table.add_row(*map(escape, r))
    Console(width=140).print(table)


def _setup_logging() -> None:
    level = os.environ.get("RETROLM_LOG", "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        raise RetrolmError(f"RETROLM_LOG={os.environ['RETROLM_LOG']!r}: not a log level (DEBUG, INFO, WARNING, ERROR)")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "huggingface_hub", "urllib3", "httpx", "faiss", "trafilatura", "htmldate", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def os_error_line(e: OSError) -> str:
    """An OSError as one line naming the file: ``path: No space left on device``."""
    where = e.filename if e.filename is not None else "retrolm"
    return f"{where}: {e.strerror or e}"


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, aborts) of click and of the copy of click that typer >= 0.29 bundles, whose exceptions are
    not click's (they went through as tracebacks)."""
    errors: tuple[type, ...] = (click.exceptions.ClickException,)
    aborts: tuple[type, ...] = (click.exceptions.Abort,)
    try:
        from typer._click.exceptions import ClickException as TyperClickException

        errors += (TyperClickException,)
    except ImportError:  # typer that uses click itself
        pass
    abort = getattr(typer, "Abort", None)
    if isinstance(abort, type) and not issubclass(abort, aborts):
        aborts += (abort,)
    return errors, aborts


USAGE_ERRORS, ABORTS = _click_errors()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, turning user-facing errors into one line and exit status 2."""
    try:
        _setup_logging()
        rc = app(args=argv, prog_name="retrolm", standalone_mode=False)
    except RetrolmError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except OSError as e:  # a full disk, a read-only folder, a file that vanished: nothing written is lost
        sys.stderr.write(f"error: {os_error_line(e)}\n")
        sys.exit(2)
    except USAGE_ERRORS as e:
        e.show()
        sys.exit(e.exit_code)
    except (*ABORTS, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    if rc == 130:  # Ctrl-C: click reports it as exit status 130 without a word
        sys.stderr.write("interrupted\n")
    sys.exit(rc if isinstance(rc, int) else 0)
