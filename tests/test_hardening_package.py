"""Crafted packages (issue 12, cases 9 and 10): every one is refused with exit 4 and a one-line message, never
a traceback, by `pocketfleet verify`, `inspect`, `agent install` and `pocketfleet release`; names and
member paths are full-match (no trailing newline), integers bounded."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from export.manifest import MANIFEST, SIGNATURE, safe_member_path
from export.signing import canonical_json, sign_bytes
from tests.agent_fixtures import Packages, cli, session_packages


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    return session_packages(tmp_path_factory)


def _repack(src: Path, out: Path, key: str, edit: Callable[[dict[str, Any]], None] | None = None,
            manifest_raw: bytes | None = None, sig: bytes | None = None) -> Path:
    """Copy a package, optionally editing (and re-signing) its manifest or replacing its signature."""
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    if edit is not None:
        doc = json.loads(members[MANIFEST])
        edit(doc)
        members[MANIFEST] = canonical_json(doc)
        members[SIGNATURE] = sign_bytes(members[MANIFEST], key)
    if manifest_raw is not None:
        members[MANIFEST] = manifest_raw
        members[SIGNATURE] = sign_bytes(manifest_raw, key)
    if sig is not None:
        members[SIGNATURE] = sig
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out


def _flip_encrypted(src: Path, out: Path) -> Path:
    """One bit: the 'encrypted' general-purpose flag of the first central-directory entry."""
    data = bytearray(src.read_bytes())
    cd = data.find(b"PK\x01\x02")
    data[cd + 8] |= 0x01
    out.write_bytes(bytes(data))
    return out


def _crafted(packages: Packages, tmp: Path) -> dict[str, Path]:
    src, key = packages.versions[1], packages.private_key
    deep = b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    return {
        "encrypted flag": _flip_encrypted(src, tmp / "encrypted.pfpkg"),
        "deep signature": _repack(src, tmp / "deep-sig.pfpkg", key, sig=b"[" * 4096),
        "extreme expires": _repack(src, tmp / "expires.pfpkg", key,
                                   edit=lambda m: m.__setitem__("expires", "9999-12-31T23:59:59-23:59")),
        "nested manifest": _repack(src, tmp / "nested.pfpkg", key, manifest_raw=deep),
        "name with newline": _repack(src, tmp / "newline.pfpkg", key,
                                     edit=lambda m: m.__setitem__("name", m["name"] + "\n")),
        "version 2**64": _repack(src, tmp / "huge-version.pfpkg", key, edit=lambda m: m.__setitem__("version", 2**64)),
    }


def test_member_paths_and_names_are_full_match() -> None:
    """Before: safe_member_path('model.onnx\\n') was True (`$` matches before a final newline)."""
    assert safe_member_path("model.onnx") and safe_member_path("a/b.bin")
    for bad in ("model.onnx\n", "a\n/b", "x\n\n"):
        assert not safe_member_path(bad), bad


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """`pocketfleet ARGV` in this process (a traceback would fail the test as an exception)."""
    from pocketfleet.cli import main

    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_crafted_packages_exit_4_with_one_line_everywhere(packages: Packages, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Before: tracebacks (RuntimeError 'File is encrypted', RecursionError, OverflowError) and a version 2**64
    or a name ending in a newline that installed."""
    crafted = _crafted(packages, tmp_path)
    cloud = tmp_path / "cloud.toml"
    cloud.write_text(f'[cloud]\nstate_dir = "cloud"\ntrust = "{packages.public_key}"\n')
    failures = []
    for case, pkg in crafted.items():
        runs = {
            "verify": ("verify", str(pkg), "--trust", packages.public_key),
            "inspect": ("inspect", str(pkg), "--trust", packages.public_key),
            "install": ("agent", "install", str(pkg), "--state-dir", str(tmp_path / f"state-{pkg.stem}"),
                        "--trust", packages.public_key),
            "release": ("release", str(pkg), "--group", "lab", "--config", str(cloud)),
        }
        for command, argv in runs.items():
            try:
                code, err = _main(capsys, *argv)
            except Exception as exc:  # noqa: BLE001 - what the user would have seen as a traceback
                failures.append((case, command, "traceback", repr(exc)[:200]))
                continue
            if code != 4 or len(err.strip().splitlines()) != 1:
                failures.append((case, command, code, err.strip()[-300:]))
    assert failures == [], failures
    # and in a fresh process, as a user runs it: one line, exit 4
    out = cli("verify", str(crafted["encrypted flag"]), "--trust", packages.public_key)
    assert out.returncode == 4 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
