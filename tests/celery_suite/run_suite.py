"""Run a subset of Celery's own integration tests as shipped and with ``SessionFlow(app)``.

    .venv/bin/python tests/celery_suite/run_suite.py [--json FILE] [--keep] [NODEID ...]

Fetches the sdist of the installed Celery with pip (cached in ``.cache/celery-suite/``,
or ``$SF_SUITE_CACHE``), extracts ``t/integration``, and runs ``SUBSET`` twice in
pytest subprocesses with Celery's embedded prefork worker on Redis (broker database
10, backend 11): once as shipped, once with ``sessionflow_attach`` attaching
``SessionFlow(app)`` to every app the suite creates. None of these tasks runs in a
session, so every per-test outcome must be the same.

Tests whose outcomes differ run once more in both modes: a difference that shows again
fails the comparison; one that does not is printed as not reproduced. Then one more
attached run checks that the keys without expiry in the two databases do not grow.
A ``PYTHONPATH`` set by the caller comes first in the subprocesses, so another copy
of sessionflow can be put under test.

Exit status: 0 same outcomes; 1 outcomes differ or Redis keys grew; 2 the comparison
could not be made (a run crashed, a selected test no longer exists); 3 the sdist or
the suite's requirements cannot be fetched; 4 Redis is not reachable.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = Path(os.environ.get("SF_SUITE_CACHE") or ROOT / ".cache" / "celery-suite")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
BROKER_DB, BACKEND_DB = 10, 11  # the project's own tests use 12 and 13
RUN_TIMEOUT = 300.0  # seconds for one pytest subprocess (about 70 s for SUBSET)
TEST_TIMEOUT = 60  # seconds per test, unless Celery's own timeout marker says otherwise
# One run at a time on these databases: another engineer's run would mix in.
LOCK, LOCK_TTL, LOCK_WAIT = "sessionflow-celery-suite-lock", 2 * RUN_TIMEOUT, 300.0

EXIT_DIFFERENT, EXIT_BROKEN, EXIT_FETCH, EXIT_NO_REDIS = 1, 2, 3, 4

T = "t/integration/"
TASKS, CANVAS, INSPECT = f"{T}test_tasks.py::", f"{T}test_canvas.py::", f"{T}test_inspect.py::"
# Retries, task options, events, replacement (test_tasks); chains, groups, chords,
# links, stamping (test_canvas); remote control (test_inspect). Each takes about a
# second (most of it the `manager` fixture's one-second inspect at teardown).
# Left out: tests that take 5 s or more (countdowns, eta, sleeping tasks: test_retry,
# test_expired, test_revoked, test_active, test_query_task, most chord errbacks);
# tests that read PUBSUB CHANNELS, which are server-wide, not per database, so any
# other Redis user of the machine changes the answer (test_task_redis_result_backend's
# *subscription* tests, test_chord::test_redis_subscribed_channels_leak); tests that
# fail as shipped here, every time (test_trace_log_arguments: caplog sees no records
# of the embedded worker; test_chord::test_chord_on_error: assert [] == [3, 7]).
# None of SUBSET failed as shipped in the runs made while choosing it.
SUBSET: tuple[str, ...] = (
    f"{TASKS}test_class_based_tasks::test_class_based_task_retried",
    f"{TASKS}test_tasks::test_simple_call",
    f"{TASKS}test_tasks::test_basic_task",
    f"{TASKS}test_tasks::test_task_sent_event_respects_publish_retry_limit",
    f"{TASKS}test_tasks::test_pydantic_annotations",
    f"{TASKS}test_tasks::test_fail",
    f"{TASKS}test_tasks::test_wrong_arguments",
    f"{TASKS}test_tasks::test_retry_switches_from_kwargs_to_args",
    f"{TASKS}test_tasks::test_retry_switches_from_args_to_kwargs",
    f"{TASKS}test_tasks::test_retry_with_unpickleable_exception",
    f"{TASKS}test_tasks::test_task_retried_once",
    f"{TASKS}test_tasks::test_task_retried_headers",
    f"{TASKS}test_tasks::test_properties",
    f"{TASKS}test_tasks::test_apply_async_time_limits_override_task_declaration",
    f"{TASKS}test_apply_tasks::test_apply_nested_parent_child_relationship",
    f"{TASKS}test_task_redis_result_backend::test_retry_preserves_ignore_result_true",
    f"{TASKS}test_task_replacement::test_replaced_task_nesting_chain",
    f"{CANVAS}test_link_error::test_link_error_using_signature",
    f"{CANVAS}test_chain::test_simple_chain",
    f"{CANVAS}test_chain::test_complex_chain",
    f"{CANVAS}test_chain::test_chain_on_error",
    f"{CANVAS}test_chain::test_second_order_replace",
    f"{CANVAS}test_chain::test_chain_of_task_a_group_and_a_chord",
    f"{CANVAS}test_chain::test_header_failure_fails_the_chords_after_it[1]",
    f"{CANVAS}test_chain::test_upgrade_to_chord_inside_chains",
    f"{CANVAS}test_group::test_ready_with_exception",
    f"{CANVAS}test_group::test_group_lone",
    f"{CANVAS}test_group::test_nested_group_chord_counting_chord",
    f"{CANVAS}test_chord::test_chord_order",
    f"{CANVAS}test_chord::test_add_to_chord",
    f"{CANVAS}test_chord::test_nested_chord",
    f"{CANVAS}test_chord::test_parent_ids",
    f"{CANVAS}test_chord::test_priority",
    f"{CANVAS}test_chord::test_error_propagates_to_chord_from_chain",
    f"{CANVAS}test_chord::test_chord_body_chain_child_replaced_with_chain_last",
    f"{CANVAS}test_xmap_xstarmap::test_starmap_in_a_group_and_a_chain",
    f"{CANVAS}test_stamping_mechanism::test_stamps_remain_on_task_retry",
    f"{INSPECT}test_Inspect::test_ping",
    f"{INSPECT}test_Inspect::test_registered",
    f"{INSPECT}test_Inspect::test_active_queues",
    f"{INSPECT}test_Inspect::test_stats",
    f"{INSPECT}test_Inspect::test_hello_stamps_received_revoked_ids_locally",
    f"{INSPECT}test_Inspect::test_conf",
)
PROBE = f"{INSPECT}test_Inspect::test_ping"  # a short run that starts and stops a worker

# Differences that are the extension's documented behaviour, not a change to any task:
# nodeid -> (outcome as shipped, outcome attached, why). Printed on every run.
EXPECTED_DIFFERENCES: dict[str, tuple[str, str, str]] = {
    f"{INSPECT}test_Inspect::test_active_queues": (
        "passed",
        "failed",
        "the test asserts the worker consumes only 'celery'; SessionFlow's worker also "
        "consumes its session queue <prefix>.worker.<node name> (README, How it works)",
    ),
}

# Applied to the extracted suite for both runs alike; each must match exactly once.
PATCHES: tuple[tuple[str, str, str], ...] = (
    (
        # Celery's raw Redis helper (canvas side channels) uses database 0; keep it in ours.
        "t/integration/tasks.py",
        "return StrictRedis(host=host, port=port, socket_timeout=None)",
        "return StrictRedis(host=host, port=port, socket_timeout=None,\n"
        "                       db=int(os.environ.get('REDIS_DB', 0)))",
    ),
    (
        # The autouse fixture fails every test whose apps have a queue other than
        # 'celery'. SessionFlow's worker adds exactly one, its session queue: allow
        # that one (only in the attached run, where sessionflow is imported).
        "t/integration/conftest.py",
        "        configured = set(test_app.amqp.queues)\n",
        "        configured = set(test_app.amqp.queues) - _sessionflow_queues(test_app)\n",
    ),
    (
        "t/integration/conftest.py",
        "@pytest.fixture(scope='session')\ndef celery_config(request):",
        "def _sessionflow_queues(app):\n"
        "    # Added by sessionflow's tests/celery_suite/run_suite.py.\n"
        "    import sys\n"
        "    flow_module = sys.modules.get('sessionflow.flow')\n"
        "    flow = flow_module.SessionFlow.of(app) if flow_module else None\n"
        "    if flow is None or flow.worker_nodename is None:\n"
        "        return set()\n"
        "    return {flow.config.worker_queue(flow.worker_nodename)}\n"
        "\n\n"
        "@pytest.fixture(scope='session')\ndef celery_config(request):",
    ),
)


@dataclass(frozen=True)
class Suite:
    """Celery's extracted tests, and the directory with their extra requirements."""

    path: Path
    site: Path


