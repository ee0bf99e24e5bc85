"""Fault injection for tests: runs composer_dlm.train in this process and kills it (SIGKILL) at a chosen point.

    python tests/faults.py MODE N YAML [overrides...]

MODE ``save``: the N-th checkpoint write of this process stops halfway (the file truncated) and the process dies.
MODE ``relink``: at the N-th checkpoint, the process dies after Composer removed ``latest`` and before it
created the new one. MODE ``none``: no fault. Random-time kills are done from outside by the test.
"""

from __future__ import annotations

import os
import signal
import sys


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
    elif mode != "none":
        raise SystemExit(f"unknown fault mode {mode!r}")


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    from composer_dlm.train import main

    sys.exit(main(sys.argv[3:]))
