"""Who may write into a folder, and one writer at a time.

Ownership. Every command that writes a folder of outputs marks it with a hidden file
:data:`OWNER_FILE` holding the command's name (``calibrate run``, ``train fit``, ...). A command
writes only into a folder that is absent, empty, or marked with its own name
(:func:`check_claim`, :func:`claim`); inside it, it replaces and removes only files it wrote.
Folders written before the marker existed are recognised by what they hold (``legacy``).

Locks. While a command writes a folder it holds an exclusive ``flock`` on a lock file
(:func:`writer_lock`). ``flock`` was chosen over a lock file created with ``O_EXCL``: the kernel
releases it when the process ends, however it ends (``kill -9``, out of memory, a lost node's
processes), so no lock is ever left stuck and no process id has to be checked for liveness
(ids are reused; and a pid says nothing about another machine). The file also holds the
holder's process id, host, start time and command line, for the message a second writer gets;
its holder removes it on release. On network file systems Linux maps ``flock`` onto the
server's byte-range locks (NFSv4, NFSv3 with lockd, Lustre mounted with ``-o flock``), so
writers on different machines exclude each other too; with ``nolock`` or ``local_lock=all``
mounts only writers on one machine do, and a file system that refuses locks outright (no lock
daemon, some FUSE mounts) makes the lock a no-op, with one warning line.

Dask: the process that starts a run (the driver) holds the lock; the tasks it sends to workers
write under it and take no lock themselves.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from data_manifest.errors import UserError
from data_manifest.io import atomic_write_text

try:
    import fcntl
except ImportError:  # not a POSIX system: no locks (each writer_lock is then a no-op)
    fcntl = None  # type: ignore[assignment]

OWNER_FILE = ".conformalsam-owner"
LOCK_FILE = ".conformalsam.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_held_in_child() -> None:
    """In a forked child (DataLoader workers, multiprocessing pools): close the inherited lock
    descriptors. The lock stays with the parent, and no longer outlives it in a child that
    is still shutting down when the parent is killed."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def _never(folder: Path) -> bool:
    return False


def holding(*names: str) -> Callable[[Path], bool]:
    """A ``legacy`` test: the folder holds exactly the files of these names (all a command
    writes, so that a user's folder that happens to hold one of them is not taken)."""
    return lambda folder: set(_entries(folder)) == set(names)