class SuiteError(Exception):
    """The comparison cannot be made; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_BROKEN) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Run:
    """One pytest subprocess over some node ids in one mode."""

    mode: str  # "shipped" or "attached"
    outcomes: dict[str, str]
    details: dict[str, str]
    seconds: float
    log: Path
    attach: dict[str, Any] = field(default_factory=dict)

    def outcome(self, nodeid: str) -> str:
        return self.outcomes.get(nodeid, "missing")

    def summary(self) -> str:
        counts = Counter(self.outcomes.values())
        parts = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
        return f"{self.mode:8s} {len(self.outcomes):3d} tests in {self.seconds:5.1f} s: {parts}"


# -- fetching ----------------------------------------------------------------------


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def fetch_sdist(version: str) -> Path:
    """The cached sdist of celery ``version``; downloaded with pip when missing."""
    target = CACHE / "sdist"
    found = sorted(target.glob(f"celery-{version}.tar.gz"))
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    done = pip(
        "download", f"celery=={version}", "--no-deps", "--no-binary", ":all:", "-d", str(target)
    )
    found = sorted(target.glob(f"celery-{version}.tar.gz"))
    if done.returncode != 0 or not found:
        raise SuiteError(
            f"pip could not download the sdist of celery {version}:\n{done.stdout}{done.stderr}",
            EXIT_FETCH,
        )
    return found[0]


def install_requirements(sdist: Path, version: str) -> Path:
    """A cached ``--target`` directory with what the suite imports beyond the venv (pydantic)."""
    site = CACHE / f"site-celery-{version}-py{sys.version_info[0]}{sys.version_info[1]}"
    marker = site / ".complete"
    if marker.exists():
        return site
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(f"celery-{version}/requirements/extras/pydantic.txt")
        assert member is not None
        requirements = [
            line.strip()
            for line in member.read().decode().splitlines()
            if line.strip() and not line.startswith("#")
        ]
    shutil.rmtree(site, ignore_errors=True)
    done = pip("install", "--quiet", "--target", str(site), *requirements)
    if done.returncode != 0:
        raise SuiteError(
            f"pip could not install {requirements}:\n{done.stdout}{done.stderr}", EXIT_FETCH
        )
    marker.write_text(" ".join(requirements) + "\n")
    return site


def extract(sdist: Path, version: str, dest: Path) -> Path:
    """Extract ``t/`` (without unit and smoke tests) and pytest's settings; apply PATCHES."""
    prefix = f"celery-{version}/"
    wanted = ("t/__init__.py", "t/canvas_helpers.py", "t/skip.py", "pyproject.toml")
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            name = member.name.removeprefix(prefix)
            if not (member.isfile() and (name in wanted or name.startswith(T))):
                continue
            if ".." in Path(name).parts:
                raise SuiteError(f"{sdist} holds a path outside its folder: {member.name}")
            member.name = name
            members.append(member)
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
            tar.extractall(dest, members=members, filter="data")
        else:
            tar.extractall(dest, members=members)  # regular files, names checked above
    for relative, old, new in PATCHES:
        path = dest / relative
        text = path.read_text()
        if text.count(old) != 1:
            raise SuiteError(
                f"{relative} of celery {version} no longer contains {old!r} exactly once; "
                "update PATCHES in tests/celery_suite/run_suite.py"
            )
        path.write_text(text.replace(old, new))
    return dest


