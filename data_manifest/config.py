"""The run config: one TOML file that drives every stage.

Layout (see ``configs/demo.toml`` for a documented example)::

    run_dir = "runs/demo"     # every stage writes below it unless its section says otherwise
    seed = 0
    [data]       # owned by data_manifest
    [annotate]   # owned by annotate
    [calibrate]  # owned by calibrate
    [train]      # owned by train

Each stage describes its section with a dataclass and reads it with :func:`parse_section`, which
rejects unknown keys and wrong types with one line naming the file, the key and what was
expected. Command-line options override the file (pass them as ``overrides``; ``None`` means
"not given"). :func:`write_resolved` records the final values in the run folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from data_manifest.errors import UserError
from data_manifest.io import atomic_write_text, not_found

T = TypeVar("T")
TOP_LEVEL = {"run_dir": str, "seed": int}
SECTIONS = ("data", "annotate", "calibrate", "train")
SEED_MAX = 2**32 - 1  # numpy's legacy RandomState and most upstream code take 32-bit seeds


def check_seed(value: int, where: str) -> int:
    """Return ``value`` if it is a seed every stage accepts, 0 <= seed <= 2**32 - 1.

    Raises:
        UserError: ``"<where> = <value>: expected an integer in [0, 4294967295]"``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise UserError(f"{where} = {value!r}: expected an integer in [0, {SEED_MAX}]")
    return value


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file (a leading byte-order mark, as some Windows editors write, dropped).

    Raises:
        UserError: missing, a folder, or not UTF-8 text.
    """
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected a {what} file")
    if not path.is_file():
        raise UserError(f"{path}: {what} {not_found(path)}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: byte {exc.start} is not UTF-8 text; expected a {what} file in UTF-8"
        ) from None


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """Read a run config. ``None`` gives an empty config (every stage then uses its defaults).

    Raises:
        UserError: missing file, TOML syntax error, unknown top-level key or section.
    """
    if path is None:
        return {}
    path = Path(path)
    try:
        cfg = tomllib.loads(read_text_file(path, "config"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML ({exc})") from None
    for key, value in cfg.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise UserError(f"{path}: [{key}] must be a table")
        elif key in TOP_LEVEL:
            if not isinstance(value, TOP_LEVEL[key]) or isinstance(value, bool):
                raise UserError(f"{path}: {key} = {value!r}; expected {TOP_LEVEL[key].__name__}")
            if key == "seed":
                check_seed(value, f"{path}: seed")
        else:
            raise UserError(
                f"{path}: unknown key {key!r}; expected {', '.join(TOP_LEVEL)} or a "
                f"section [{'], ['.join(SECTIONS)}]"
            )
    cfg["_source"] = str(path)
    return cfg


def _finite(value: Any) -> bool:
    """False when ``value`` is nan or inf, or a list or table holding one."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


def run_dir(cfg: dict[str, Any], override: str | None = None) -> Path:
    """The run folder: ``override``, else ``run_dir`` from the config, else ``runs/default``."""
    return Path(override or cfg.get("run_dir") or "runs/default")


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return isinstance(value, list | tuple) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        k, v = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all(
            _type_ok(a, k) and _type_ok(b, v) for a, b in value.items()
        )
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "nothing (omit the key)"
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a table"
    return {
        "str": "a string",
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
    }.get(getattr(tp, "__name__", ""), str(tp))


def option_name(key: str, options: dict[str, str] | None = None) -> str:
    """The command-line option that sets config key ``key``: ``options[key]``, else
    ``--key-with-dashes``."""
    return (options or {}).get(key) or "--" + key.replace("_", "-")


_KEY = re.compile(r"(\w+) = ")


