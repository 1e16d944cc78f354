"""The worker processes of :mod:`sessionflow.testing`: a ``Cluster`` (broker, store,
settings) and its ``Worker`` subprocesses, each a real ``celery worker`` (prefork)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What a worker process reads to set its app up as the test's (sessionflow.testing).
ENV_APP = "SESSIONFLOW_TESTING_APP"
ENV_CONF = "SESSIONFLOW_TESTING_CONF"
ENV_DATABASES = "SESSIONFLOW_TESTING_DJANGO_DATABASES"
ENV_DJANGO_STORE = "SESSIONFLOW_TESTING_DJANGO_STORE"
READY_TIMEOUT = 60.0


@dataclass
class Worker:
    """A ``celery worker`` subprocess of the cluster."""

    cluster: Cluster
    name: str
    max_sessions: int
    concurrency: int
    extra: tuple[str, ...] = ()
    popen: subprocess.Popen[bytes] | None = None

    @property
    def nodename(self) -> str:
        return f"{self.name}@{socket.gethostname()}"

    @property
    def log_path(self) -> Path:
        return self.cluster.folder / f"worker-{self.name}.log"

    def log(self) -> str:
        """Everything the worker printed (all its starts)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self, wait: bool = True) -> Worker:
        """Start the worker process (again); wait until it takes tasks."""
        if self.alive():
            raise RuntimeError(f"worker {self.nodename} is already running")
        offset = len(self.log())
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "sessionflow.testing:worker_app",
            "worker",
            "-n",
            f"{self.name}@%h",
            "-P",
            "prefork",
            "-c",
            str(self.concurrency),
            "--max-sessions",
            str(self.max_sessions),
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *self.extra,
        ]
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                cmd,
                cwd=self.cluster.cwd,
                env=self.cluster.worker_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self._wait_ready(offset)
        return self

    def _wait_ready(self, offset: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while "ready." not in self.log()[offset:]:
            if not self.alive():
                raise RuntimeError(f"worker {self.nodename} exited:\n{self.log()[offset:][-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"worker {self.nodename} not ready after {READY_TIMEOUT:.0f} s:\n"
                    f"{self.log()[offset:][-4000:]}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (SIGTERM): running tasks finish, its sessions fail."""
        if self.popen is None or not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the worker with its pool processes (a crashed machine)."""
        if self.popen is not None and self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def restart(self) -> Worker:
        """Stop it warmly and start it again under the same node name."""
        self.stop()
        return self.start()


@dataclass
class Cluster:
    """The broker, store and workers that one test session shares."""

    app_path: str
    folder: Path
    conf: dict[str, Any]
    databases: dict[str, str] = field(default_factory=dict)
    django_store: bool = False
    cwd: Path = field(default_factory=Path.cwd)
    workers: dict[str, Worker] = field(default_factory=dict)

    def worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[ENV_APP] = self.app_path
        env[ENV_CONF] = json.dumps(self.conf)
        if self.databases:
            env[ENV_DATABASES] = json.dumps(self.databases)
        if self.django_store:
            env[ENV_DJANGO_STORE] = "1"
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(self.cwd), *paths]))
        return env

    def start_worker(
        self,
        name: str = "w1",
        *,
        max_sessions: int = 4,
        concurrency: int = 2,
        extra: tuple[str, ...] = (),
        wait: bool = True,
    ) -> Worker:
        """Start ``celery worker -n NAME@%h`` for the app (``--max-sessions``, ``-c``)."""
        worker = self.workers.get(name)
        if worker is None:
            worker = Worker(self, name, max_sessions, concurrency, tuple(extra))
            self.workers[name] = worker
        return worker.start(wait=wait)

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()


__all__ = ["Cluster", "Worker"]
