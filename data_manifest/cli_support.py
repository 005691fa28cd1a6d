"""What every stage's command line shares: consoles, error handling, progress bars, tables.

User errors (:class:`~data_manifest.errors.UserError`) are printed as one red line on stderr
and exit with status 1; ``--debug`` (or ``CONFORMALSAM_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from data_manifest.errors import UserError

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
_state = {"debug": os.environ.get("CONFORMALSAM_DEBUG", "") not in ("", "0")}


def set_debug(on: bool) -> None:
    """Show tracebacks for user errors (the ``--debug`` flag)."""
    _state["debug"] = _state["debug"] or on


def handle_errors(fn: F) -> F:
    """Decorate a Typer command: UserError becomes one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if _state["debug"]:
                raise
            # escape: messages name config sections like "[calibrate]", which are not markup
            err_console.print(
                f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def make_app(name: str, help: str) -> typer.Typer:
    """A Typer app with the shared ``--debug`` option."""
    app = typer.Typer(
        name=name,
        help=help,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
    )

    @app.callback()
    def _main(
        debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    ) -> None:
        set_debug(debug)

    return app


def progress(transient: bool = False, disable: bool = False) -> Progress:
    """A progress bar with count, rate-based ETA and elapsed time; use as a context manager.

    Add ``rate`` to a task's fields (``progress.update(task, rate="12.3 img/s")``) to show it.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
        disable=disable,
    )


def rate_text(done: float, seconds: float, unit: str) -> str:
    """``"12.3 img/s"`` style rate for the progress bar's ``rate`` field."""
    return f"{done / seconds:.1f} {unit}/s" if seconds > 0 else f"- {unit}/s"


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A rich table; numbers are right-aligned, floats shown with 4 significant digits."""
    t = Table(title=title, title_justify="left")
    numeric = [
        all(isinstance(r[i], int | float) for r in rows) if rows else False
        for i in range(len(columns))
    ]
    for c, num in zip(columns, numeric, strict=True):
        t.add_column(c, justify="right" if num else "left")
    for r in rows:
        t.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r))
    return t
