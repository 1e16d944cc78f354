"""Developer commands that work on a fresh machine with only Python 3.10+.

    python3 dev.py demo [ARGS]   run the file-processing demo (examples/fileprocessing)
    python3 dev.py test [ARGS]   run the test suite (ARGS go to pytest)

Creates .venv when missing and installs ``-e ".[test]"`` into it whenever
pyproject.toml changed since the last install. Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".dev-installed"  # hash of the pyproject.toml last installed
COMMANDS = {
    "demo": ["examples/fileprocessing/demo.py"],
    "test": ["-m", "pytest"],
}


def run(*cmd: str | Path) -> int:
    """Run ``cmd`` in the repo root and return its exit status.

    Ctrl-C reaches the child too; we wait for it to clean up (subprocess.call
    would SIGKILL it). SIGTERM is passed on.
    """
    child = subprocess.Popen([str(part) for part in cmd], cwd=ROOT)
    previous = signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    try:
        while True:
            try:
                code = child.wait()
                return code if code >= 0 else 128 - code  # killed by a signal: 128 + signum
            except KeyboardInterrupt:
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)


def ensure_venv() -> None:
    if not PYTHON.exists():
        print(f"dev.py: creating {VENV}", flush=True)
        if run(sys.executable, "-m", "venv", VENV) != 0:
            sys.exit("dev.py: `python3 -m venv` failed (Debian/Ubuntu: apt install python3-venv)")
        # Editable installs of a pyproject-only package need pip >= 21.3.
        if run(PYTHON, "-m", "pip", "install", "-q", "--upgrade", "pip") != 0:
            sys.exit("dev.py: could not upgrade pip in .venv")
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == digest:
        return
    print('dev.py: installing -e ".[test]" into .venv', flush=True)
    if run(PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", ".[test]"):
        sys.exit('dev.py: `pip install -e ".[test]"` failed')
    STAMP.write_text(digest + "\n")


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    if sys.version_info < (3, 10):  # noqa: UP036 - dev.py itself may run on an old python3
        sys.exit("dev.py: sessionflow needs Python 3.10 or newer")
    ensure_venv()
    code = run(PYTHON, *COMMANDS[argv[0]], *argv[1:])
    if argv[0] == "test" and code == 5:
        print("dev.py: pytest collected no tests; that is an error", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