# -- Redis ---------------------------------------------------------------------------


def redis_up() -> bool:
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1):
            return True
    except OSError:
        return False


def redis_client(db: int) -> Any:
    import redis

    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Hold the lock on our databases (a key with an expiry in the broker database)."""
    client = redis_client(BROKER_DB)
    token = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + LOCK_WAIT
    while not client.set(LOCK, token, nx=True, ex=int(LOCK_TTL)):
        if time.monotonic() > deadline:
            holder = client.get(LOCK)
            raise SuiteError(f"another run holds {LOCK} in Redis database {BROKER_DB}: {holder}")
        time.sleep(1)
    try:
        yield
    finally:
        if client.get(LOCK) == token.encode():
            client.delete(LOCK)


def flush_databases() -> None:
    """Empty both databases, except the lock."""
    redis_client(BACKEND_DB).flushdb()
    client = redis_client(BROKER_DB)
    keys = [k for k in client.scan_iter(count=1000) if k != LOCK.encode()]
    if keys:
        client.delete(*keys)
    client.expire(LOCK, int(LOCK_TTL))


def lasting_keys() -> set[str]:
    """Keys without an expiry in our databases, as ``db/name`` (results expire; bindings don't)."""
    keys = set()
    for db in (BROKER_DB, BACKEND_DB):
        client = redis_client(db)
        for key in client.scan_iter(count=1000):
            if client.ttl(key) == -1:
                keys.add(f"{db}/{key.decode(errors='replace')}")
    return keys


# -- running -------------------------------------------------------------------------


def run_pytest(suite: Suite, mode: str, nodeids: list[str], tag: str) -> Run:
    """Run ``nodeids`` in one pytest subprocess in ``mode``; read back their outcomes."""
    outcomes_file = suite.path / f"outcomes-{tag}.jsonl"
    report_file = suite.path / f"attach-{tag}.json"
    log = suite.path / f"pytest-{tag}.log"
    store = suite.path / f"store-{tag}"
    store.mkdir()
    env = {
        **os.environ,
        # An existing PYTHONPATH goes first: it can put another sessionflow under test.
        "PYTHONPATH": os.pathsep.join(
            [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            + [str(suite.site), str(suite.path), str(HERE)]
        ),
        "TEST_BROKER": f"redis://{REDIS_HOST}:{REDIS_PORT}/{BROKER_DB}",
        "TEST_BACKEND": f"redis://{REDIS_HOST}:{REDIS_PORT}/{BACKEND_DB}",
        "REDIS_HOST": REDIS_HOST,
        "REDIS_PORT": str(REDIS_PORT),
        "REDIS_DB": str(BROKER_DB),
        "SF_SUITE_OUTCOMES": str(outcomes_file),
        "SF_SUITE_REPORT": str(report_file),
        "SF_SUITE_DATABASE_URL": f"sqlite:///{store / 'sessionflow.db'}",
    }
    for name in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_CURRENT_TEST"):
        env.pop(name, None)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "suite_outcomes",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:rerunfailures",  # when installed, it would rerun Celery's @flaky tests silently
        *(["-p", "sessionflow_attach"] if mode == "attached" else []),
        f"--timeout={TEST_TIMEOUT}",
        "-rfE",
        *nodeids,
    ]
    started = time.monotonic()
    with open(log, "w") as out:
        # A session of its own: on a timeout, its worker's pool processes go too.
        process = subprocess.Popen(
            command,
            cwd=suite.path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            out.write(f"\nrun_suite.py: killed after {RUN_TIMEOUT} s\n")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    seconds = time.monotonic() - started
    outcomes: dict[str, str] = {}
    details: dict[str, str] = {}
    if outcomes_file.exists():
        for line in outcomes_file.read_text().splitlines():
            entry = json.loads(line)
            outcomes[entry["nodeid"]] = entry["outcome"]
            if entry.get("detail"):
                details[entry["nodeid"]] = entry["detail"]
    attach = json.loads(report_file.read_text()) if report_file.exists() else {}
    return Run(mode, outcomes, details, seconds, log, attach)


# -- comparing -----------------------------------------------------------------------


@dataclass
class Comparison:
    """What the runner found; ``--json`` writes it out."""

    celery: str
    selected: int = 0
    runs: list[Run] = field(default_factory=list)
    different: dict[str, list[str]] = field(default_factory=dict)  # nodeid -> outcomes seen
    not_reproduced: dict[str, list[str]] = field(default_factory=dict)
    expected: dict[str, list[str]] = field(default_factory=dict)
    keys_before: list[str] = field(default_factory=list)
    keys_after: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "celery": self.celery,
            "selected": self.selected,
            "runs": [
                {
                    "mode": r.mode,
                    "tests": len(r.outcomes),
                    "seconds": round(r.seconds, 1),
                    "outcomes": dict(Counter(r.outcomes.values())),
                    "attach": r.attach,
                }
                for r in self.runs
            ],
            "different": self.different,
            "not_reproduced": self.not_reproduced,
            "expected": self.expected,
            "keys_before": self.keys_before,
            "keys_after": self.keys_after,
        }


def run_both(suite: Suite, nodeids: list[str], tag: str, result: Comparison) -> tuple[Run, Run]:
    runs = []
    for mode in ("shipped", "attached"):
        flush_databases()  # both modes start from the same empty broker and backend
        run = run_pytest(suite, mode, nodeids, f"{mode}-{tag}")
        print(f"  {run.summary()}", flush=True)
        result.runs.append(run)
        runs.append(run)
    shipped, attached = runs
    if attached.outcomes and (attached.attach.get("apps", 0) < 1 or not attached.attach["workers"]):
        # The hook missed: the comparison would prove nothing.
        raise SuiteError(f"SessionFlow was not attached to a worker's app; see {attached.log}")
    return shipped, attached


def compare(suite: Suite, nodeids: list[str], result: Comparison) -> None:
    """Run both modes; run the tests whose outcomes differ once more in both."""
    shipped, attached = run_both(suite, nodeids, "1", result)
    lost = [n for n in nodeids if n not in shipped.outcomes and n not in attached.outcomes]
    if lost:
        raise SuiteError(
            f"no outcome in either run for {lost} (renamed in this Celery version, or the "
            f"runs crashed); see {shipped.log}"
        )
    first = {n: (shipped.outcome(n), attached.outcome(n)) for n in nodeids}
    suspects = [n for n, (a, b) in first.items() if a != b and n not in EXPECTED_DIFFERENCES]
    again = {}
    if suspects:
        print(f"  {len(suspects)} tests differ; running them once more in both modes")
        shipped, attached = run_both(suite, suspects, "2", result)
        again = {n: (shipped.outcome(n), attached.outcome(n)) for n in suspects}
    for nodeid, (a, b) in first.items():
        if nodeid in EXPECTED_DIFFERENCES:
            bucket = (
                result.expected if (a, b) == EXPECTED_DIFFERENCES[nodeid][:2] else result.different
            )
            bucket[nodeid] = [a, b]
        elif a != b:
            a2, b2 = again[nodeid]
            reproduced = a2 != b2 or a2 == "missing"  # a crashed rerun shows nothing
            bucket = result.different if reproduced else result.not_reproduced
            bucket[nodeid] = [a, b, a2, b2]


def probe_keys(suite: Suite, result: Comparison) -> None:
    """One more attached run without a flush: the keys that never expire must not grow."""
    result.keys_before = sorted(lasting_keys())
    run = run_pytest(suite, "attached", [PROBE], "probe")
    result.keys_after = sorted(lasting_keys())
    if run.outcome(PROBE) != "passed":
        raise SuiteError(f"the Redis key probe {PROBE} did not pass; see {run.log}")
    print(
        f"  lasting Redis keys in db {BROKER_DB} and {BACKEND_DB}: {len(result.keys_before)} "
        f"after the last attached run, {len(result.keys_after)} after one more",
        flush=True,
    )


def report(result: Comparison) -> int:
    """Print every difference; return the exit status."""
    for nodeid, (a, b) in result.expected.items():
        why = EXPECTED_DIFFERENCES[nodeid][2]
        print(f"expected: {nodeid}: shipped {a}, attached {b} ({why})")
    for nodeid, seen in result.not_reproduced.items():
        print(f"not reproduced (flaky?): {nodeid}: {_rounds(seen)}")
    status = 0
    if result.different:
        status = EXIT_DIFFERENT
        print(f"\nDIFFERENT OUTCOMES in {len(result.different)} tests (shipped -> attached):")
        for nodeid, seen in result.different.items():
            print(f"  {nodeid}: {_rounds(seen)}")
            if nodeid in EXPECTED_DIFFERENCES:
                print(f"      expected {_rounds(list(EXPECTED_DIFFERENCES[nodeid][:2]))}")
            for run in result.runs:
                if nodeid in run.details:
                    print(f"      {run.mode}: {run.details[nodeid]}")
        print("Logs: " + ", ".join(str(r.log) for r in result.runs))
    new_keys = sorted(set(result.keys_after) - set(result.keys_before))
    if len(result.keys_after) > len(result.keys_before):
        status = EXIT_DIFFERENT
        print(
            f"\nREDIS KEYS GREW by {len(result.keys_after) - len(result.keys_before)}: {new_keys}"
        )
    if status == 0:
        print("\nOK: the same outcomes as shipped and with SessionFlow(app) attached")
    return status


def _rounds(seen: list[str]) -> str:
    return ", then ".join(f"{a} -> {b}" for a, b in zip(seen[::2], seen[1::2], strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("nodeids", nargs="*", help="tests to compare instead of SUBSET")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    parser.add_argument("--keep", action="store_true", help="keep the extracted suite and logs")
    args = parser.parse_args(argv)
    # Terminated (a test's timeout): unwind, so the pytest process groups are killed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(EXIT_BROKEN))
    version = importlib.metadata.version("celery")
    result = Comparison(version)
    work = Path(tempfile.mkdtemp(prefix="celery-suite-"))
    status = EXIT_BROKEN
    try:
        if not redis_up():
            raise SuiteError(f"Redis is not reachable on {REDIS_HOST}:{REDIS_PORT}", EXIT_NO_REDIS)
        sdist = fetch_sdist(version)
        suite = Suite(extract(sdist, version, work), install_requirements(sdist, version))
        nodeids = list(args.nodeids or SUBSET)
        result.selected = len(nodeids)
        print(f"celery {version}: {len(nodeids)} tests of its integration suite, in {work}")
        with exclusive():
            compare(suite, nodeids, result)
            probe_keys(suite, result)
        status = report(result)
    except SuiteError as exc:
        print(f"error: {exc}", flush=True)
        status = exc.code
    finally:
        if args.json:
            args.json.write_text(json.dumps({"status": status, **result.as_json()}, indent=2))
        if args.keep or status in (EXIT_DIFFERENT, EXIT_BROKEN):
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
