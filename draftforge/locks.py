"""One command at a time in a folder: the lock a command holds on what it writes.

``train`` holds ``output.dir``, ``capture`` the features folder, ``export`` its ``--out``, for
as long as they write there. A second command finds the lock taken and stops with one line
naming the holder, before it has touched anything::

    runs/x is in use by draftforge train (pid 1234 on host-a, since 2026-12-02 03:05:11);
    wait for it to end, or use another output.dir

Readers (training from a capture, exporting a run's checkpoint) take no lock.

The lock
--------
``fcntl.flock`` on a lock file, :data:`LOCK_FILE` inside the folder (an export, whose folder
is replaced whole, locks a file beside it). The file holds the holder's record: command, pid,
host, start time and torchrun job. Taking it: open (creating) the file, ``flock(LOCK_EX |
LOCK_NB)``, check that the path still names the file locked (its holder may have just removed
it), write the record. Releasing it, also on an exception, Ctrl-C, or SIGTERM (which raises
``SystemExit`` while the lock is held, unless the process has a SIGTERM handler of its own):
remove the file while still holding it, then unlock.

Stale locks: the kernel drops a flock when its process ends, however it ends. A lock file
that nobody holds but that names a process was left by one that was killed outright (SIGKILL,
out of memory, a crashed machine); from the same host it is taken over with a printed note.
One from another host is never taken over: which of its processes run cannot be seen from
here (and some network file systems keep flocks local), so the message says which file to
delete once that run is known to be over. On a file system without flock (e.g. Lustre mounted
``noflock``) the record alone decides: a live pid on this host holds the lock.

torchrun
--------
One process per job holds a folder's lock: rank 0 (on every node, ``flock`` is per process).
Under ``train`` only rank 0 writes into ``output.dir``, so the other ranks ignore the lock.
Under ``capture`` every rank writes into the features folder, so the others first wait until
:func:`held_by_this_job` (the record names their job, by its rendezvous address); when another
job holds the folder, rank 0 stops with the message above and torchrun ends the job's ranks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

LOCK_FILE = ".draftforge.lock"
_HOST = socket.gethostname()
# A holder writes its record just after taking the lock: how long a reader waits for it.
_RECORD_WAIT_S = 2.0


@contextmanager
def hold(
    directory: Path,
    command: str,
    error: type[Exception],
    elsewhere: str,
    *,
    lock_file: Path | None = None,
) -> Iterator[None]:
    """Hold ``directory``'s lock while the block runs.

    When another process holds it, raises ``error`` with one line naming the holder and ending
    in ``elsewhere``, what to do instead of waiting. ``lock_file`` defaults to
    :data:`LOCK_FILE` inside ``directory``. Folders created for the lock file are removed with
    it when the block left them empty: a command that stops early leaves nothing behind.
    """
    path = lock_file or directory / LOCK_FILE
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    fd = _acquire(path, directory, command, error, elsewhere)
    try:
        with _sigterm_exits():
            yield
    finally:
        _release(fd, path)
        for folder in created:  # innermost first: one that is not empty stays, as do its parents
            with contextlib.suppress(OSError):
                folder.rmdir()


def held_by_this_job(directory: Path) -> bool:
    """Whether rank 0 of this process's torchrun job holds ``directory``'s lock."""
    try:
        holder = _parse((directory / LOCK_FILE).read_bytes())
    except FileNotFoundError:
        return False
    return (
        holder is not None
        and holder["job"] == _job()
        and (holder["host"] != _HOST or _alive(holder["pid"]))
    )


def _acquire(
    path: Path, directory: Path, command: str, error: type[Exception], elsewhere: str
) -> int:
    """An open descriptor of ``path`` holding its lock, with this process's record in it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the folder is not there (or was just removed by a holder)
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            locked = _flock(fd)
            if locked is not False and _replaced(fd, path):
                os.close(fd)  # its holder removed it after our open: lock the file there now
                continue
            holder = _read_record(fd, wait=locked is False)
            if locked is False or (locked is None and holder and _alive_here(holder)):
                raise error(
                    f"{directory} is in use by {_describe(holder, path)}; "
                    f"wait for it to end, or {elsewhere}"
                )
            if holder is not None and holder["host"] != _HOST:
                raise error(
                    f"{directory} is locked by {_describe(holder, path)}, and from {_HOST} it "
                    f"cannot be told whether that still runs; once it has ended, delete {path}"
                )
            if holder is not None:
                print(
                    f"note: taking over {path}, left by {_describe(holder, path)}, "
                    "which no longer runs",
                    flush=True,
                )
            record = {
                "command": command,
                "pid": os.getpid(),
                "host": _HOST,
                "since": time.time(),
                "job": _job(),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            os.fsync(fd)  # readers on other hosts of a network file system see it
            return fd
        except BaseException:
            os.close(fd)
            raise


def _release(fd: int, path: Path) -> None:
    try:
        if not _replaced(fd, path):
            path.unlink()
    finally:
        with contextlib.suppress(OSError):  # a file system without flock
            fcntl.flock(fd, fcntl.LOCK_UN)  # also for children that inherited the descriptor
        os.close(fd)


def _flock(fd: int) -> bool | None:
    """True: locked by us; False: another process holds it; None: no flock on this file system."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _replaced(fd: int, path: Path) -> bool:
    """Whether ``path`` no longer names the file open as ``fd``."""
    try:
        named = path.stat()
    except FileNotFoundError:
        return True
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino)


def _read_record(fd: int, wait: bool) -> dict[str, Any] | None:
    """The record in the lock file; with ``wait``, for a holder that is about to write it."""
    deadline = time.monotonic() + (_RECORD_WAIT_S if wait else 0.0)
    while True:
        holder = _parse(os.pread(fd, 1 << 16, 0))
        if holder is not None or time.monotonic() >= deadline:
            return holder
        time.sleep(0.05)


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        holder = json.loads(data)
        fields = (holder["command"], holder["pid"], holder["host"], holder["since"])
    except (ValueError, TypeError, KeyError):
        return None
    kinds = (str, int, str, (int, float))
    if not all(isinstance(value, kind) for value, kind in zip(fields, kinds, strict=True)):
        return None
    holder.setdefault("job", "")
    return holder


def _describe(holder: dict[str, Any] | None, path: Path) -> str:
    if holder is None:
        return f"another process (its lock file {path} does not say which)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
    return f"{holder['command']} (pid {holder['pid']} on {holder['host']}, since {since})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _alive_here(holder: dict[str, Any]) -> bool:
    return holder["host"] == _HOST and _alive(holder["pid"])


def _job() -> str:
    """The torchrun job of this process, by its rendezvous; empty outside torchrun."""
    if "MASTER_PORT" not in os.environ:
        return ""
    env = os.environ
    return f"{env.get('MASTER_ADDR', '')}:{env['MASTER_PORT']}/{env.get('TORCHELASTIC_RUN_ID', '')}"


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``SystemExit(143)``, so that the lock file is
    removed on the way out; only where SIGTERM would otherwise end the process on the spot
    (the main thread, no handler installed). Training's own handler replaces it in its loop."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    ):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)
