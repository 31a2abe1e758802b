"""A real two-node Ray cluster on this machine, started with Ray's own `ray start`, on the
loopback address, with token authentication on (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN):

- a smoke study through `--address` lands its trials on both nodes;
- a client with a wrong or a missing token is refused in one line that names the token;
- `ray job submit` (the dashboard's job server, the `cluster` extra) runs a study on it;
- killing the worker node while trials run on it loses no trial: each is retried from its
  last checkpoint on the surviving node.

Every process the module starts is ended by its own id (never `ray stop`, which would end
every Ray process on the machine): each node is a `ray start --block` process whose
descendants and whose session folder's processes are killed at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from lfm_ray.watchdog import instance_pids

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
LOOPBACK = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((LOOPBACK, 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class Cluster:
    """A head and a worker node, each a `ray start --block` process of this test."""

    def __init__(self, tmp: Path, dashboard: bool = True):
        self.tmp = tmp
        self.token = secrets.token_hex(16)
        ports = free_ports(16)
        self.port, self.dashboard_port = ports[0], ports[1]
        self.address = f"{LOOPBACK}:{self.port}"
        # One per node, as on separate machines (a shared one would let one node's clean-up
        # delete the other's files: a job's working directory among them); short, as Ray's
        # socket paths below them must fit in 107 bytes.
        self.temp_dirs = [Path(tempfile.mkdtemp(prefix="lfm-", dir="/tmp")) for _ in range(2)]
        # Token authentication on; the loopback address kept (see tests/ray_loopback.py).
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT),
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("RAY_ADDRESS", None)
        # This interpreter's environment first on PATH (as when it is activated), so a job's
        # `python` is the one that has lfm-ray's dependencies.
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        head = [RAY, "start", "--head", "--block", "--node-ip-address", LOOPBACK,
                "--port", str(self.port), "--num-cpus", "1", "--disable-usage-stats",
                "--temp-dir", str(self.temp_dirs[0]),
                "--node-manager-port", str(ports[2]), "--object-manager-port", str(ports[3]),
                "--ray-client-server-port", str(ports[4]),
                "--dashboard-agent-listen-port", str(ports[5]),
                "--dashboard-agent-grpc-port", str(ports[6]),
                "--runtime-env-agent-port", str(ports[7]),
                "--metrics-export-port", str(ports[8])]
        if dashboard:
            head += ["--include-dashboard", "true", "--dashboard-host", LOOPBACK,
                     "--dashboard-port", str(self.dashboard_port)]
        else:
            head += ["--include-dashboard", "false"]
        worker = [sys.executable, str(ROOT / "tests" / "ray_loopback.py"), "start", "--block",
                  "--address", self.address, "--node-ip-address", LOOPBACK, "--num-cpus", "1",
                  "--disable-usage-stats", "--temp-dir", str(self.temp_dirs[1]),
                  "--node-manager-port", str(ports[9]),
                  "--object-manager-port", str(ports[10]),
                  "--dashboard-agent-listen-port", str(ports[11]),
                  "--dashboard-agent-grpc-port", str(ports[12]),
                  "--runtime-env-agent-port", str(ports[13]),
                  "--metrics-export-port", str(ports[14])]
        self.seen: set[int] = set()
        self.head = self._start(head, "head")
        self.worker = self._start(worker, "worker")

    def _start(self, command: list[str], name: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        proc = subprocess.Popen(command, env=self.env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline:
            if "Ray runtime started" in log.read_text():
                self.seen |= descendants(proc.pid) | {proc.pid}
                return proc
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        self.shutdown()
        raise AssertionError(f"ray start ({name}) did not start: {log.read_text()[-3000:]}")

    def kill_worker(self) -> None:
        """The worker node dies at once: its `ray start` and every process below it."""
        pids = descendants(self.worker.pid) | {self.worker.pid}
        self.seen |= pids
        kill_all(pids)
        self.worker.wait(timeout=30)

    def worker_node_id(self) -> str:
        """The worker node's Ray node id, from its raylet's log."""
        import re

        for log in self.temp_dirs[1].glob("session_2*/logs/raylet.out"):
            m = re.search(r"Node ID: ([0-9a-f]{56})", log.read_text())
            if m:
                return m.group(1)
        raise AssertionError("the worker node's raylet log names no node id")

    def sessions(self) -> list[Path]:
        return sorted(p for d in self.temp_dirs for p in d.glob("session_2*"))

    def shutdown(self) -> None:
        """End every process this cluster started, by pid: the `ray start` processes (they
        stop their node's processes), then whatever of their sessions is left."""
        for proc in (getattr(self, "worker", None), getattr(self, "head", None)):
            if proc is not None and proc.poll() is None:
                self.seen |= descendants(proc.pid)
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and any(
                p is not None and p.poll() is None
                for p in (getattr(self, "worker", None), getattr(self, "head", None))):
            time.sleep(0.5)
        for _ in range(3):
            left = {p for p in self.seen if Path(f"/proc/{p}").exists()}
            for session in self.sessions():
                left |= set(instance_pids(session))
            if not left:
                break
            kill_all(left)
            time.sleep(1)
        for proc in (getattr(self, "worker", None), getattr(self, "head", None)):
            if proc is not None:
                proc.wait(timeout=30)
        for folder in self.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)

    def client(self, args: list[str], *, token: str | None = "cluster", cwd: Path,
               timeout: int = 600) -> subprocess.CompletedProcess:
        """`python -m lfm_ray.cli ARGS` as a client of this cluster; token "cluster" sends
        the cluster's token, None sends none (and finds none in a home of its own)."""
        env = dict(self.env)
        if token is None:
            for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
                env.pop(key, None)
            env["HOME"] = str(cwd)  # no ~/.ray/auth_token there
        elif token != "cluster":
            env["RAY_AUTH_TOKEN"] = token
        return subprocess.run([sys.executable, "-m", "lfm_ray.cli", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.shutdown()


def smoke_study(name: str, tmp: Path, address: str, *extra: str) -> list[str]:
    return ["study", "--name", name, "--dataset", "digits-lt", "--grid", "mix.tau=0.05,0.01",
            "--smoke", "--address", address, "--storage-path", str(tmp / "ray"),
            "--results-dir", str(tmp / "results"), "--no-report",
            "--data.cache_dir", str(tmp / "cache"), *extra]


def test_study_through_address_lands_trials_on_both_nodes(cluster, tmp_path):
    done = cluster.client(smoke_study("two_nodes", tmp_path, cluster.address), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "results" / "two_nodes" / "trials.csv")
    assert len(table) == 2 and (table["status"] == "TERMINATED").all()
    # One CPU per node and one per trial's worker: the two trials ran side by side.
    assert table["node_id"].nunique() == 2


@pytest.mark.parametrize("token,what", [("0" * 32, "a wrong token"), (None, "no token")])
def test_a_client_without_the_token_is_refused_by_name(cluster, tmp_path, token, what):
    done = cluster.client(smoke_study("refused", tmp_path, cluster.address), token=token,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"uses token authentication and refused this client, which sent {what}" in err[0]
    assert "RAY_AUTH_TOKEN=<token>" in err[0] and "ray get-auth-token" in err[0]
    assert not (tmp_path / "ray").exists() and not (tmp_path / "results").exists()


def test_ray_job_submit_runs_a_study_with_the_token(cluster, tmp_path):
    """The documented path: `ray job submit --working-dir . -- python ...` against the head's
    dashboard (job server), the token passed in the environment as for any client."""
    work = tmp_path / "work"
    work.mkdir()
    for part in ("lfm_ray", "studies"):  # what --working-dir . uploads from a checkout
        subprocess.run(["cp", "-r", str(ROOT / part), str(work / part)], check=True)
    out = tmp_path / "out"
    command = [RAY, "job", "submit", "--address", f"http://{LOOPBACK}:{cluster.dashboard_port}",
               "--working-dir", ".", "--", "python", "-m", "lfm_ray.cli", "study", "--name",
               "job", "--dataset", "digits-lt", "--grid", "mix.tau=0.05", "--smoke",
               "--address", "auto",
               "--storage-path", str(out / "ray"), "--results-dir", str(out / "results"),
               "--no-report", "--data.cache_dir", str(tmp_path / "cache")]
    done = subprocess.run(command, cwd=work, env=cluster.env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    table = pd.read_csv(out / "results" / "job" / "trials.csv")
    assert len(table) == 1 and table.loc[0, "status"] == "TERMINATED"
    # Without the token the job server refuses the submission.
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)
    refused = subprocess.run([RAY, "job", "list", "--address",
                              f"http://{LOOPBACK}:{cluster.dashboard_port}"],
                             cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower()


def trial_results(storage: Path, name: str) -> dict[str, list[dict]]:
    """Every reported row of each trial of study `name`, from Tune's result.json files."""
    out = {}
    for path in (storage / name / "tune").glob(f"{name}_*/result.json"):
        out[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines()
                                 if line.strip()]
    return out


def test_a_killed_worker_node_loses_no_trial(cluster, tmp_path):
    """Runs last in the module: it kills the worker node."""
    epochs = 16
    command = [sys.executable, "-m", "lfm_ray.cli",
               *smoke_study("survive", tmp_path, cluster.address, "--stage1.epochs",
                            str(epochs - 2), "--stage2.epochs", "2")]
    log = tmp_path / "study.log"  # a file, not a pipe nobody reads while waiting
    proc = subprocess.Popen(command, cwd=tmp_path, env=cluster.env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    try:
        # Wait until a trial has reported (and checkpointed) an epoch from the worker node
        # and is not finished, then kill the node.
        worker = cluster.worker_node_id()
        deadline = time.time() + 400
        killed = False
        while time.time() < deadline and proc.poll() is None:
            runs = trial_results(tmp_path / "ray", "survive")
            if any(rows and rows[-1]["node_id"] == worker and rows[-1]["epoch"] < epochs - 1
                   for rows in runs.values()):
                cluster.kill_worker()
                killed = True
                break
            time.sleep(0.1)
        assert killed, "no trial ran on the worker node before the deadline"
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]
    table = pd.read_csv(tmp_path / "results" / "survive" / "trials.csv")
    assert len(table) == 2 and (table["status"] == "TERMINATED").all(), table.to_string()
    assert (table["epoch"] == epochs).all()
    runs = trial_results(tmp_path / "ray", "survive")
    for rows in runs.values():  # every epoch of every trial reported, none lost
        assert {r["epoch"] for r in rows} == set(range(1, epochs + 1))
    moved = [rows for rows in runs.values() if len({r["node_id"] for r in rows}) > 1]
    assert moved, "no trial was retried on the surviving node"
    for rows in moved:  # retried from its last checkpoint, not from the first epoch
        after = next(r for r in rows if r["node_id"] != rows[0]["node_id"])
        assert after["epoch"] > 1
