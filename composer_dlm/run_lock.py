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

Some shared filesystems (some NFS and Lustre mounts) have no ``flock``: the call fails with an error other than
"would block". The lock is then the file ``{run_folder}/.lock.owner``, created atomically (``O_CREAT | O_EXCL``)
with the holder's pid and host, and removed on release. A holder killed hard leaves it behind; it is stale, and
taken over, when it names this host and a pid that no longer runs. One naming another host cannot be judged from
here: the error names the file to delete, and ``checkpoint.lock: false`` runs without a lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from composer.core import Callback

from composer_dlm.fsutil import pid_alive

LOCK_NAME = ".lock"
OWNER_NAME = ".lock.owner"  # the lock where flock is unavailable

_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock; the message names it and what to do."""


class LockUnavailableError(RunLockedError):
    """The run folder's lock could not be taken at all (not: another run holds it); the message says what to do."""


class RunLock(Callback):
    """The run folder's lock (see the module's docstring). :meth:`acquire` creates the folder if needed."""

    def __init__(self, run_folder: str | os.PathLike[str]) -> None:
        self.run_folder = Path(run_folder)
        self.path = self.run_folder / LOCK_NAME
        self.owner_path = self.run_folder / OWNER_NAME
        self._fd: int | None = None
        self._owns_file = False

    @property
    def held(self) -> bool:
        return self._fd is not None or self._owns_file

    def acquire(self) -> None:
        """Takes the lock without waiting; :class:`RunLockedError` when another process holds it."""
        assert not self.held, "acquired twice"
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
        except OSError:  # no flock on this filesystem
            os.close(fd)
            self._acquire_owner_file()
            return
        os.ftruncate(fd, 0)
        os.write(fd, _holder().encode())
        self._fd = fd
        _HELD.add(fd)

    def _acquire_owner_file(self) -> None:
        """The lock without flock: create ``.lock.owner`` exclusively, taking over a stale one (see the module)."""
        for _ in range(2):
            try:
                fd = os.open(self.owner_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                try:
                    holder = self.owner_path.read_text().strip()
                except FileNotFoundError:  # released meanwhile
                    continue
                if not _is_stale(holder):
                    raise RunLockedError(
                        f"run folder {self.run_folder} is in use by another run ({holder or 'an unknown process'}); "
                        f"this filesystem has no flock, so the lock is the file {self.owner_path}: wait for that "
                        "run to finish, or delete the file if no run uses the folder, or set checkpoint.lock=false "
                        "to run without a lock"
                    ) from None
                self.owner_path.unlink(missing_ok=True)
                continue
            os.write(fd, _holder().encode())
            os.close(fd)
            self._owns_file = True
            return
        raise RunLockedError(f"run folder {self.run_folder}: another run took {self.owner_path} meanwhile")

    def release(self) -> None:
        """Drops the lock (the flock's file stays: removing it could race with a run taking it)."""
        if self._owns_file:
            self.owner_path.unlink(missing_ok=True)
            self._owns_file = False
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def post_close(self) -> None:
        self.release()


def _holder() -> str:
    return f"pid {os.getpid()} on host {socket.gethostname()}\n"


def _is_stale(holder: str) -> bool:
    """Whether an owner file's ``pid N on host H`` names a process of this host that no longer runs."""
    words = holder.split()
    if len(words) != 5 or words[0] != "pid" or not words[1].isdigit() or words[4] != socket.gethostname():
        return False
    return not pid_alive(int(words[1]))
