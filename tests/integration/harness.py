"""Start real ``celery worker`` processes on a broker x store combination."""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sessionflow import fsbroker

HERE = Path(__file__).resolve().parent
REDIS_URL = "redis://127.0.0.1:6379"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
PG_ADMIN_URL = "postgresql://127.0.0.1:5432/test"
HOSTNAME = socket.gethostname()
# Secrets every stack uses; no log, repr, error or CLI output may ever show them.
SECRET_KEY = "integration-test-secret-0123456789abcdef"
DB_PASSWORD = "pw-never-shown-7f3a"  # PostgreSQL here trusts local users: it is not checked


@dataclass(frozen=True)
class StackSpec:
    """One broker x result backend x store combination."""

    name: str
    broker: str  # filesystem | redis | amqp
    store: str  # sqlite | postgres

    @property
    def services(self) -> tuple[str, ...]:
        needed = {"redis": ("redis",), "amqp": ("rabbitmq", "redis"), "filesystem": ()}
        return needed[self.broker] + (("postgres",) if self.store == "postgres" else ())


SPECS = {
    spec.name: spec
    for spec in (
        StackSpec("embedded", "filesystem", "sqlite"),
        StackSpec("redis-sqlite", "redis", "sqlite"),
        StackSpec("redis-postgres", "redis", "postgres"),
        StackSpec("rabbitmq-postgres", "amqp", "postgres"),
    )
}


