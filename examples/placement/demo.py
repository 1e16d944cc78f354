"""Run the placement example: a GPU worker and a CPU worker, sessions that ask for either.

    python examples/placement/demo.py [--keep]

It starts two real ``celery worker`` processes::

    gpu@%h  --session-resources gpu=1 --session-labels zone=eu,vram_gb=24
            --session-task-limits placeapp.render=1
    cpu@%h  --session-resources cpu=4 --session-labels zone=us

then creates sessions with ``requires``, ``constraints``, ``prefer`` and
``placement``, runs a task in each and prints where it ran; shows a request that
waits for a busy GPU (and times out, naming what is short) and one that no worker
could ever take (it fails at once, saying why); then stops the workers. With no
``PLACEMENT_*`` variables everything is embedded in a fresh temporary folder: no
Redis, RabbitMQ or PostgreSQL needed (see placeapp.py). Exit status 0 means every
check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HOST = socket.gethostname()
MAX_SESSIONS = 6
WORKERS = {
    "gpu": [
        *("--session-resources", "gpu=1"),
        *("--session-labels", "zone=eu,vram_gb=24"),
        *("--session-task-limits", "placeapp.render=1"),
    ],
    "cpu": [*("--session-resources", "cpu=4"), *("--session-labels", "zone=us")],
}
OPTIONS = {"creation_timeout": 30, "execution_timeout": 300}
RESULT_TIMEOUT = 60

# (name, what the session asks for, the worker it must land on), in this order: each
# session stays open until the end, so the later ones see the earlier ones' load.
PLACEMENTS: list[tuple[str, dict[str, Any], str]] = [
    ("render", {"requires": {"gpu": 1}}, "gpu"),
    ("scrape", {"requires": {"cpu": 2}}, "cpu"),
    ("big-vram", {"constraints": {"vram_gb": (">=", 16)}}, "gpu"),
    ("in-us", {"constraints": {"zone": ("in", ["us", "ap"])}}, "cpu"),
    # Both workers qualify and are equally loaded (2 open each): the preference decides.
    ("likes-eu", {"prefer": [(10, {"zone": "eu"})]}, "gpu"),
    # Both qualify; gpu@ now has 3 open, cpu@ 2: pack takes the fuller, spread the emptier.
    ("packed", {"constraints": {"zone": ("in", ["eu", "us"])}, "placement": "pack"}, "gpu"),
    ("spread", {"constraints": {"zone": ("in", ["eu", "us"])}, "placement": "spread"}, "cpu"),
]


@dataclass
class Worker:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def nodename(self) -> str:
        return f"{self.name}@{HOST}"

    def ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while " ready." not in self.log.read_text(errors="replace"):
            if self.popen.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} not ready in {timeout} s:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)  # warm shutdown

    def wait_stopped(self, timeout: float = 30) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError):  # pool processes left behind, if any
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start_worker(name: str, data: Path) -> Worker:
    log = data / f"worker-{name}.log"
    cmd = [
        sys.executable, "-m", "celery", "-A", "placeapp", "worker", "-n", f"{name}@%h",
        "-P", "prefork", "-c", "2", "--max-sessions", str(MAX_SESSIONS), *WORKERS[name],
        "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    with log.open("wb") as out:
        popen = subprocess.Popen(
            cmd, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Worker(name, popen, log)


def wait_in_store(flow: Any, nodenames: set[str], timeout: float = 30) -> None:
    """Placement reads the live workers from the store: wait until both are there."""
    deadline = time.monotonic() + timeout
    while {w.nodename for w in flow.store.workers() if w.resources} < nodenames:
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers {sorted(nodenames)} not in the store after {timeout} s")
        time.sleep(0.1)


def shown(ask: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in ask.items())


def run(data: Path) -> int:
    sys.path.insert(0, str(HERE))
    from placeapp import app, flow, render, scrape

    from sessionflow import SessionCreationTimeout, SessionUnplaceable

    print(f"broker   {app.conf.broker_url}")
    print(f"store    {flow.config.database_url}")
    workers: list[Worker] = []
    sessions: list[Any] = []
    failures: list[str] = []
    try:
        started = time.monotonic()
        workers = [start_worker(name, data) for name in WORKERS]
        for worker in workers:
            worker.ready()
        wait_in_store(flow, {w.nodename for w in workers})
        print(f"workers  ready in {time.monotonic() - started:.1f} s:")
        for worker in workers:
            print(f"  {worker.nodename:<{len(HOST) + 5}} {' '.join(WORKERS[worker.name])}")

        print("\nsessions (each stays open, so later ones see the load):")
        placed: dict[str, Any] = {}
        width = max(len(shown(ask)) for _, ask, _ in PLACEMENTS)
        for name, ask, expected in PLACEMENTS:
            session = flow.create_session(**OPTIONS, **ask)
            sessions.append(session)
            placed[name] = session
            task = render if "gpu" in ask.get("requires", {}) else scrape
            ran = session.apply_async(task, args=(2,)).get(timeout=RESULT_TIMEOUT)["worker"]
            host = session.info.hostname
            print(f"  {name:<9} {shown(ask):<{width}} -> {host}  task ran on {ran}")
            if host != f"{expected}@{HOST}" or ran != host:
                failures.append(f"{name}: expected {expected}@{HOST}, opened on {host}, ran {ran}")

        print("\nper-task-type limit: 2 renders in each of 2 sessions on gpu@ (limit 1 at once)")
        runs = [
            placed[name].apply_async(render, args=(2,))
            for name in ("render", "big-vram")
            for _ in range(2)
        ]
        timeline = sorted((r.get(timeout=RESULT_TIMEOUT) for r in runs), key=lambda r: r["started"])
        overlaps = sum(b["started"] < a["finished"] - 0.01 for a, b in itertools.pairwise(timeline))
        hosts = sorted({r["worker"] for r in timeline})
        print(f"  {len(timeline)} renders on {', '.join(hosts)}, {overlaps} overlapping")
        if overlaps:
            failures.append(f"{overlaps} renders ran at once on gpu@ (limit 1)")

        print("\nbusy: a second gpu session while the only gpu is held (creation_timeout=1):")
        began = time.monotonic()
        try:
            extra = flow.create_session(
                creation_timeout=1, execution_timeout=60, requires={"gpu": 1}
            )
            sessions.append(extra)
            failures.append(f"a second gpu session opened on {extra.info.hostname}")
        except SessionCreationTimeout as exc:
            print(f"  SessionCreationTimeout after {time.monotonic() - began:.1f} s: {exc}")

        print("\nunplaceable: no live worker could ever take these (creation_timeout=30):")
        for ask in ({"requires": {"gpu": 2}}, {"constraints": {"zone": "ap"}}):
            began = time.monotonic()
            try:
                extra = flow.create_session(**OPTIONS, **ask)
                sessions.append(extra)
                failures.append(f"{shown(ask)} opened on {extra.info.hostname}")
            except SessionUnplaceable as exc:
                took = time.monotonic() - began
                print(f"  {shown(ask)}: SessionUnplaceable after {took:.2f} s: {exc}")
                if took > 5:
                    failures.append(f"{shown(ask)} took {took:.1f} s to fail")

        if failures:
            print("\nFAILED:\n  " + "\n  ".join(failures))
            for worker in workers:
                print(f"--- {worker.nodename} ---\n{worker.tail()}")
            return 1
        on = {w.nodename: sum(s.info.hostname == w.nodename for s in sessions) for w in workers}
        print(
            f"\nOK: {len(sessions)} sessions placed as asked "
            f"({', '.join(f'{n} on {name}' for name, n in on.items())}); "
            "the unplaceable requests failed at once"
        )
        return 0
    finally:
        for session in sessions:
            with contextlib.suppress(Exception):
                session.complete()
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.wait_stopped()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the data folder (logs, store)")
    args = parser.parse_args(argv)
    own_data = not os.environ.get("PLACEMENT_DATA")
    data = Path(os.environ.get("PLACEMENT_DATA") or tempfile.mkdtemp(prefix="sessionflow-place-"))
    os.environ["PLACEMENT_DATA"] = str(data)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up on SIGTERM too
    try:
        return run(data)
    except KeyboardInterrupt:
        print("\ninterrupted; workers stopped", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"data kept in {data}")
        elif own_data:
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
