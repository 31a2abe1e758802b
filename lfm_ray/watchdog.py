"""A killed driver takes its local Ray instance with it.

`ray.init()` without an address starts a Ray instance whose processes (GCS, raylet, agents,
Train controller and workers, Tune trials) are the driver's to end: at a normal exit or
Ctrl-C the driver shuts them down itself. Killed (SIGKILL, the OOM killer), it cannot, and
Ray's own fate-sharing is not enough: its workers train on for a while and write checkpoints
after the kill, and its agents can hang for good.

So once the driver has started a local instance it starts this watchdog, a small process in
a session of its own, with the instance's session folder (/tmp/ray/session_...). The
watchdog waits for the driver to end (its parent changes), then SIGKILLs every process that
has a file open in that folder (every Ray process of the instance keeps its log files
there; Ray renames its processes, so their command lines and environments cannot tell),
again until none is left. Processes of other Ray instances, and of a cluster the driver
only connected to, are never touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.2
SWEEP_S = 30.0  # how long, after the driver ended, processes of its instance are hunted

_guarded: set[str] = set()  # session folders this process started a watchdog for


def instance_pids(session_dir: str | os.PathLike) -> list[int]:
    """Pids of the live processes (this one aside) with a file open in `session_dir`."""
    prefix = str(Path(session_dir).resolve()).rstrip("/") + "/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(prefix):
                found.append(int(entry.name))
                break
    return found


def guard_local_instance(session_dir: str | os.PathLike) -> bool:
    """Start the watchdog of the local instance in `session_dir`, once per instance;
    False where /proc is not there to find its processes by (e.g. macOS)."""
    session = str(Path(session_dir).resolve())
    if session in _guarded:
        return True
    if not Path("/proc/self/fd").is_dir():
        return False
    subprocess.Popen([sys.executable, "-m", "lfm_ray.watchdog", str(os.getpid()), session],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    _guarded.add(session)
    return True


def sweep(session_dir: str | os.PathLike, seconds: float = SWEEP_S) -> int:
    """SIGKILL every process of the instance until none is left (or `seconds` pass);
    returns how many were killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pids = instance_pids(session_dir)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:
                pass
        time.sleep(POLL_S)
    return len(killed)


def main(argv: list[str]) -> int:
    driver, session = int(argv[0]), argv[1]
    # Ctrl-C and a hang-up reach the driver, which shuts its instance down itself; the
    # watchdog stays until the driver is gone, then clears what is left.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while os.getppid() == driver:
        time.sleep(POLL_S)
    sweep(session)
    return 0


if __name__ == "__main__":  # pragma: no cover - started by guard_local_instance
    sys.exit(main(sys.argv[1:]))
