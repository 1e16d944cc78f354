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


PLACEMENT_DEMO = DEMO.parents[1] / "placement" / "demo.py"
PLACED = re.compile(r"^  ([\w-]+)\s+.+ -> (\S+)  task ran on (\S+)$", re.MULTILINE)


def test_placement_demo_places_sessions_as_asked() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLACEMENT_")}
    done = subprocess.run(
        [sys.executable, str(PLACEMENT_DEMO)],
        cwd=PLACEMENT_DEMO.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    placed = {name: (host, ran) for name, host, ran in PLACED.findall(done.stdout)}
    expected = {
        "render": "gpu",
        "scrape": "cpu",
        "big-vram": "gpu",
        "in-us": "cpu",
        "likes-eu": "gpu",
        "packed": "gpu",
        "spread": "cpu",
    }
    assert {name: host.split("@")[0] for name, (host, _) in placed.items()} == expected, output
    assert all(host == ran for host, ran in placed.values()), output
    assert "4 renders on gpu@" in done.stdout and ", 0 overlapping" in done.stdout, output
    assert "short of gpu (1 of 1 in use, wants 1)" in done.stdout, output
    unplaceable = re.findall(r"SessionUnplaceable after (\d+\.\d+) s: (.*)$", done.stdout, re.M)
    assert len(unplaceable) == 2, output
    assert all(float(took) < 5 for took, _ in unplaceable), output
    assert unplaceable[0][1].startswith("no live worker has gpu >= 2; live workers: "), output
    assert "zone=ap" in unplaceable[1][1], output
    assert "\nOK: 7 sessions placed as asked (4 on gpu@" in done.stdout, output
