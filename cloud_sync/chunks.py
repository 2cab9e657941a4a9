"""Content-defined chunking of packages for OTA transfer (torch-free).

A release's package is cut by content-defined chunking (Gear hash, normalized sizes: cloud_sync/cdc.py)
into chunks whose boundaries depend on the content, so bytes that did not change between two versions fall into identical chunks even when data
before them grew or shrank. Each chunk is named by its SHA-256. The chunk index lists (sha256, size) per
chunk in order; offsets are cumulative. A device cuts its local packages with the same parameters and
fetches only the chunks whose hashes it does not have.

Binary index format (all big-endian): b"PFIX", u8 version (1), 3 zero bytes, u32 count, then per chunk
32 bytes of SHA-256 and u32 size. Its own SHA-256 travels in the (validated) update command.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cloud_sync.cdc import ALGO, cut
from cloud_sync.errors import ProtocolError
from cloud_sync.protocol import MAX_CHUNK_BYTES, MAX_INDEX_BYTES
from pocketfleet.fs import atomic_write_bytes

INDEX_MAGIC = b"PFIX"
INDEX_VERSION = 1
_HEAD = struct.Struct(">4sB3xI")
_ENTRY = struct.Struct(">32sI")


@dataclass(frozen=True)
class Chunking:
    """Chunking parameters (bytes). `algo` is recorded so the format can grow."""

    min: int
    avg: int
    max: int
    algo: str = ALGO

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Chunking:
        return cls(int(d["min"]), int(d["avg"]), int(d["max"]), str(d.get("algo", ALGO)))  # type: ignore[arg-type]


LARGE_PACKAGE = 512 * 1024  # from this size on, chunks are at least LARGE_CHUNK_AVG on average
LARGE_CHUNK_AVG = 64 * 1024


def choose_chunking(size: int, target_chunks: int = 64) -> Chunking:
    """Average chunk ~ size/target_chunks rounded to a power of two, within [2 KiB, 256 KiB], and at least
    64 KiB for packages of 512 KiB and more.

    Small chunks keep a small change small (a new classifier head moves a few KiB); larger ones cut the
    per-message cost on every side (cloud publish, broker, device receive and acknowledgement), which is
    what a large fleet pays for: a 1 MB package moves in ~16 chunks instead of 64 (docs/scale.md). The cap
    keeps a delta of a large package small. min = avg/4, max = 4*avg (<= 1 MiB, the frame limit).
    """
    raw = max(1, size // max(1, target_chunks))
    avg = 1 << round(math.log2(raw))
    if size >= LARGE_PACKAGE:
        avg = max(avg, LARGE_CHUNK_AVG)
    avg = min(max(avg, 2048), 256 * 1024)
    return Chunking(min=avg // 4, avg=avg, max=min(avg * 4, MAX_CHUNK_BYTES))


@dataclass(frozen=True)
class ChunkIndex:
    hashes: tuple[str, ...]
    sizes: tuple[int, ...]
    offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)
    total: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        offsets, at = [], 0
        for s in self.sizes:
            offsets.append(at)
            at += s
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "total", at)

    def __len__(self) -> int:
        return len(self.hashes)

    def to_bytes(self) -> bytes:
        body = b"".join(_ENTRY.pack(bytes.fromhex(h), s) for h, s in zip(self.hashes, self.sizes, strict=False))
        return _HEAD.pack(INDEX_MAGIC, INDEX_VERSION, len(self.hashes)) + body

    @classmethod
    def from_bytes(cls, raw: bytes | memoryview, max_chunk: int = MAX_CHUNK_BYTES) -> ChunkIndex:
        raw = bytes(raw)
        if len(raw) > MAX_INDEX_BYTES or len(raw) < _HEAD.size:
            raise ProtocolError(f"chunk index is {len(raw)} bytes, outside [{_HEAD.size}, {MAX_INDEX_BYTES}]")
        magic, version, count = _HEAD.unpack_from(raw)
        if magic != INDEX_MAGIC or version != INDEX_VERSION:
            raise ProtocolError(f"chunk index has magic {magic!r} v{version}, expected {INDEX_MAGIC!r} v1")
        if len(raw) != _HEAD.size + count * _ENTRY.size:
            raise ProtocolError(f"chunk index says {count} chunks but holds {len(raw) - _HEAD.size} entry bytes")
        hashes, sizes = [], []
        for i in range(count):
            digest, size = _ENTRY.unpack_from(raw, _HEAD.size + i * _ENTRY.size)
            if not 0 < size <= max_chunk:
                raise ProtocolError(f"chunk index entry {i} has size {size}, outside (0, {max_chunk}]")
            hashes.append(digest.hex())
            sizes.append(size)
        return cls(tuple(hashes), tuple(sizes))


def _cdc(view: memoryview | bytes | mmap.mmap, chunking: Chunking) -> Iterator[tuple[int, int, str]]:
    data = memoryview(view)
    for offset, length in cut(data, chunking.min, chunking.avg, chunking.max):
        yield offset, length, hashlib.sha256(data[offset : offset + length]).hexdigest()


def _mapped(path: Path) -> tuple[int, mmap.mmap | bytes]:
    size = path.stat().st_size
    if size == 0:
        return 0, b""
    with open(path, "rb") as fh:
        return size, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


def index_file(path: str | Path, chunking: Chunking) -> ChunkIndex:
    """Cut a file into content-defined chunks and hash each."""
    size, data = _mapped(Path(path))
    try:
        entries = list(_cdc(data, chunking)) if size else []
    finally:
        if isinstance(data, mmap.mmap):
            data.close()
    return ChunkIndex(tuple(h for _, _, h in entries), tuple(n for _, n, _ in entries))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class LocalChunks:
    """Chunks a device already holds, found by cutting local files with a release's parameters.

    Sources are the files of installed versions (model files and samples, as extracted by the store) and
    any kept package; content-defined boundaries re-synchronise inside a file, so the model bytes of an
    extracted file yield the same chunks as inside the package. Per-file indexes are cached in
    `cache_dir`, keyed by path, size and mtime.
    """

    def __init__(self, chunking: Chunking, cache_dir: Path | None = None) -> None:
        self.chunking = chunking
        self.cache_dir = cache_dir
        self.where: dict[str, tuple[Path, int, int]] = {}  # sha256 -> (file, offset, size)

    def add_file(self, path: Path) -> int:
        """Index one local file; returns how many new chunk hashes it contributed."""
        try:
            index = self._cached_index(path)
        except (OSError, ValueError):
            return 0
        before = len(self.where)
        for h, off, n in zip(index.hashes, index.offsets, index.sizes, strict=False):
            self.where.setdefault(h, (path, off, n))
        return len(self.where) - before

    def _cached_index(self, path: Path) -> ChunkIndex:
        st = path.stat()
        c = self.chunking
        key = [str(path.resolve()), st.st_size, st.st_mtime_ns, c.min, c.avg, c.max]
        cache = None
        if self.cache_dir is not None:
            cache = self.cache_dir / (hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32] + ".json")
            try:
                data = json.loads(cache.read_text())
                if data.get("key") == key:
                    return ChunkIndex(tuple(data["hashes"]), tuple(data["sizes"]))
            except (OSError, ValueError, KeyError, TypeError):
                pass
        index = index_file(path, c)
        if cache is not None:
            with contextlib.suppress(OSError):  # a cache that cannot be written is only slower next time
                atomic_write_bytes(cache, json.dumps({"key": key, "hashes": index.hashes, "sizes": index.sizes}).encode())
        return index

    def read(self, sha256: str) -> bytes | None:
        """The chunk's bytes if a local file holds them and they still hash right."""
        hit = self.where.get(sha256)
        if hit is None:
            return None
        path, offset, size = hit
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(size)
        except OSError:
            return None
        return data if len(data) == size and hashlib.sha256(data).hexdigest() == sha256 else None
