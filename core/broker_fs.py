"""The embedded broker: kombu's filesystem transport with atomic hand-over of message files.

kombu's own transport creates a message file *then* locks and writes it, while consumers move files
without locking: under load a consumer can take an empty or half-written file and the worker dies
with ``JSONDecodeError`` (seen in this project's tests). Here:

- put: the payload is written to a hidden temporary name and renamed to ``*.msg`` (atomic on POSIX),
  so a consumer only ever sees complete files;
- get: a consumer claims a file by renaming it inside the queue folder (atomic; a loser of the race
  gets ``FileNotFoundError`` and moves on), then reads and deletes it;
- an unreadable file is moved to ``corrupt/`` and logged instead of killing the worker.

Selected automatically for ``VERTICALS_BROKER_URL=filesystem://`` (the default).
"""

from __future__ import annotations

import logging
import os
import uuid
from time import monotonic
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

log = logging.getLogger(__name__)
ALIAS = "verticalsfs"


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        tmp = os.path.join(self.data_folder_out, f".{name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb", buffering=0) as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(tmp, final)
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue: str) -> Any:
        wanted = f"{queue}.msg"
        folder = self.data_folder_in
        for filename in sorted(os.listdir(folder)):
            if filename.startswith(".") or filename.partition(".")[2] != wanted:
                continue
            src = os.path.join(folder, filename)
            claimed = os.path.join(folder, f".{filename}.claimed-{os.getpid()}-{uuid.uuid4().hex[:6]}")
            try:
                os.rename(src, claimed)  # atomic: exactly one consumer wins this file
            except OSError:
                continue
            try:
                with open(claimed, "rb") as f:
                    payload = f.read()
                message = loads(bytes_to_str(payload))
            except (OSError, ValueError) as exc:
                bad = os.path.join(folder, "corrupt")
                os.makedirs(bad, exist_ok=True)
                os.replace(claimed, os.path.join(bad, filename))
                log.error("unreadable message file %s moved to %s: %s", filename, bad, exc)
                continue
            os.remove(claimed)
            return message
        raise filesystem.Empty()

    def _size(self, queue: str) -> int:
        wanted = f"{queue}.msg"
        return sum(1 for f in os.listdir(self.data_folder_in)
                   if not f.startswith(".") and f.partition(".")[2] == wanted)


class Transport(filesystem.Transport):
    Channel = Channel
    driver_type = "filesystem"
    driver_name = "filesystem"


TRANSPORT_ALIASES[ALIAS] = "core.broker_fs:Transport"