def service_up(service: str) -> bool:
    port = {"redis": 6379, "rabbitmq": 5672, "postgres": 5432}[service]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class WorkerProcess:
    name: str
    nodename: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_start: int = 0  # the log file's size when this process started (it appends)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def own_log(self) -> str:
        """What this process wrote (a restarted worker appends to its predecessor's log)."""
        with self.log_path.open("rb") as log:
            log.seek(self.log_start)
            return log.read().decode(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.killpg(
                self.popen.pid, signum
            ) if signum == signal.SIGKILL else self.popen.send_signal(signum)

    def stop(self, timeout: float = 30) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once (a crashed machine)."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


@dataclass
class Stack:
    """A running combination: client app, store, and worker processes."""

    spec: StackSpec
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    workers: dict[str, WorkerProcess] = field(default_factory=dict)
    _pg_db: str | None = None
    app: Any = None

    def setup(self) -> None:
        run = uuid.uuid4().hex[:8]
        self.root.mkdir(parents=True, exist_ok=True)
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        env = {
            "SF_QUEUE_PREFIX": f"sftest-{run}",
            "SF_DATA_DIR": str(data),
            "SF_SECRET_KEY": SECRET_KEY,
        }
        if self.spec.broker == "filesystem":
            folder = self.root / "broker"
            folder.mkdir(exist_ok=True)
            (self.root / "broker-control").mkdir(exist_ok=True)
            (self.root / "results").mkdir(exist_ok=True)
            env["SF_BROKER_URL"] = "filesystem://"
            env["SF_BROKER_FOLDER"] = str(folder)
            env["SF_RESULT_BACKEND"] = fsbroker.result_backend(self.root / "results")
        elif self.spec.broker == "redis":
            env["SF_BROKER_URL"] = f"{REDIS_URL}/12"
            env["SF_RESULT_BACKEND"] = f"{REDIS_URL}/13"
        else:
            env["SF_BROKER_URL"] = AMQP_URL
            env["SF_RESULT_BACKEND"] = f"{REDIS_URL}/13"
        if self.spec.store == "sqlite":
            env["SF_DATABASE_URL"] = f"sqlite:///{self.root / 'sessionflow.db'}"
        else:
            self._pg_db = f"sftest_{run}"
            _pg_admin(f"CREATE DATABASE {self._pg_db}")
            user = getpass.getuser()
            env["SF_DATABASE_URL"] = (
                f"postgresql+psycopg://{user}:{DB_PASSWORD}@127.0.0.1:5432/{self._pg_db}"
            )
        self.env = env
        from sfapp import create_app

        self.app = create_app(env)
        if self.spec.store == "postgres":
            self.flow.store.upgrade()

    @property
    def flow(self) -> Any:
        from sessionflow import SessionFlow

        return SessionFlow(self.app)

    def worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
        return env

    def start_worker(
        self,
        name: str,
        *,
        max_sessions: int = 2,
        concurrency: int = 2,
        wait: bool = True,
        extra: tuple[str, ...] = (),
        app_module: str = "sfapp",
    ) -> WorkerProcess:
        old = self.workers.get(name)
        if old is not None and old.alive():
            raise RuntimeError(f"worker {name} is already running")
        worker = self.spawn_worker(
            name,
            max_sessions=max_sessions,
            concurrency=concurrency,
            extra=extra,
            app_module=app_module,
        )
        self.workers[name] = worker
        if wait:
            self.wait_ready(worker)
        return worker

    def spawn_worker(
        self,
        name: str,
        *,
        max_sessions: int = 2,
        concurrency: int = 2,
        extra: tuple[str, ...] = (),
        log_name: str | None = None,
        env: dict[str, str] | None = None,
        app_module: str = "sfapp",  # a module on the workers' path (HERE or the stack root)
    ) -> WorkerProcess:
        """Start ``celery worker -n NAME@%h`` without registering it (for misuse tests)."""
        log_path = self.root / f"worker-{log_name or name}.log"
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app_module,
            "worker",
            "-n",
            f"{name}@%h",
            "-P",
            "prefork",
            "-c",
            str(concurrency),
            "--max-sessions",
            str(max_sessions),
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *extra,
        ]
        log_start = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                cmd,
                cwd=self.root,
                env={**self.worker_env(), **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return WorkerProcess(name, f"{name}@{HOSTNAME}", popen, log_path, log_start)

    def wait_ready(self, worker: WorkerProcess, timeout: float = 90) -> None:
        started = time.time()

        def ready() -> bool:
            if not worker.alive():
                raise AssertionError(f"worker {worker.name} exited:\n{worker.log()[-3000:]}")
            return "ready." in worker.own_log()

        try:
            wait_until(ready, timeout, f"worker {worker.name} to be ready", interval=0.1)
        except AssertionError:
            raise AssertionError(
                f"worker {worker.name} not ready after {time.time() - started:.0f} s:\n"
                f"{worker.log()[-3000:]}"
            ) from None

    def run_client(self, code: str, timeout: float = 60) -> str:
        """Run Python ``code`` in a fresh process with this stack's app as ``app``."""
        prelude = "import os\nfrom sfapp import create_app\napp = create_app(os.environ)\n"
        done = subprocess.run(
            [sys.executable, "-c", prelude + code],
            cwd=self.root,
            env=self.worker_env(),
            capture_output=True,
            timeout=timeout,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"client process failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def worker_of(self, session: Any) -> WorkerProcess:
        """The worker process that holds ``session``."""
        hostname = session.info.hostname
        for worker in self.workers.values():
            if worker.nodename == hostname:
                return worker
        raise AssertionError(f"no worker process is {hostname}")

    def queue_size(self, name: str) -> int:
        """Messages waiting in a broker queue."""
        from amqp.exceptions import ChannelError

        with self.app.connection_for_write() as conn:
            try:
                ok = conn.default_channel.queue_declare(queue=name, passive=True)
            except ChannelError:  # no such queue: nothing waits in it
                return 0
            return int(ok.message_count)

    def close_open_sessions(self) -> None:
        for session in self.flow.list_sessions(state="open"):
            session.complete()

    def leaked_secrets(self) -> list[str]:
        """Files of this stack (worker logs) that show the secret key or the password."""
        found = []
        for path in sorted(self.root.glob("*.log")):
            text = path.read_text(errors="replace")
            found += [f"{path.name}: {name}" for name, secret in SECRETS.items() if secret in text]
        return found

    def teardown(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self._delete_queues()
        if self.app is not None:
            self.flow.close()
            self.app.close()
        if self._pg_db:
            _pg_admin(f"DROP DATABASE IF EXISTS {self._pg_db} WITH (FORCE)")

    def _delete_queues(self) -> None:
        if self.spec.broker != "amqp" or self.app is None:
            return
        names = [self.flow.config.creation_queue] + [
            self.flow.config.worker_queue(w.nodename) for w in self.workers.values()
        ]
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            for name in names:
                try:
                    channel.queue_delete(name)
                except Exception:
                    channel = conn.channel()


SECRETS = {"sessionflow_secret_key": SECRET_KEY, "database password": DB_PASSWORD}


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


# -- service restarts (fault injection) ----------------------------------------

REDIS_START = (
    "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' "
    "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
)


def _sh(command: str, timeout: float = 120) -> None:
    subprocess.run(command, shell=True, check=True, timeout=timeout, capture_output=True)


def _pg_cluster() -> str:
    versions = sorted(os.listdir("/etc/postgresql"))
    return f"{versions[-1]} main"


def restart_broker(broker: str) -> None:
    """Restart the broker service; returns once it accepts connections again."""
    if broker == "redis":
        _sh("redis-cli -p 6379 shutdown nosave || true")
        wait_until(lambda: not service_up("redis"), 20, "redis to stop")
        _sh(REDIS_START)
        wait_until(lambda: service_up("redis"), 30, "redis to start")
    elif broker == "amqp":
        _sh("rabbitmqctl stop_app && rabbitmqctl start_app", timeout=180)
        wait_until(lambda: service_up("rabbitmq"), 60, "rabbitmq to start")
    else:
        raise ValueError(f"cannot restart broker {broker!r}")


def stop_postgres() -> None:
    _sh(f"pg_ctlcluster --skip-systemctl-redirect {_pg_cluster()} stop -m fast")
    wait_until(lambda: not service_up("postgres"), 30, "postgres to stop")


def start_postgres() -> None:
    _sh(f"pg_ctlcluster --skip-systemctl-redirect {_pg_cluster()} start")
    wait_until(lambda: service_up("postgres"), 60, "postgres to start")