def locate(
    message: str,
    cfg: dict[str, Any],
    section: str,
    given: Iterable[str] = (),
    options: dict[str, str] | None = None,
) -> str:
    """Say where the value a message is about came from.

    ``message`` reads ``"key = value: expected ..."`` or ``"[section] key = value: ..."``.
    When ``key`` was given on the command line (it is in ``given``) the message names the
    option (``"--alpha = 0.0: expected ..."``); otherwise the config file and section
    (``"configs/run.toml: [calibrate] alpha = 0.0: expected ..."``).
    """
    body = message
    if body.startswith(f"[{section}] "):
        body = body[len(section) + 3 :]
    m = _KEY.match(body)
    if m and m.group(1) in set(given):
        return option_name(m.group(1), options) + body[len(m.group(1)) :]
    source = cfg.get("_source")
    if source is None:  # no config file: defaults (or a value the command itself filled in)
        return f"[{section}] {body}"
    return f"{source}: [{section}] {body}"


def parse_section(
    cfg: dict[str, Any],
    section: str,
    cls: type[T],
    overrides: dict[str, Any] | None = None,
    options: dict[str, str] | None = None,
) -> T:
    """Build the dataclass ``cls`` from ``cfg[section]`` with ``overrides`` applied.

    Lists become tuples when the field is annotated as a tuple. The dataclass's
    ``__post_init__`` may raise ``ValueError("key = value: expected ...")`` for range checks;
    nan and inf are refused here, before it runs.
    A message about a value from the file names the file and section; one about an override
    (a command-line value; ``None`` = not given) names the option: ``options[key]``, else
    ``--key-with-dashes``.

    Raises:
        UserError: unknown key, wrong type, or a failed range check.
    """
    source = cfg.get("_source", "<command line>")
    given = [k for k, v in (overrides or {}).items() if v is not None]
    raw = dict(cfg.get(section, {}))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in raw:
        if key not in names:
            raise UserError(
                f"{source}: [{section}] unknown key {key!r}; expected one of {', '.join(names)}"
            )
    for key, value in (overrides or {}).items():
        if value is not None:
            if key not in names:
                raise ValueError(f"override {key!r} is not a field of [{section}]")
            raw[key] = value
    for key, value in raw.items():
        if not _type_ok(value, hints[key]):
            message = f"{key} = {value!r}; expected {_describe(hints[key])}"
            raise UserError(locate(message, cfg, section, given, options))
        if not _finite(value):  # nan passes every range check (all comparisons are false)
            message = f"{key} = {value!r}: expected finite numbers (no nan or inf)"
            raise UserError(locate(message, cfg, section, given, options))
        if typing.get_origin(hints[key]) is tuple and isinstance(value, list):
            raw[key] = tuple(value)
    try:
        return cls(**raw)
    except ValueError as exc:
        raise UserError(locate(str(exc), cfg, section, given, options)) from None


def section_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict (tuples as lists), for the resolved config."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        # a path whose name is not UTF-8 (surrogate escapes) is recorded as printable text
        v = v.encode("utf-8", "backslashreplace").decode("utf-8")
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def dump_toml(cfg: dict[str, Any]) -> str:
    """Serialise a config dict (top-level scalars, then one table per section) as TOML.

    ``None`` values are written as comments, since TOML has no null.
    """
    out = []
    tables = {k: v for k, v in cfg.items() if isinstance(v, dict) and not k.startswith("_")}
    for k, v in cfg.items():
        if k in tables or k.startswith("_"):
            continue
        out.append(f"# {k} is not set" if v is None else f"{_toml_key(k)} = {_toml_value(v)}")
    for name, table in tables.items():
        out.append(f"\n[{name}]")
        for k, v in table.items():
            out.append(f"# {k} is not set" if v is None else f"{_toml_key(k)} = {_toml_value(v)}")
    return "\n".join(out).lstrip("\n") + "\n"


def write_resolved(path: str | os.PathLike, cfg: dict[str, Any]) -> Path:
    """Write the resolved config as TOML atomically; it can be fed back with ``--config``."""
    path = Path(path)
    atomic_write_text(path, dump_toml(cfg))
    return path
