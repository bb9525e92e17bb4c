"""No process a run started outlives it, however the run ends: SIGKILL of the driver included.

Ray's head processes share the driver's fate on Linux, but not all of them:
after a SIGKILL of the driver, Ray's dashboard and runtime-env agents were
still alive 30 s later, and after an abort a ``ray::ClientWorker`` was left
with parent PID 1, holding 864 MB. A signal handler cannot help with SIGKILL,
so a small watcher process does it:

* :func:`reaped` starts ``python -m strategies.runners.process_reaper PID``
  in its own session (a Ctrl-C or SIGTERM sent to the terminal's process
  group does not reach it) with a pipe from the driver on its standard input;
* while the driver lives, the watcher records the driver's descendants that
  were started after it (never anything that ran before the run) every
  :data:`POLL_SECONDS`;
* when the pipe closes (the run ended, or the driver died: the kernel closes
  a dead process's pipes), it sends SIGTERM to every recorded process still
  alive, then SIGKILL after :data:`GRACE_SECONDS`, and exits.

A process is identified by its PID and creation time, so a PID reused by
the system is never touched.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

POLL_SECONDS = 0.25  # how often the watcher records new descendants (Ray starts workers within seconds)
GRACE_SECONDS = 3.0  # between SIGTERM and SIGKILL: Ray's processes clean up their sockets on SIGTERM


@contextmanager
def reaped() -> Iterator[None]:
    """Run the body with a watcher that ends every process it started when the body ends or this process dies."""
    watcher = subprocess.Popen(
        [sys.executable, "-m", "strategies.runners.process_reaper", str(os.getpid()), repr(time.time())],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    try:
        yield
    finally:
        assert watcher.stdin is not None
        watcher.stdin.close()  # the watcher ends what is left, then exits
        try:
            watcher.wait(timeout=GRACE_SECONDS + 10)
        except subprocess.TimeoutExpired:  # never hold up the driver's exit for it
            pass


def watch(driver_pid: int, since: float) -> None:
    """Record the driver's descendants started after ``since`` until standard input closes; then end them."""
    import psutil

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # only the pipe's end stops the watcher
        signal.signal(sig, signal.SIG_IGN)
    seen: dict[tuple[int, float], psutil.Process] = {}
    me = os.getpid()
    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        driver = None
    while True:
        if driver is not None:
            try:
                for child in driver.children(recursive=True):
                    try:
                        created = child.create_time()
                    except psutil.Error:
                        continue
                    if child.pid != me and created >= since - 1.0:
                        seen.setdefault((child.pid, created), child)
            except psutil.Error:  # the driver is gone: what was recorded is what there is
                driver = None
        ready, _, _ = select.select([sys.stdin], [], [], POLL_SECONDS)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
    end(list(seen.values()))


def end(processes: list[Any]) -> None:  # psutil.Process objects (psutil ships no types)
    """SIGTERM every process still alive (the same one: psutil checks its creation time), then SIGKILL."""
    import psutil

    alive = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.terminate()
                alive.append(proc)
        except psutil.Error:
            continue
    _, left = psutil.wait_procs(alive, timeout=GRACE_SECONDS)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            continue


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]))
