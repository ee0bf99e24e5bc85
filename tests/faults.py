"""Fault injection for tests: runs composer_dlm.train in this process and kills it (SIGKILL) at a chosen point.

    python tests/faults.py MODE N YAML [overrides...]
    composer -n 2 tests/faults.py MODE N YAML [overrides...]     (every rank installs the fault)

MODE ``save``: the N-th checkpoint write of this process stops halfway (the file truncated) and the process dies.
MODE ``relink``: at the N-th checkpoint, the process dies after Composer removed ``latest`` and before it
created the new one. MODE ``dcp`` (sharded FSDP checkpoints): at the N-th checkpoint each rank truncates its
shard file once written and dies. MODE ``none``: no fault. Random-time kills are done from outside by the test
(:func:`kill_after_batches`); :func:`launch_ranks` starts N processes through Composer's launcher,
:func:`run_ranks` runs them to a successful end, :func:`run_spawned` runs functions in fresh processes at once, :func:`rank0_metrics` (and :func:`rank0_metrics_by_attempt`, per launch) reads the metrics rank 0 logged.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A training batch on the console: Composer's "[batch=3/12]" or our progress line "[batch 3/12] loss ...".
BATCH_LINE = re.compile(r"^\[batch[ =]\d+")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_spawned(target: Callable[..., object], calls: list[tuple], timeout: float = 300) -> list[int | None]:
    """Run target(*args) for each args in `calls` in as many spawned processes at once; their exit codes.

    Spawned, not forked: a fork of the test process (which runs threads) can inherit a lock that no thread will
    release and hang. A process still running after `timeout` seconds is killed and fails the test.
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in calls]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, (
        f"{len(hung)} of {len(procs)} processes running {target.__name__} did not end in {timeout} s"
    )
    return [p.exitcode for p in procs]


def launch_ranks(nproc: int, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m composer.cli.launcher -n nproc --master_port P ARGS`` (what ``composer -n`` runs), in its
    own process group so that :func:`kill_group` takes the launcher and every rank down at once, as a crash of
    the machine would. Rank 0's output is piped; the other ranks' goes to Composer's per-rank log files."""
    cmd = [sys.executable, "-m", "composer.cli.launcher", "-n", str(nproc), "--master_port", str(free_port())]
    env = os.environ | {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"} | (env or {})
    return subprocess.Popen(
        [*cmd, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )


def kill_group(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Sends ``sig`` to every process of ``p``'s process group (``p`` started with ``start_new_session``), as
    a crash of the machine (SIGKILL) or a Ctrl-C at the terminal (SIGINT) does."""
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def _processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command name: state, ppid, pgid, ...) of every process listed."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            yield int(stat.parent.name), stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited meanwhile
            continue


def live_group_members(pgid: int) -> list[int]:
    """Pids of the processes of group ``pgid`` still running (zombies, dead but not yet reaped, left out)."""
    return [pid for pid, fields in _processes() if int(fields[2]) == pgid and fields[0] != "Z"]


def spawned_children() -> list[int]:
    """Pids of this process's children started by multiprocessing's spawn (not its resource tracker)."""
    found = []
    for pid, fields in _processes():
        if int(fields[1]) != os.getpid():
            continue
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def run_ranks(nproc: int, args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """:func:`launch_ranks`, waited for (every process of the group killed afterwards, even on a timeout); asserts
    that it succeeded and returns rank 0's output."""
    p = launch_ranks(nproc, args, env)
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        kill_group(p)
    assert p.returncode == 0, out[-8000:]
    return out


def rank0_metrics_by_attempt(run_folder: Path, name: str) -> list[dict[int, float]]:
    """batch -> value of the metric ``name``, one dict per launch of the run (rank 0's log files, oldest first):
    what a resumed launch logged shows where it resumed from."""
    logs = sorted((run_folder / "logs").glob("rank0-*.txt"), key=lambda p: p.stat().st_mtime)
    pattern = rf"\[metric\]\[batch=(\d+)\]: {re.escape(name)}: (\S+)"
    return [{int(b): float(v) for b, v in re.findall(pattern, log.read_text())} for log in logs]


def rank0_metrics(run_folder: Path, name: str) -> dict[int, float]:
    """batch -> value of the metric ``name`` over all launches of the run (the last one wins)."""
    out: dict[int, float] = {}
    for attempt in rank0_metrics_by_attempt(run_folder, name):
        out.update(attempt)
    return out


def wait_for_batches(p: subprocess.Popen, k: int) -> str:
    """Reads ``p``'s output until it has logged ``k`` training batches; returns what it printed so far."""
    assert p.stdout is not None
    lines, seen = [], 0
    for line in p.stdout:
        lines.append(line)
        seen += bool(BATCH_LINE.match(line))
        if seen == k:
            break
    return "".join(lines)


def kill_after_batches(p: subprocess.Popen, k: int, *, group: bool = False, sig: int = signal.SIGKILL) -> str:
    """Sends ``sig`` (SIGKILL) to ``p`` (with ``group``, to its whole process group) once it has logged ``k``
    training batches; returns what it printed."""
    out = wait_for_batches(p, k)
    kill_group(p, sig) if group else p.send_signal(sig)
    rest, _ = p.communicate(timeout=600)
    return out + (rest or "")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(mode: str, n: int) -> None:
    import composer.callbacks.checkpoint_saver as saver
    import composer.utils.checkpoint as ckpt

    calls = {"write": 0, "symlink": 0}
    if mode == "save":
        original_write = ckpt._write_checkpoint_file

        def write(state_dict, filename):  # type: ignore[no-untyped-def]
            calls["write"] += 1
            original_write(state_dict, filename)
            if calls["write"] == n:
                size = os.path.getsize(filename)
                with open(filename, "r+b") as f:
                    f.truncate(size // 2)
                _die()

        ckpt._write_checkpoint_file = write
    elif mode == "relink":
        real_os = saver.os

        class OsProxy:
            def __getattr__(self, name):  # type: ignore[no-untyped-def]
                return getattr(real_os, name)

            @staticmethod
            def symlink(src, dst):  # type: ignore[no-untyped-def]
                calls["symlink"] += 1
                if calls["symlink"] == n:
                    _die()  # `latest` was already removed by Composer
                return real_os.symlink(src, dst)

        saver.os = OsProxy()
    elif mode == "dcp":
        real_dcp = ckpt.dist_cp

        class DcpProxy:
            def __getattr__(self, name):  # type: ignore[no-untyped-def]
                return getattr(real_dcp, name)

            @staticmethod
            def save(*args, storage_writer, **kwargs):  # type: ignore[no-untyped-def]
                calls["write"] += 1
                result = real_dcp.save(*args, storage_writer=storage_writer, **kwargs)
                if calls["write"] == n:
                    for shard in Path(storage_writer.path).glob(f"__{os.environ.get('RANK', '0')}_*.distcp"):
                        with open(shard, "r+b") as f:
                            f.truncate(shard.stat().st_size // 2)
                    _die()  # before Composer points `latest` at it
                return result

        ckpt.dist_cp = DcpProxy()
    elif mode != "none":
        raise SystemExit(f"unknown fault mode {mode!r}")


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    from composer_dlm.train import main

    sys.exit(main(sys.argv[3:]))
