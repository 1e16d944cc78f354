"""The file-processing example runs end to end on the embedded default (once, not per stack)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
DEMO = Path(__file__).resolve().parents[2] / "examples" / "fileprocessing" / "demo.py"
LINE = re.compile(
    r"^\s+(file-\d+\.txt)\s+session \w+\s+download: (\S+)\s+process: (\S+)\s+upload: (\S+)\s+\[ok",
    re.MULTILINE,
)


def test_fileprocessing_demo_pins_each_session_to_one_worker() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEPROC_")}
    done = subprocess.run(
        [sys.executable, str(DEMO), "--files", "6"],
        cwd=DEMO.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    lines = LINE.findall(done.stdout)
    assert sorted(name for name, *_ in lines) == [f"file-{i:02d}.txt" for i in range(1, 7)], output
    for _name, download, process, upload in lines:
        assert download == process == upload, output
    assert len({download for _, download, _, _ in lines}) == 2, output  # both workers took sessions
    assert "OK: 6 files in 6 sessions over 2 workers" in done.stdout, output
