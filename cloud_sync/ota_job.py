"""One OTA download on disk (ota/job.*): the command, the chunk index, the part file written at chunk
offsets and the bitmap of chunks present, saved crash-safely so that a restart resumes where it stopped."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from cloud_sync.chunks import ChunkIndex
from pocketfleet.fs import atomic_write_bytes

JOB_FILES = ("job.json", "job.index", "job.part", "job.have", "job.pfpkg")


class OtaJob:
    """One release being assembled in ota/job.*; the part file is written at chunk offsets."""

    def __init__(self, folder: Path, cmd: dict[str, Any]) -> None:
        self.folder = folder
        self.cmd = cmd
        rel = cmd["release"]
        self.release = rel
        self.release_id: str = rel["release_id"]
        self.index: ChunkIndex | None = None
        self.index_raw: bytes | None = None
        self.have = bytearray()
        self.missing: set[int] = set()
        self.outstanding: dict[int, float] = {}
        self.retries: dict[int, int] = {}
        self.fd: int | None = None
        self.bytes_rx = 0
        self.bytes_reused = 0
        self.bytes_requested = 0
        self.refetched = 0
        self.index_requested = 0.0
        self.rtt = 0.0  # EWMA of request -> chunk time (s): timeouts adapt to a loaded cloud
        self.again = False  # the session was lost: ask even for chunks the cloud sent recently
        self.mc_topic: str | None = None  # the release's multicast topic this device subscribed to, if any
        self.mc = False  # requests say the device takes multicast chunks (cleared after a timeout: unicast)
        self.last_progress = time.monotonic()
        self.started = time.monotonic()
        self.dirty = False
        self.done_event = threading.Event()

    @property
    def part(self) -> Path:
        return self.folder / "job.part"

    def open(self, index: ChunkIndex, index_raw: bytes) -> None:
        self.index, self.index_raw = index, index_raw
        n = len(index)
        have_path = self.folder / "job.have"
        have = bytearray(have_path.read_bytes()) if have_path.exists() else bytearray()
        if len(have) != (n + 7) // 8 or not self.part.exists() or self.part.stat().st_size != index.total:
            have = bytearray((n + 7) // 8)
        self.have = have
        self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self.fd).st_size != index.total:
            os.ftruncate(self.fd, index.total)
        self.missing = {i for i in range(n) if not self.has(i)}

    def recover_written(self) -> int:
        """After a restart: mark the missing chunks whose bytes the part file already holds (written after the
        last bitmap save, which is at most every 0.5 s), each checked against its hash in the index. Returns
        how many were recovered."""
        found = [i for i in sorted(self.missing) if self.intact(i)]
        for i in found:
            self.mark(i)
        return len(found)

    def intact(self, i: int) -> bool:
        """Whether the part file holds chunk `i` as the index hashes it."""
        assert self.index is not None and self.fd is not None
        data = os.pread(self.fd, self.index.sizes[i], self.index.offsets[i])
        return hashlib.sha256(data).hexdigest() == self.index.hashes[i]

    def has(self, i: int) -> bool:
        return bool(self.have[i >> 3] & (1 << (i & 7)))

    def mark(self, i: int, present: bool = True) -> None:
        if present:
            self.have[i >> 3] |= 1 << (i & 7)
            self.missing.discard(i)
        else:
            self.have[i >> 3] &= ~(1 << (i & 7)) & 0xFF
            self.missing.add(i)
        self.dirty = True

    def save(self) -> None:
        if not self.dirty or self.index is None:
            return
        atomic_write_bytes(self.folder / "job.have", bytes(self.have))
        self.dirty = False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def progress(self) -> dict[str, int]:
        n = len(self.index) if self.index else self.release["chunks"]
        return {"have": n - len(self.missing) if self.index else 0, "total": n, "bytes_rx": self.bytes_rx,
                "bytes_reused": self.bytes_reused, "refetched": self.refetched}
