"""What every stage's command line shares: consoles, errors, common flags, progress, tables.

One place turns whatever goes wrong into one line on stderr and an exit status:

- :class:`~data_manifest.errors.UserError`: ``error: <message>``, status 1;
- file-system errors (a read-only folder, a file where a folder should be, a full disk):
  ``error: <path>: <reason>; expected ...``, status 1;
- Ctrl-C: ``interrupted; re-run to continue``, status 130;
- anything else (a bug): ``error: unexpected <type>: ...``, status 1;
- command-line syntax (unknown option, ``--alpha abc``): ``error: ...``, status 2.

``--debug`` (anywhere on the command line, or ``CONFORMALSAM_DEBUG=1``) shows the traceback
instead. ``--quiet`` prints errors only. Off a terminal (a log file, a pipe) there are no
progress bars (one plain line per finished task instead) and no line is wrapped.

Checkpoints are read here too (:func:`load_torch_file`), so that every stage reports a missing,
corrupt or unsafe file the same way, and never suggests ``weights_only=False``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import os
import re
import sys
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from copy import copy
from pathlib import Path
from typing import Annotated, Any, TypeVar

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
from rich.text import Text
from typer.core import TyperGroup
from typer.models import ParameterInfo

from data_manifest.errors import UserError
from data_manifest.io import check_utf8_path

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
INTERRUPTED = "interrupted; re-run to continue"
_LOG_WIDTH = 10_000  # off a terminal: wide enough that rich never wraps a line
_state: dict[str, bool] = {}


def _env_debug() -> bool:
    return os.environ.get("CONFORMALSAM_DEBUG", "") not in ("", "0")


def reset_state() -> None:
    """Forget ``--debug``/``--quiet`` of an earlier invocation (one process, several runs)."""
    _state.update(debug=_env_debug(), quiet=False)
    console.quiet = False


def _interactive(c: Console) -> bool:
    """A terminal or a notebook: somewhere a live display can redraw itself."""
    return c.is_terminal or c.is_jupyter


reset_state()


def set_debug(on: bool) -> None:
    """Show tracebacks instead of one-line errors (the ``--debug`` flag)."""
    _state["debug"] = _state["debug"] or on


def set_quiet(on: bool) -> None:
    """Print errors only: no progress, no tables (the ``--quiet`` flag)."""
    _state["quiet"] = _state["quiet"] or on
    console.quiet = _state["quiet"]


def is_debug() -> bool:
    return _state["debug"]


def is_quiet() -> bool:
    return _state["quiet"]


def configure_output() -> None:
    """Fit the consoles to where their output goes.

    On a terminal (or in a notebook): rich's defaults. Elsewhere (a log file, a pipe, a test
    runner): no soft wrapping and a very wide page, so that every line stays whole.
    """
    for c in (console, err_console):
        if _interactive(c):
            c.soft_wrap, c._width = False, None  # noqa: SLF001 (rich has no public reset)
        else:
            c.soft_wrap, c.width = True, _LOG_WIDTH
    console.quiet = _state["quiet"]


# -- one-line messages -------------------------------------------------------------------------
def print_error(message: str) -> None:
    """``error: <message>`` on stderr, one line, nothing interpreted as markup."""
    line = " ".join(str(message).split())  # a message must never span lines
    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


_EXPECTED = {
    errno.EACCES: "expected a file or folder this user may write to (check its permissions)",
    errno.EPERM: "expected a file or folder this user may change (check its permissions)",
    errno.EROFS: "expected a folder on a writable file system",
    errno.ENOSPC: "expected free space on the disk",
    errno.EDQUOT: "expected free space in the disk quota",
    errno.EEXIST: "expected a folder or nothing there, not a file",
    errno.ENOTDIR: "expected a folder, not a file",
    errno.EISDIR: "expected a file, not a folder",
    errno.ENOENT: "expected an existing file or folder",
    errno.ENAMETOOLONG: "expected a shorter name",
}


def os_error_message(exc: OSError) -> str:
    """One line for a file-system error: the path, the reason, what was expected.

    A temporary file of an atomic write (``.<name>.<random>.tmp``) is reported as its folder.
    """
    name = exc.filename if exc.filename is not None else ""
    path = Path(os.fsdecode(name)) if name != "" else None
    if path is not None and path.name.startswith(".") and path.name.endswith(".tmp"):
        # renaming the temporary file over its target failed: name the target
        path = Path(os.fsdecode(exc.filename2)) if exc.filename2 else path.parent
    reason = (exc.strerror or str(exc) or type(exc).__name__).rstrip(".")
    reason = reason[:1].lower() + reason[1:]
    expected = _EXPECTED.get(exc.errno or 0, "")
    where = f"{path}: " if path is not None else ""
    return f"{where}{reason}" + (f"; {expected}" if expected else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _exit_for(exc: BaseException) -> int:
    """Print the one line for ``exc`` and return the exit status (re-raises in debug mode)."""
    if isinstance(exc, KeyboardInterrupt):
        err_console.print(INTERRUPTED, highlight=False, markup=False)
        return 130
    if _state["debug"]:
        raise exc
    if isinstance(exc, UserError):
        print_error(str(exc))
    elif isinstance(exc, BrokenPipeError):  # `... | head` stopped reading: nothing to say
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no flush error at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    elif isinstance(exc, OSError):
        print_error(os_error_message(exc))
    elif isinstance(exc, MemoryError):
        print_error(
            "out of memory; expected smaller batches or fewer workers (--debug shows where)"
        )
    else:
        print_error(
            f"unexpected {type(exc).__name__}: {_first_line(exc)} (a bug: re-run with --debug "
            "for the traceback and report it)"
        )
    return 1


# -- commands ----------------------------------------------------------------------------------
_DEBUG_HELP = "Show the full traceback of an error instead of one line."
_QUIET_HELP = "Print errors only: no progress, tables or summaries."


def _escaped(info: ParameterInfo) -> ParameterInfo:
    if not info.help:
        return info
    info = copy(info)
    info.help = escape(info.help)
    return info


def _escape_annotation(annotation: Any) -> Any:
    """``Annotated[T, typer.Option(help=...)]`` with the help protected from rich markup."""
    if typing.get_origin(annotation) is not Annotated:
        return annotation
    base, *meta = typing.get_args(annotation)
    meta = [_escaped(m) if isinstance(m, ParameterInfo) else m for m in meta]
    return Annotated[(base, *meta)]  # type: ignore[valid-type]


def _command_signature(fn: Callable[..., Any]) -> inspect.Signature:
    """``fn``'s signature with help texts escaped and the common ``--debug``/``--quiet`` added.

    Escaping here, where every command is registered, keeps bracketed text such as
    ``[data]`` or ``[default: ...]`` in ``--help`` (rich would read it as markup).
    """
    sig = inspect.signature(fn, eval_str=True)
    params = []
    for p in sig.parameters.values():
        default = _escaped(p.default) if isinstance(p.default, ParameterInfo) else p.default
        params.append(p.replace(annotation=_escape_annotation(p.annotation), default=default))
    common = {
        "debug": Annotated[bool, typer.Option("--debug", help=_DEBUG_HELP)],
        "quiet": Annotated[bool, typer.Option("--quiet", "-q", help=_QUIET_HELP)],
    }
    for name, annotation in common.items():
        if name not in sig.parameters:
            params.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=annotation
                )
            )
    return sig.replace(parameters=params)


def handle_errors(fn: F) -> F:
    """Decorate a Typer command: the shared error handling and the common flags.

    The command gets ``--debug`` and ``--quiet`` (read them with :func:`is_debug` and
    :func:`is_quiet`); every error becomes one line (see the module docstring).
    """
    sig = _command_signature(fn)
    own = set(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        set_debug(bool(kwargs.get("debug", False)))
        set_quiet(bool(kwargs.get("quiet", False)))
        kwargs = {k: v for k, v in kwargs.items() if k in own}
        configure_output()
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 (the one place)
            code = _exit_for(exc)
            raise typer.Exit(code) from None

    wrapper.__signature__ = sig  # type: ignore[attr-defined]
    wrapper.__doc__ = escape(fn.__doc__ or "")
    return wrapper  # type: ignore[return-value]


class OneLineGroup(TyperGroup):
    """The top-level command group: command-line syntax errors become one line too."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        reset_state()
        configure_output()
        try:
            rv = super().main(
                args=args,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except typer.Abort:
            rv = _exit_for(KeyboardInterrupt())
        except KeyboardInterrupt as exc:
            rv = _exit_for(exc)
        except Exception as exc:
            if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
                raise
            rv = _usage_error(exc)  # a click exception: bad option, missing argument, ...
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def _usage_error(exc: Any) -> int:
    """One line for a command-line syntax error; help requested by giving no arguments."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        console.print(exc.format_message(), markup=False, highlight=False, soft_wrap=True)
        return 0
    ctx = getattr(exc, "ctx", None)
    hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    print_error(f"{exc.format_message()}{hint}")
    return int(exc.exit_code)


def _callback(
    debug: Annotated[bool, typer.Option("--debug", help=_DEBUG_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=_QUIET_HELP)] = False,
) -> None:
    set_debug(debug)
    set_quiet(quiet)


def make_app(name: str, help: str) -> typer.Typer:
    """A Typer app with the shared error handling and ``--debug``/``--quiet`` options."""
    app = typer.Typer(
        name=name,
        help=escape(help),
        cls=OneLineGroup,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
    )
    app.callback()(_callback)
    return app


def sub_app(help: str) -> typer.Typer:
    """A group of commands inside an app (``data_manifest build ...``), with the same flags."""
    app = typer.Typer(help=escape(help), no_args_is_help=True, rich_markup_mode="rich")
    app.callback()(_callback)
    return app


# -- checks on paths ---------------------------------------------------------------------------
def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """Refuse, before any work, an output folder that cannot be written.

    ``path`` may not exist yet (it is created later); then its nearest existing parent must be
    a writable folder. ``option`` names where the path came from (``--out-dir``, ``[train]
    out``) for the message.

    Raises:
        UserError: ``path`` (or a parent) is a file, is not writable by this user, or its name
            is not UTF-8.
    """
    check_utf8_path(path, option)
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == path else f"is under the file {probe}"
        raise UserError(f"{option} = {path}: {what}; expected a folder (created if absent)")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" (its parent {probe})"
        raise UserError(
            f"{option} = {path}: not writable{where}; expected a folder this user may write to"
        )
    return path


def check_not_same_file(a: str | os.PathLike, b: str | os.PathLike, message: str) -> None:
    """Raise UserError(message) when ``a`` and ``b`` name the same file (links resolved)."""
    pa, pb = Path(a), Path(b)
    same = pa.resolve() == pb.resolve()
    if not same and pa.exists() and pb.exists():
        with contextlib.suppress(OSError):
            same = os.path.samefile(pa, pb)
    if same:
        raise UserError(message)


# -- checkpoints -------------------------------------------------------------------------------
# torch.save's legacy (non-zip) format starts with this number, pickled (protocol 2)
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _clip(text: str, n: int = 80) -> str:
    """``text`` shortened to at most about ``n`` characters at a word boundary."""
    if len(text) <= n:
        return text
    return text[:n].rsplit(" ", 1)[0].rstrip(" ,;:.(") + " ..."


def _torch_load_reason(exc: Exception, path: Path) -> str:
    """Why torch.load failed, in our words (never torch's advice to drop weights_only)."""
    text = str(exc)
    with open(path, "rb") as f:
        head = f.read(len(_TORCH_LEGACY_MAGIC))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found or "Unsupported global" in text:
        what = f" ({found.group(1)})" if found else ""
        return f"it holds Python objects{what} that a safe load (weights_only=True) refuses"
    if head.startswith(b"PK"):  # torch.save's zip archive
        return "not a PyTorch archive, or a truncated one"
    if not head.startswith(b"\x80"):  # neither a zip archive nor a pickle (legacy format)
        return "not a PyTorch file (corrupt, or another format)"
    if isinstance(exc, EOFError) or "Ran out of input" in text:
        return "the file ends too early (truncated)"
    if "CUDA" in text:
        return "it was saved on a CUDA device, and none is available here"
    if not head.startswith(_TORCH_LEGACY_MAGIC):
        return "it is a plain pickle (pickle.dump), not torch.save's format"
    return f"not a PyTorch file of tensors ({type(exc).__name__}: {_clip(_first_line(exc))})"


def load_torch_file(
    path: str | os.PathLike, map_location: Any = "cpu", what: str = "checkpoint"
) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure as one UserError line.

    Raises:
        UserError: missing, a folder, empty, corrupt, not a PyTorch file, or holding Python
            objects that a safe load refuses.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found; expected a file written by torch.save")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected a {what} file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: {what} file is empty; expected a file written by torch.save")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not read
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # pickle, zip and weights-only failures have unrelated types
        raise UserError(
            f"{path}: cannot read {what}: {_torch_load_reason(exc, path)}; expected a file "
            "written by torch.save (e.g. python -m train fit)"
        ) from None


def state_dict_mismatch(
    expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]]
) -> str:
    """A short summary of how two state dicts' keys and shapes differ ("" when they agree).

    Args:
        expected: parameter name -> shape of the model being built.
        found: parameter name -> shape in the checkpoint.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(expected[k]) != tuple(found[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]!r})")
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} of another shape (first {k!r}: {tuple(found[k])} in the file, "
            f"{tuple(expected[k])} in the model)"
        )
    return ", ".join(parts) + (f" of {len(expected)} tensors" if parts else "")


# -- progress and tables -----------------------------------------------------------------------
LOG_EVERY_S = 60.0  # off a terminal, a running task prints a line at most this often


class _Progress(Progress):
    """rich's Progress; off a terminal it draws nothing, prints a plain line for a running task
    every :data:`LOG_EVERY_S` seconds (long runs in a cluster's log show they are alive) and
    one line per task when the block ends."""

    def __init__(self, *columns: Any, plain: bool, **kwargs: Any):
        super().__init__(*columns, **kwargs)
        self._plain = plain
        self._logged: dict[Any, float] = {}

    def _line(self, task_id: Any) -> str:
        t = self._tasks[task_id]
        seconds = t.elapsed or 0.0
        text = f"{t.description}: {t.completed:.0f}"
        if t.total is not None:
            text += f"/{t.total:.0f}"
        text += f" in {seconds:.1f} s"
        rate = t.fields.get("rate") or ""
        return text + (f" ({rate})" if rate else "")

    def update(self, task_id: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        if not self._plain:
            return
        now = self.get_time()
        last = self._logged.setdefault(task_id, now)
        if now - last >= LOG_EVERY_S and not self._tasks[task_id].finished:
            self._logged[task_id] = now
            err_console.print(self._line(task_id) + ", running", highlight=False, markup=False)

    def advance(self, task_id: Any, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        super().__exit__(exc_type, exc, tb)
        if self._plain and exc_type is None:
            for t in self.tasks:
                err_console.print(self._line(t.id), highlight=False, markup=False)


def progress(transient: bool = False, disable: bool = False) -> Progress:
    """A progress bar with count, rate-based ETA and elapsed time; use as a context manager.

    Add ``rate`` to a task's fields (``progress.update(task, rate="12.3 img/s")``) to show it.
    With ``--quiet`` it shows nothing; off a terminal it prints plain lines instead (one per
    task at the end, and one a minute while a task runs).
    """
    quiet = disable or _state["quiet"]
    interactive = _interactive(err_console)
    return _Progress(
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
        disable=quiet or not interactive,
        plain=not quiet and not interactive,
    )


def rate_text(done: float, seconds: float, unit: str) -> str:
    """``"12.3 img/s"`` style rate for the progress bar's ``rate`` field."""
    return f"{done / seconds:.1f} {unit}/s" if seconds > 0 else f"- {unit}/s"


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A rich table; numbers are right-aligned, floats shown with 4 significant digits.

    The table is at least as wide as its title, so the title never wraps; text is shown as
    is (a class name or path with brackets is not markup).
    """
    t = Table(title=Text(title), title_justify="left", min_width=len(title))
    numeric = [
        all(isinstance(r[i], int | float) for r in rows) if rows else False
        for i in range(len(columns))
    ]
    for c, num in zip(columns, numeric, strict=True):
        t.add_column(c, justify="right" if num else "left")
    for r in rows:
        t.add_row(*(Text(f"{v:.4g}" if isinstance(v, float) else str(v)) for v in r))
    return t