def owner_of(folder: str | os.PathLike) -> str | None:
    """The command that marked ``folder`` as its own, or None (no marker)."""
    try:
        text = (Path(folder) / OWNER_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def _entries(folder: Path) -> list[str]:
    """Names in ``folder`` other than the marker and lock files, sorted."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name != OWNER_FILE and not p.name.startswith(LOCK_FILE)
    )


def check_claim(
    folder: str | os.PathLike,
    owner: str,
    option: str,
    legacy: Callable[[Path], bool] = _never,
) -> None:
    """Refuse a folder that ``owner`` (a command, ``"calibrate run"``) may not write into.

    Allowed: an absent or empty folder, one marked by ``owner``, or an unmarked one for which
    ``legacy(folder)`` says ``owner`` wrote it before markers existed. Reads only.

    Raises:
        UserError: ``folder`` is a file, is marked by another command, or holds files and no
            marker (one line naming ``option``, the folder and the first file).
    """
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"{option} = {folder}: is a file; expected a folder (created if absent)")
    have = owner_of(folder)
    if have == owner:
        return
    if have is not None:
        raise UserError(
            f"{option} = {folder}: written by python -m {have} (see {OWNER_FILE}); expected an "
            f"empty or new folder, or one written by python -m {owner} (choose another folder)"
        )
    names = _entries(folder)
    if names and not legacy(folder):
        raise UserError(
            f"{option} = {folder}: holds files that python -m {owner} did not write (first: "
            f"{names[0]!r}); expected an empty or new folder, or one written by python -m "
            f"{owner} (choose another folder)"
        )


def claim(
    folder: str | os.PathLike,
    owner: str,
    option: str,
    legacy: Callable[[Path], bool] = _never,
) -> Path:
    """:func:`check_claim`, then create ``folder`` if needed and mark it as ``owner``'s."""
    folder = Path(folder)
    check_claim(folder, owner, option, legacy)
    folder.mkdir(parents=True, exist_ok=True)
    if owner_of(folder) != owner:
        atomic_write_text(folder / OWNER_FILE, owner + "\n")
    return folder


# -- locks -------------------------------------------------------------------------------------
def _command_line() -> str:
    """This process's command line as the user typed it (``python -m calibrate run ...``)."""
    head, *args = sys.argv or [""]
    path = Path(head)
    if path.name == "__main__.py":
        head = f"python -m {path.parent.name}"
    else:
        head = path.name
    return " ".join([head, *args])


def _details(mode: str) -> bytes:
    """What a lock file says about its holder."""
    info = {
        "mode": mode,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": _command_line(),
    }
    return json.dumps(info).encode()


def _holder_text(path: Path) -> str:
    """The message's account of the holder of a lock file."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (
            f"another run is {info['mode']} it (pid {info['pid']} on {info['host']}, started "
            f"{info['started']}: {info['command']})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another run is using it (it has not written its details yet)"


def _warn_no_locks(path: Path, exc: OSError) -> None:
    from data_manifest.cli_support import err_console

    err_console.print(
        f"warning: {path.parent}: the file system cannot lock files ({exc.strerror}); make "
        "sure no other run writes here at the same time",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _try_lock(path: Path, shared: bool) -> int | None:
    """An open, flock-ed descriptor of ``path`` (created if absent); None when the file system
    has no locks. A file unlinked by its previous holder between our open and our lock is
    opened again, so the lock we hold is always on the file at ``path``.

    Raises:
        BlockingIOError: another process holds a conflicting lock.
        OSError: the lock file cannot be created (named as its folder).
    """
    if fcntl is None:
        return None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # a read-only folder, a full disk: name the folder
            raise OSError(exc.errno, exc.strerror, str(path.parent)) from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_LOCKS:
                _warn_no_locks(path, exc)
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            _HELD.add(fd)
            return fd
        os.close(fd)


def _release(path: Path, fd: int | None) -> None:
    """Remove the lock file if no one else holds it (we can hold it exclusively), then close."""
    if fd is None:
        return
    _HELD.discard(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    except OSError:
        pass  # another shared holder still has it: it removes the file
    finally:
        os.close(fd)


def _locked_by_other(path: Path, exclusive: bool) -> bool:
    """Whether another process holds a lock on ``path`` that excludes a shared (``exclusive``
    True: any) lock, tested without keeping one."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _busy(folder: Path, lock: Path, whole: bool) -> UserError:
    """The refusal naming the live holder of ``lock``. A part's lock, or a ``whole`` lock held
    exclusively, says who holds it; a whole lock held shared only (by writers of parts) is
    named by a part whose own file is held."""
    holder = lock
    if whole and not _locked_by_other(lock, exclusive=False):
        live = [p for p in sorted(lock.parent.glob(lock.name + ".*")) if _locked_by_other(p, True)]
        holder = live[0] if live else lock
    return UserError(
        f"{folder}: {_holder_text(holder)}; expected one writer at a time: wait for it to "
        "finish (or stop it), then run again"
    )


@contextlib.contextmanager
def _holding(
    folder: Path, lock: Path, mine: Path, mode: str, created: list[Path]
) -> Iterator[None]:
    """Hold ``lock`` (exclusively when it is ``mine``, else shared) and ``mine`` exclusively,
    with this process's details in ``mine``; release both and remove ``created`` folders if
    they are empty."""
    held: list[tuple[Path, int | None]] = []
    try:
        for path in dict.fromkeys((lock, mine)):
            try:
                held.append((path, _try_lock(path, shared=path != mine)))
            except BlockingIOError:
                raise _busy(folder, path, whole=path == lock) from None
        fd = held[-1][1]
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _details(mode), 0)
        yield
    finally:
        for path, fd in reversed(held):
            _release(path, fd)
        for d in reversed(created):  # folders made only for the lock, if still empty
            with contextlib.suppress(OSError):
                d.rmdir()


def writer_lock(
    folder: str | os.PathLike,
    lock: str | os.PathLike | None = None,
    part: str | None = None,
) -> contextlib.AbstractContextManager[None]:
    """Hold the exclusive lock of ``folder`` (created if absent) while the block runs.

    Args:
        folder: the folder being written (named in the message).
        lock: the lock file; default ``folder/.conformalsam.lock``.
        part: write only part of the folder: hold ``lock`` shared and ``<lock>.<part>``
            exclusively, so that writers of distinct parts run together (annotate's shards,
            ``part="0-of-2"``) while a writer of the whole (``part`` None) excludes them all.
    Raises:
        UserError: another process holds a conflicting lock (one line naming it).
    """
    folder = Path(folder)
    lock = Path(lock) if lock is not None else folder / LOCK_FILE
    created = _make_parents(lock.parent)
    mine = lock if part is None else lock.parent / f"{lock.name}.{part}"
    return _holding(folder, lock, mine, "writing", created)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, outermost first."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))
