"""What importing sessionflow costs a web process before its first database use."""

from __future__ import annotations

import subprocess
import sys


def test_alembic_is_imported_only_when_the_schema_is_checked() -> None:
    code = (
        "import sys\n"
        "import sessionflow, sessionflow.store.sql, sessionflow.store.memory\n"
        "print('alembic' in sys.modules)\n"
        "from sessionflow.store.sql import migrate\n"
        "migrate.head_revision()\n"
        "print('alembic' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
