"""Run ``python -m mulan ARGS`` and SIGKILL it at an observed moment of its progress (for test_robustness).

    python tests/kill_at.py EVENT COUNT -- ARGS...

The process kills itself with SIGKILL (the signal ``kill -9`` sends: no handler, no clean-up) at the COUNT-th
occurrence (1-based) of EVENT, seen through Python's audit hooks, so the moment is what the run did, never a
delay:

* ``log``: opening ``metrics.jsonl`` to append a step's record (the step is computed, nothing of it saved);
* ``write``: the temporary file of a ``last.pt`` write just created (it exists, empty);
* ``rename``: renaming a fully written, fsynced ``last.pt`` temporary file over ``last.pt``.

If the run ends before that moment it exits normally and the caller sees that it was not killed.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys


def is_last_temp(path) -> bool:
    return os.path.basename(str(path)).startswith(".last.pt.")


def main() -> None:
    event, count, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: kill_at.py EVENT COUNT -- ARGS..."
    if event not in ("log", "write", "rename"):
        raise SystemExit(f"unknown event {event!r}")
    remaining = int(count)
    creating = False  # a last.pt temporary file is being created: its descriptor is opened next

    def seen(name: str, hook_args: tuple) -> bool:
        nonlocal creating
        if event == "log":
            return name == "open" and str(hook_args[0]).endswith("metrics.jsonl") and "a" in str(hook_args[1] or "")
        if event == "rename":  # raised before the rename happens
            return name == "os.rename" and is_last_temp(hook_args[0])
        # write: "open" is raised before the file is created; the file exists when its descriptor is wrapped
        # in a file object (os.fdopen raises "open" with the descriptor)
        if name == "open" and is_last_temp(hook_args[0]):
            creating = True
        elif name == "open" and creating and isinstance(hook_args[0], int):
            creating = False
            return True
        return False

    def hook(name: str, hook_args: tuple) -> None:
        nonlocal remaining
        if name in ("open", "os.rename") and seen(name, hook_args):
            remaining -= 1
            if remaining == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    sys.argv = ["mulan", *args]
    runpy.run_module("mulan", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
