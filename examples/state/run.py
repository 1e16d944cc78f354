"""Run the session-state examples against a real worker and check what they print.

    python examples/state/run.py [workflow|fanout|all] [--keep]

``workflow``: three tasks share memory through the session state: step 1 stores the
user record, step 2 reads it and stores the orders, step 3 builds a report from both.
``fanout``: a chord of parallel branches; each branch reads the state as dispatched and
writes its own copy; the copies merge in member order before the chord body starts.

It starts one ``celery -A stateapp worker`` process (embedded broker, results and
SQLite in a temporary folder unless ``STATE_EXAMPLE_*`` variables say otherwise; see
stateapp.py) and always stops it. Exit status 0 means every check passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMEOUT = 60


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "stateapp",
        "worker",
        "-n",
        "state1@%h",
        "-c",
        "2",
        "--max-sessions",
        "2",
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    with log.open("ab") as out:
        worker = subprocess.Popen(
            cmd, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 90
    while "ready." not in log.read_text(errors="replace"):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    return worker


def workflow() -> None:
    from celery import chain
    from stateapp import app, build_report, fetch_orders, fetch_user

    from sessionflow import SessionFlow

    flow = SessionFlow(app)
    with flow.create_session(creation_timeout=30, execution_timeout=300, user_id="ada") as s:
        s.state["customer_id"] = 42
        steps = chain(fetch_user.si(), fetch_orders.si(), build_report.si())
        report = s.apply_async(steps).get(timeout=TIMEOUT)
        print(f"workflow: {report}")
        print(f"  state keys: {s.state.keys()}")
        for run in s.history():
            print(f"  ran {run.name} on {run.worker}: {run.state}")
        assert report == "Ada Lovelace (gold): 2 orders, 155.50 total", report
        assert s.state["report"] == report and s.state["user:visits"] >= 1
        # Runs are written in batches: the last one appears up to sessionflow_flush_interval
        # (0.1 s) after its task ended; give a busy machine a few seconds.
        deadline = time.monotonic() + 10
        while len(s.history()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [r.name for r in s.history()] == [
            "stateapp.fetch_user",
            "stateapp.fetch_orders",
            "stateapp.build_report",
        ]


def fanout() -> None:
    from celery import chord
    from stateapp import analyse, app, summarise

    from sessionflow import SessionFlow

    docs = ["the quick brown fox", "jumps over", "the extraordinarily lazy dog", "end"]
    flow = SessionFlow(app)
    with flow.create_session(
        creation_timeout=30, execution_timeout=300, reducers={"longest_word": "longest"}
    ) as s:
        s.state.update({"words": 100, "prefix": "v1"})
        canvas = chord((analyse.s(i, text) for i, text in enumerate(docs)), summarise.s())
        result = s.apply_async(canvas)
        s.state["prefix"] = "v2"  # after dispatch: the branches still read "v1"
        summary = result.get(timeout=TIMEOUT)
        merged = s.state.to_dict()
        print(f"fanout: chord body saw {summary}")
        print(f"  merged state: {merged}")
        assert summary == {"counts": [4, 2, 4, 1], "words": 111, "seen": [0, 1, 2, 3]}, summary
        assert merged["longest_word"] == "extraordinarily"
        assert all(merged[f"doc{i}"]["prefix"] == "v1" for i in range(len(docs)))
        assert merged["prefix"] == "v2"


def main() -> int:
    parser = argparse.ArgumentParser(description="session-state examples")
    parser.add_argument("which", nargs="?", choices=("workflow", "fanout", "all"), default="all")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="sessionflow-state-"))
    os.environ.setdefault("STATE_EXAMPLE_DIR", str(folder))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    sys.path.insert(0, str(HERE))
    worker = start_worker(env, folder / "worker.log")
    try:
        if args.which in ("workflow", "all"):
            workflow()
        if args.which in ("fanout", "all"):
            fanout()
        print("OK")
        return 0
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"files kept in {folder}")


if __name__ == "__main__":
    sys.exit(main())
