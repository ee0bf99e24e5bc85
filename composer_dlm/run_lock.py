"""One run per run folder: an exclusive ``flock`` on ``{run_folder}/.lock``, held for the life of the run.

Two processes training into the same folder would both resume from, write and rotate the same checkpoints (one
dies in Composer's rotation after the other deleted its file) and interleave samples.txt. The kernel drops a
``flock`` when its holder exits in any way, SIGKILL included, so a crashed run never leaves a stale lock: the
file stays, the lock does not. The file's text (pid and host of the holder) is only for the error message.

Taken by global rank 0 only (the run folder is shared by the ranks of one run); released by
:meth:`RunLock.release`, which the Trainer calls through ``post_close`` when the lock is one of its callbacks.
A ``flock`` belongs to the open file, which forked children (data loader workers) would share and keep locked
for a while after their parent is killed: children close their copy right after the fork, and ``O_CLOEXEC``
keeps it out of programs they start.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from composer.core import Callback

LOCK_NAME = ".lock"

_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock; the message names it and what to do."""


class RunLock(Callback):
    """The run folder's lock (see the module's docstring). :meth:`acquire` creates the folder if needed."""

    def __init__(self, run_folder: str | os.PathLike[str]) -> None:
        self.run_folder = Path(run_folder)
        self.path = self.run_folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Takes the lock without waiting; :class:`RunLockedError` when another process holds it."""
        assert self._fd is None, "acquired twice"
        self.run_folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise RunLockedError(
                f"run folder {self.run_folder} is in use by another run ({holder}); wait for it to finish or stop "
                "it, or give this run another run_name. (A crashed run releases the folder by itself.)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        self._fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        """Drops the lock (the file stays: removing it could race with a run taking it)."""
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def post_close(self) -> None:
        self.release()
