"""A broker that needs no server: kombu's filesystem transport, made safe for several processes.

kombu's filesystem transport writes each message straight into its final file,
so a consumer polling the folder can pick the file up while it is still empty
and fail with ``JSONDecodeError: Expecting value`` (the message is lost; kombu
issue #1551). Here every message is written under a name no consumer looks at
and then renamed into place, which is atomic on one filesystem.

For demos and tests on one machine (``app.conf.update(fsbroker.settings(folder))``).
Production uses Redis or RabbitMQ.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    """A filesystem channel whose messages appear in the folder complete or not at all."""

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".partial-{uuid.uuid4()}")
        try:
            with open(partial, "wb") as file:
                file.write(dumps(payload).encode())
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"cannot add message file {final!r}") from exc


class Transport(filesystem.Transport):
    """kombu's filesystem transport with atomic message files."""

    Channel = Channel


def settings(folder: Path, polling_interval: float = 0.05) -> dict[str, Any]:
    """Celery settings for a broker whose messages are files under ``folder``."""
    messages, control = folder / "broker", folder / "broker-control"
    messages.mkdir(parents=True, exist_ok=True)
    control.mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": "filesystem://localhost/",
        "broker_transport": Transport,
        "broker_transport_options": {
            "data_folder_in": str(messages),
            "data_folder_out": str(messages),
            "control_folder": str(control),
            "store_processed": False,
            "polling_interval": polling_interval,  # kombu's default of 1 s adds 1 s per hop
        },
    }
