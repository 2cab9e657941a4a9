"""Core ML packages as files, torch-free: a deterministic zip of an `.mlpackage` directory, its safe
extraction, and whether this host can run Core ML (the device runtime and the exporter share these)."""

from __future__ import annotations

import platform
import zipfile
from pathlib import Path

from export.errors import ExportError

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
NOT_RUN = "not run on this host"


def can_predict() -> bool:
    """coremltools runs models only on macOS."""
    return platform.system() == "Darwin"


def zip_mlpackage(src: str | Path, dst: str | Path) -> Path:
    """Zip an `.mlpackage` directory into one file, deterministically: members sorted by path, STORED,
    timestamps 1980-01-01, fixed permissions, no directory entries; the top folder is `model.mlpackage/`."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ExportError(f"{src} is not an .mlpackage directory")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    dst.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zf:
        for p in files:
            info = zipfile.ZipInfo(f"model.mlpackage/{p.relative_to(src).as_posix()}", ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            info.create_system = 3  # unix
            zf.writestr(info, p.read_bytes())
    return dst


def unzip_mlpackage(src: str | Path, dst_dir: str | Path) -> Path:
    """Extract a zip made by `zip_mlpackage` under `dst_dir`; returns the `.mlpackage` path. Member paths
    are checked (no absolute paths or `..`)."""
    dst_dir = Path(dst_dir)
    root = dst_dir.resolve()
    with zipfile.ZipFile(src) as zf:
        for name in zf.namelist():
            target = (dst_dir / name).resolve()
            if not name.startswith("model.mlpackage/") or root not in target.parents:
                raise ExportError(f"{Path(src).name}: member {name!r} is not inside model.mlpackage/")
        zf.extractall(dst_dir)
    return dst_dir / "model.mlpackage"
