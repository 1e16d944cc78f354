"""Run the file-processing example end to end and check that every session stayed on one worker.

    python examples/fileprocessing/demo.py [--files 6] [--keep]

It starts a small HTTP file server on 127.0.0.1 (the "internet"), two real
``celery worker`` processes (``-n w1@%h`` and ``-n w2@%h``, ``--max-sessions 2``)
and processes every file in its own session, all sessions at once. With no
``FILEPROC_*`` variables set everything is embedded in a fresh temporary folder:
no Redis, RabbitMQ or PostgreSQL needed (see fileproc.py for the variables).
Workers are always stopped, also on errors and Ctrl-C. Exit status 0 means every
check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKERS = ("w1", "w2")
MAX_SESSIONS = 2
RESULT_TIMEOUT = 60  # seconds one step may take before the demo calls it hung


class FileServer(http.server.ThreadingHTTPServer):
    """Serves generated input files (GET /inputs/NAME) and takes uploads (PUT /uploads/NAME)."""

    def __init__(self, inputs: dict[str, bytes], upload_dir: Path) -> None:
        self.inputs = inputs
        self.upload_dir = upload_dir
        upload_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(("127.0.0.1", 0), _Handler)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{path}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:
        data = self.server.inputs.get(self.path.removeprefix("/inputs/"))
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        name = self.path.removeprefix("/uploads/")
        if not self.path.startswith("/uploads/") or "/" in name or name.startswith("."):
            self.send_error(400)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        (self.server.upload_dir / name).write_bytes(body)
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # keep the demo output readable
        pass


@dataclass
class Worker:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while " ready." not in self.log.read_text(errors="replace"):
            if self.popen.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} not ready in {timeout} s:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Ask for a warm shutdown (SIGTERM): running tasks finish, then the worker exits."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = 30) -> None:
        """Wait for the exit; the whole process group is killed if the shutdown hangs."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"worker {self.name} did not stop in {timeout} s; killing it", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):  # pool processes left behind, if any
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start_worker(name: str, data: Path) -> Worker:
    log = data / f"worker-{name}.log"
    cmd = [
        sys.executable, "-m", "celery", "-A", "fileproc", "worker",
        "-n", f"{name}@%h", "-P", "prefork", "-c", "2",
        "--max-sessions", str(MAX_SESSIONS), "--loglevel", "INFO",
        # Worker-to-worker events are not needed here and only slow the start down.
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    with log.open("wb") as out:
        popen = subprocess.Popen(
            cmd, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Worker(name, popen, log)


@dataclass
class Outcome:
    """What happened to one file."""

    name: str
    session_id: str = ""
    hostname: str = ""
    opened: float = 0.0
    closed: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def process_file(name: str, server: FileServer, outcome: Outcome) -> None:
    """One file, one session: download, process and upload on the session's worker."""
    from celery import chain
    from fileproc import download, flow, process, upload

    try:
        with flow.create_session(creation_timeout=60, execution_timeout=300) as s:
            outcome.session_id = s.id
            record = s.apply_async(download, args=(server.url(f"inputs/{name}"), name)).get(
                timeout=RESULT_TIMEOUT
            )
            outcome.record = s.apply_async(
                chain(process.s(record), upload.s(server.url(f"uploads/{name}")))
            ).get(timeout=RESULT_TIMEOUT)
        info = s.info
        outcome.hostname = info.hostname
        outcome.opened = info.opened_at.timestamp() if info.opened_at else 0.0
        outcome.closed = info.closed_at.timestamp() if info.closed_at else 0.0
    except Exception as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"


def check(outcome: Outcome, server: FileServer) -> list[str]:
    """Problems with one file: every step on the session's worker, local files, content."""
    from fileproc import local_disk

    if outcome.error:
        return [outcome.error]
    problems = []
    steps = {step["step"]: step for step in outcome.record.get("steps", [])}
    if list(steps) != ["download", "process", "upload"]:
        return [f"steps ran: {list(steps)}"]
    for step in steps.values():
        if step["worker"] != outcome.hostname:
            problems.append(f"{step['step']} ran on {step['worker']}, not {outcome.hostname}")
        if step["session"] != outcome.session_id:
            problems.append(f"{step['step']} saw session {step['session']}")
    disk = local_disk(outcome.hostname)
    for step in ("process", "upload"):
        if Path(steps[step]["found"]).parent != disk:
            problems.append(f"{step} read {steps[step]['found']}, not a file on {disk}")
    uploaded = server.upload_dir / outcome.name
    if not uploaded.exists() or uploaded.read_bytes() != server.inputs[outcome.name].upper():
        problems.append("the uploaded file is missing or wrong")
    return problems


def most_at_once(outcomes: list[Outcome], hostname: str) -> int:
    """The most sessions that were open on ``hostname`` at the same time."""
    edges = sorted(
        (t, d)
        for o in outcomes
        if o.hostname == hostname
        for t, d in ((o.opened, 1), (o.closed, -1))
    )
    peak = count = 0
    for _, delta in edges:
        count += delta
        peak = max(peak, count)
    return peak


def close_open_sessions(nodenames: list[str], why: str) -> None:
    """Complete the sessions still open on these workers."""
    from fileproc import flow

    for nodename in nodenames:
        for session in flow.list_sessions(state="open", hostname=nodename):
            print(f"closing session {session.id} on {nodename}: {why}")
            session.complete()


def run(files: int, data: Path) -> int:
    external_store = bool(os.environ.get("FILEPROC_DATABASE_URL"))
    if external_store and not os.environ["FILEPROC_DATABASE_URL"].startswith("sqlite"):
        sessionflow_cli = Path(sys.executable).with_name("sessionflow")
        url = os.environ["FILEPROC_DATABASE_URL"]
        subprocess.run([str(sessionflow_cli), "db", "upgrade", "--url", url], check=True)
    sys.path.insert(0, str(HERE))
    import fileproc

    print(f"broker   {fileproc.app.conf.broker_url}")
    print(f"results  {fileproc.app.conf.result_backend}")
    print(f"store    {fileproc.flow.config.database_url}")
    nodenames = [f"{name}@{socket.gethostname()}" for name in WORKERS]
    close_open_sessions(nodenames, "left open by an interrupted earlier run")

    inputs = {
        f"file-{i:02d}.txt": f"file {i}: the quick brown fox jumps over the lazy dog\n".encode()
        * (20 * i)
        for i in range(1, files + 1)
    }
    server = FileServer(inputs, data / "uploaded")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    workers: list[Worker] = []
    started = time.monotonic()
    try:
        workers = [start_worker(name, data) for name in WORKERS]
        for worker in workers:
            worker.ready()
        print(
            f"workers  {', '.join(nodenames)} ready in {time.monotonic() - started:.1f} s "
            f"(--max-sessions {MAX_SESSIONS} each); files served at {server.url('inputs/')}"
        )
        print(f"\n{files} files, one session each, all at once:")
        began = time.monotonic()
        outcomes = [Outcome(name) for name in inputs]
        threads = [
            threading.Thread(target=process_file, args=(o.name, server, o), daemon=True)
            for o in outcomes
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():  # join in slices so Ctrl-C is noticed
                thread.join(0.2)
        elapsed = time.monotonic() - began

        failures = 0
        for o in outcomes:
            problems = check(o, server)
            failures += bool(problems)
            steps = {step["step"]: step["worker"] for step in o.record.get("steps", [])}
            done = "  ".join(f"{s}: {steps.get(s, '-')}" for s in ("download", "process", "upload"))
            verdict = "FAILED: " + "; ".join(problems) if problems else "ok, one worker"
            print(f"  {o.name}  session {o.session_id[:8] or '-':8}  {done}  [{verdict}]")

        used = sorted({o.hostname for o in outcomes if o.hostname})
        print()
        for hostname in used:
            count = sum(o.hostname == hostname for o in outcomes)
            peak = most_at_once(outcomes, hostname)
            print(f"{hostname}: {count} sessions, at most {peak} open at once (cap {MAX_SESSIONS})")
            if peak > MAX_SESSIONS:
                print(f"FAILED: {hostname} ran more than {MAX_SESSIONS} sessions at once")
                failures += 1
        if files > MAX_SESSIONS and len(used) < len(WORKERS):
            print(f"FAILED: only {used} took sessions; expected all of {nodenames}")
            failures += 1
        if failures:
            print(f"\nFAILED: {failures} problem(s). Worker logs:")
            for worker in workers:
                print(f"--- {worker.name} ---\n{worker.tail()}")
            return 1
        print(
            f"\nOK: {files} files in {files} sessions over {len(used)} workers in {elapsed:.1f} s; "
            "each session's download, process and upload ran on one worker"
        )
        return 0
    finally:
        # Sessions still open (Ctrl-C mid-run) are completed; workers always stop.
        with contextlib.suppress(Exception):
            close_open_sessions(nodenames, "the demo is stopping")
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.wait_stopped()
        server.shutdown()
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=6, help="how many files (default 6)")
    parser.add_argument("--keep", action="store_true", help="keep the data folder (logs, store)")
    args = parser.parse_args(argv)
    if args.files < 1:
        parser.error("--files must be at least 1")
    own_data = not os.environ.get("FILEPROC_DATA")
    data = Path(os.environ.get("FILEPROC_DATA") or tempfile.mkdtemp(prefix="sessionflow-demo-"))
    os.environ["FILEPROC_DATA"] = str(data)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up on SIGTERM too
    try:
        return run(args.files, data)
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
