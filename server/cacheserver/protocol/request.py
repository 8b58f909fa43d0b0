"""A storage request between its command line and its data block (shared by the text
protocol's storage commands and the meta protocol's ms)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class StorageRequest:
    """A parsed storage command line waiting for its data block."""

    command: bytes
    key: bytes
    flags: int
    exptime: int  # absolute, as the store keeps it
    nbytes: int
    unique: int
    noreply: bool
    swallow: bytes | None = None  # set when the data is to be read and discarded: the reply
    meta: Any = None  # an ms request's MetaFlags (protocol/meta.py)
