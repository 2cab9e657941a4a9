"""Model packages: build, sign, verify, extract, and every rejection (API, CLI, and a torch-free CLI run)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from export import (
    BadSignatureError,
    ExpiredPackageError,
    FileMismatchError,
    Limits,
    MalformedManifestError,
    MalformedPackageError,
    MalformedSignatureError,
    MissingFileError,
    NotAPackageError,
    OversizeError,
    PackageError,
    Samples,
    UnexpectedFileError,
    UnsafePathError,
    UnsignedPackageError,
    UntrustedKeyError,
    VerificationError,
    build_package,
    canonical_json,
    check_samples,
    extract_package,
    generate_keys,
    inspect_package,
    load_trust,
    read_manifest,
    sign_package,
    verify_package,
)
from export.manifest import parse_iso, utc_now
from export.signing import sign_bytes
from export.specs import TensorSpec
from pocketfleet import cli as pocketfleet

ROOT = Path(__file__).resolve().parents[1]
W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    base = tmp_path_factory.mktemp("keys")
    return {"good": generate_keys(base / "good"), "other": generate_keys(base / "other")}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ONNX model: y = x @ W, dynamic batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(W, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    onnx.save(model, path)
    return path


FIELDS = {
    "name": "mm",
    "version": 3,
    "format": "onnx",
    "dtype": "fp32",
    "workload": "test",
    "inputs": [TensorSpec("x", ("batch", 4), "float32")],
    "outputs": [TensorSpec("y", ("batch", 3), "float32")],
    "report": {"metric": {"metric": "accuracy", "value": 1.0}},
}


def _samples() -> Samples:
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    return Samples({"x": x}, {"y": x @ W})


@pytest.fixture()
def pkg(tmp_path: Path, model_file: Path, keys: dict) -> Path:
    out = tmp_path / "mm.pfpkg"
    build_package(model_file, FIELDS, _samples(), out, key=keys["good"]["private_key"])
    return out


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _write(path: Path, members: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compress)
    return path


def _resigned(members: dict[str, bytes], manifest: dict, key: str) -> dict[str, bytes]:
    raw = canonical_json(manifest)
    return {**members, "manifest.json": raw, "manifest.sig": sign_bytes(raw, key)}


# ---------------------------------------------------------------------------------------------- valid packages


def test_valid_package_verifies_and_is_a_stored_zip_with_signed_canonical_manifest(
    pkg: Path, keys: dict
) -> None:
    manifest = verify_package(pkg, keys["good"]["public_key"])
    assert (manifest.name, manifest.version, manifest.format, manifest.model) == (
        "mm",
        3,
        "onnx",
        "model.onnx",
    )
    assert set(manifest.files) == {"model.onnx", "samples.safetensors"}
    assert manifest.samples == {"path": "samples.safetensors", "count": 2, "atol": 1e-4, "rtol": 1e-3}
    assert parse_iso(manifest.expires) - parse_iso(manifest.created) == timedelta(days=365)
    with zipfile.ZipFile(pkg) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos][:2] == ["manifest.json", "manifest.sig"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        raw = zf.read("manifest.json")
        sig = json.loads(zf.read("manifest.sig"))
    assert raw == canonical_json(json.loads(raw))
    assert sig["alg"] == "ed25519" and sig["key_id"] == keys["good"]["key_id"]
    # a directory of public keys is a trust set too
    assert verify_package(pkg, Path(keys["good"]["public_key"]).parent).version == 3


def test_package_bytes_are_deterministic(tmp_path: Path, model_file: Path, keys: dict) -> None:
    now = utc_now()
    for name in ("a", "b"):
        build_package(
            model_file,
            FIELDS,
            _samples(),
            tmp_path / f"{name}.pfpkg",
            key=keys["good"]["private_key"],
            now=now,
        )
    assert (tmp_path / "a.pfpkg").read_bytes() == (tmp_path / "b.pfpkg").read_bytes()


def test_private_key_is_private(keys: dict) -> None:
    assert os.stat(keys["good"]["private_key"]).st_mode & 0o777 == 0o600
    assert len(load_trust(keys["good"]["public_key"])) == 1


def test_extract_writes_verified_files_and_samples_smoke_test_passes(
    pkg: Path, keys: dict, tmp_path: Path
) -> None:
    from export.runtimes import load_runtime

    dest = tmp_path / "store" / "mm-3"
    manifest = extract_package(pkg, dest, keys["good"]["public_key"])
    assert sorted(p.name for p in dest.iterdir()) == [
        "manifest.json",
        "manifest.sig",
        "model.onnx",
        "samples.safetensors",
    ]
    samples = Samples.from_bytes((dest / "samples.safetensors").read_bytes(), manifest.samples)
    errors = check_samples(load_runtime(dest / manifest.model).run, samples)
    assert errors["y"] < 1e-5
    with pytest.raises(VerificationError, match="not an empty directory"):
        extract_package(pkg, dest, keys["good"]["public_key"])


def test_extract_of_a_tampered_package_leaves_nothing(pkg: Path, keys: dict, tmp_path: Path) -> None:
    members = _members(pkg)
    members["model.onnx"] = members["model.onnx"][:-1] + b"\x00"
    bad = _write(tmp_path / "bad.pfpkg", members)
    with pytest.raises(FileMismatchError):
        extract_package(bad, tmp_path / "out", keys["good"]["public_key"])
    assert not (tmp_path / "out").exists()


def test_unsigned_package_can_be_signed_later(tmp_path: Path, model_file: Path, keys: dict) -> None:
    out = tmp_path / "u.pfpkg"
    build_package(model_file, FIELDS, None, out)
    with pytest.raises(UnsignedPackageError, match=r"u\.pfpkg: the package is not signed"):
        verify_package(out, keys["good"]["public_key"])
    sign_package(out, keys["good"]["private_key"])
    assert verify_package(out, keys["good"]["public_key"]).version == 3
    info = inspect_package(out, trust=keys["good"]["public_key"])
    assert info["signed"] and info["verified"] and info["key_id"] == keys["good"]["key_id"]


def test_build_rejects_bad_fields_and_names(tmp_path: Path, model_file: Path) -> None:
    with pytest.raises(PackageError, match="'version' must be an integer"):
        build_package(model_file, {**FIELDS, "version": "3"}, None, tmp_path / "x.pfpkg")
    with pytest.raises(PackageError, match="not allowed"):
        build_package({"../model.onnx": model_file}, FIELDS, None, tmp_path / "x.pfpkg")
    with pytest.raises(PackageError, match="does not exist"):
        build_package(tmp_path / "absent.onnx", FIELDS, None, tmp_path / "x.pfpkg")
    assert not (tmp_path / "x.pfpkg").exists()


# ---------------------------------------------------------------------------------------------- rejections

Bad = Callable[[Path, Path, dict], Path]  # (valid package, tmp dir, keys) -> bad package


def _bad_signature(pkg: Path, tmp: Path, keys: dict) -> Path:
    members = _members(pkg)
    manifest = json.loads(members["manifest.json"])
    manifest["version"] = 99  # tampered manifest, old signature
    return _write(tmp / "bad.pfpkg", {**members, "manifest.json": canonical_json(manifest)})


def _forged_key_id(pkg: Path, tmp: Path, keys: dict) -> Path:
    members = _resigned(
        _members(pkg), json.loads(_members(pkg)["manifest.json"]), keys["other"]["private_key"]
    )
    sig = json.loads(members["manifest.sig"])
    sig["key_id"] = keys["good"]["key_id"]  # claims the trusted key, signed by another
    return _write(tmp / "bad.pfpkg", {**members, "manifest.sig": json.dumps(sig).encode()})


def _untrusted(pkg: Path, tmp: Path, keys: dict) -> Path:
    members = _members(pkg)
    return _write(
        tmp / "bad.pfpkg",
        _resigned(members, json.loads(members["manifest.json"]), keys["other"]["private_key"]),
    )


def _unsigned(pkg: Path, tmp: Path, keys: dict) -> Path:
    members = _members(pkg)
    del members["manifest.sig"]
    return _write(tmp / "bad.pfpkg", members)


def _changed_same_size(pkg: Path, tmp: Path, keys: dict) -> Path:
    members = _members(pkg)
    data = bytearray(members["model.onnx"])
    data[-5] ^= 0xFF
    return _write(tmp / "bad.pfpkg", {**members, "model.onnx": bytes(data)})


def _changed_size(pkg: Path, tmp: Path, keys: dict) -> Path:
    members = _members(pkg)
    return _write(tmp / "bad.pfpkg", {**members, "model.onnx": members["model.onnx"] + b"\x00"})


def _flipped_in_place(pkg: Path, tmp: Path, keys: dict) -> Path:
    """Flip a byte of the stored model data in the zip itself (zip CRC no longer matches)."""
    data = bytearray(pkg.read_bytes())
    with zipfile.ZipFile(pkg) as zf:
        info = zf.getinfo("model.onnx")
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x01
    out = tmp / "bad.pfpkg"
    out.write_bytes(bytes(data))
    return out


def _missing(pkg: Path, tmp: Path, keys: dict) -> Path:
    members = _members(pkg)
    del members["model.onnx"]
    return _write(tmp / "bad.pfpkg", members)


def _missing_manifest(pkg: Path, tmp: Path, keys: dict) -> Path:
    members = _members(pkg)
    del members["manifest.json"]
    return _write(tmp / "bad.pfpkg", members)


def _extra(pkg: Path, tmp: Path, keys: dict) -> Path:
    return _write(tmp / "bad.pfpkg", {**_members(pkg), "payload.sh": b"#!/bin/sh\nrm -rf /\n"})


def _expired(pkg: Path, tmp: Path, keys: dict) -> Path:
    members = _members(pkg)
    manifest = json.loads(members["manifest.json"])
    manifest["created"], manifest["expires"] = "2020-01-01T00:00:00Z", "2021-01-01T00:00:00Z"
    return _write(tmp / "bad.pfpkg", _resigned(members, manifest, keys["good"]["private_key"]))


def _member_path(name: str) -> Bad:
    def make(pkg: Path, tmp: Path, keys: dict) -> Path:
        return _write(tmp / "bad.pfpkg", {**_members(pkg), name: b"x"})

    return make


def _manifest_path(pkg: Path, tmp: Path, keys: dict) -> Path:
    """A correctly signed manifest that lists a path escaping the package."""
    members = _members(pkg)
    manifest = json.loads(members["manifest.json"])
    manifest["files"]["../escape.onnx"] = manifest["files"]["model.onnx"]
    return _write(tmp / "bad.pfpkg", _resigned(members, manifest, keys["good"]["private_key"]))


def _bomb_header(pkg: Path, tmp: Path, keys: dict) -> Path:
    """Patch the central directory: model.onnx claims 4 GiB - 16 bytes of uncompressed data."""
    data = bytearray(pkg.read_bytes())
    with zipfile.ZipFile(pkg) as zf:
        info = zf.getinfo("model.onnx")
    name = b"model.onnx"
    pos = 0
    while True:  # find the central directory record of model.onnx
        pos = data.index(b"PK\x01\x02", pos)
        nlen = struct.unpack("<H", data[pos + 28 : pos + 30])[0]
        if bytes(data[pos + 46 : pos + 46 + nlen]) == name:
            break
        pos += 4
    data[pos + 24 : pos + 28] = struct.pack("<I", 0xFFFFFFF0)  # uncompressed size
    assert info.file_size < 0xFFFFFFF0
    out = tmp / "bad.pfpkg"
    out.write_bytes(bytes(data))
    return out


def _bomb_manifest(pkg: Path, tmp: Path, keys: dict) -> Path:
    members = _members(pkg)
    manifest = json.loads(members["manifest.json"])
    manifest["files"]["model.onnx"]["size"] = 1 << 50
    return _write(tmp / "bad.pfpkg", _resigned(members, manifest, keys["good"]["private_key"]))


def _malformed_manifest(pkg: Path, tmp: Path, keys: dict) -> Path:
    members = _members(pkg)
    raw = b'{"name": "mm", "version": 3,'  # truncated JSON, correctly signed
    return _write(
        tmp / "bad.pfpkg",
        {**members, "manifest.json": raw, "manifest.sig": sign_bytes(raw, keys["good"]["private_key"])},
    )


def _noncanonical_manifest(pkg: Path, tmp: Path, keys: dict) -> Path:
    members = _members(pkg)
    raw = json.dumps(json.loads(members["manifest.json"]), indent=2).encode()
    return _write(
        tmp / "bad.pfpkg",
        {**members, "manifest.json": raw, "manifest.sig": sign_bytes(raw, keys["good"]["private_key"])},
    )


def _manifest_missing_field(pkg: Path, tmp: Path, keys: dict) -> Path:
    members = _members(pkg)
    manifest = json.loads(members["manifest.json"])
    del manifest["expires"]
    return _write(tmp / "bad.pfpkg", _resigned(members, manifest, keys["good"]["private_key"]))


def _malformed_signature(pkg: Path, tmp: Path, keys: dict) -> Path:
    return _write(tmp / "bad.pfpkg", {**_members(pkg), "manifest.sig": b"{not json"})


def _signature_not_base64(pkg: Path, tmp: Path, keys: dict) -> Path:
    sig = {"alg": "ed25519", "key_id": keys["good"]["key_id"], "signature": "!!!"}
    return _write(tmp / "bad.pfpkg", {**_members(pkg), "manifest.sig": json.dumps(sig).encode()})


def _not_a_zip(pkg: Path, tmp: Path, keys: dict) -> Path:
    out = tmp / "bad.pfpkg"
    out.write_bytes(b"this is not a zip archive at all" * 10)
    return out


def _compressed(pkg: Path, tmp: Path, keys: dict) -> Path:
    return _write(tmp / "bad.pfpkg", _members(pkg), compress=zipfile.ZIP_DEFLATED)


def _duplicate(pkg: Path, tmp: Path, keys: dict) -> Path:
    out = _write(tmp / "bad.pfpkg", _members(pkg))
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(out, "a") as zf:
        zf.writestr("model.onnx", b"second copy")
    return out


REJECTIONS: dict[str, tuple[Bad, type[VerificationError], str]] = {
    "bad-signature": (_bad_signature, BadSignatureError, "does not verify with key"),
    "forged-key-id": (_forged_key_id, BadSignatureError, "does not verify with key"),
    "untrusted-key": (_untrusted, UntrustedKeyError, "which is not trusted"),
    "unsigned": (_unsigned, UnsignedPackageError, "manifest.sig is missing"),
    "changed-file": (_changed_same_size, FileMismatchError, "'model.onnx' does not match its SHA-256"),
    "changed-size": (_changed_size, FileMismatchError, "'model.onnx' is"),
    "flipped-in-place": (_flipped_in_place, FileMismatchError, "'model.onnx'"),
    "missing-file": (_missing, MissingFileError, "'model.onnx' listed in the manifest is missing"),
    "missing-manifest": (_missing_manifest, MissingFileError, "manifest.json is missing"),
    "extra-file": (_extra, UnexpectedFileError, "'payload.sh' is not listed"),
    "expired": (_expired, ExpiredPackageError, "expired at 2021-01-01T00:00:00Z"),
    "path-dotdot": (_member_path("../evil.sh"), UnsafePathError, "'../evil.sh'"),
    "path-absolute": (_member_path("/etc/evil"), UnsafePathError, "'/etc/evil'"),
    "path-backslash": (_member_path("..\\evil.sh"), UnsafePathError, "'..\\\\evil.sh'"),
    "path-drive": (_member_path("C:evil.sh"), UnsafePathError, "'C:evil.sh'"),
    "path-in-manifest": (_manifest_path, UnsafePathError, "'../escape.onnx'"),
    "bomb-zip-header": (_bomb_header, OversizeError, "'model.onnx' declares 4294967280 bytes"),
    "bomb-manifest-size": (_bomb_manifest, OversizeError, f"declares {1 << 50} bytes for 'model.onnx'"),
    "malformed-manifest": (_malformed_manifest, MalformedManifestError, "not valid JSON"),
    "noncanonical-manifest": (_noncanonical_manifest, MalformedManifestError, "not in canonical form"),
    "manifest-missing-field": (_manifest_missing_field, MalformedManifestError, "'expires' is missing"),
    "malformed-signature": (_malformed_signature, MalformedSignatureError, "not valid JSON"),
    "signature-not-base64": (_signature_not_base64, MalformedSignatureError, "not base64"),
    "not-a-zip": (_not_a_zip, NotAPackageError, "not a zip archive"),
    "compressed-member": (_compressed, MalformedPackageError, "is compressed"),
    "duplicate-member": (_duplicate, MalformedPackageError, "appears twice"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_verification_rejects(
    case: str, pkg: Path, tmp_path: Path, keys: dict, capsys: pytest.CaptureFixture
) -> None:
    make, error, fragment = REJECTIONS[case]
    bad = make(pkg, tmp_path, keys)
    with pytest.raises(error) as info:
        verify_package(bad, keys["good"]["public_key"])
    assert "bad.pfpkg" in str(info.value) and fragment in str(info.value)
    assert not isinstance(info.value, tuple(e for _, e, _ in REJECTIONS.values() if e is not error))
    # the CLI prints the same message and exits non-zero
    code = pocketfleet.main(["verify", str(bad), "--trust", keys["good"]["public_key"]])
    err = capsys.readouterr().err
    assert code == 4 and err.startswith("error: ") and fragment in err
    # extraction refuses it too and leaves no directory behind
    with pytest.raises(error):
        extract_package(bad, tmp_path / "dest", keys["good"]["public_key"])
    assert not (tmp_path / "dest").exists()


def test_member_size_limit_is_configurable(pkg: Path, keys: dict) -> None:
    with pytest.raises(OversizeError, match="more than the limit of 100"):
        verify_package(pkg, keys["good"]["public_key"], limits=Limits(max_member_bytes=100))
    with pytest.raises(OversizeError, match="4 members, more than the limit of 2"):
        verify_package(pkg, keys["good"]["public_key"], limits=Limits(max_members=2))


def test_expiry_is_checked_against_the_given_clock(pkg: Path, keys: dict) -> None:
    expires = read_manifest(pkg).expires_at
    verify_package(pkg, keys["good"]["public_key"], now=expires - timedelta(seconds=1))
    with pytest.raises(ExpiredPackageError):
        verify_package(pkg, keys["good"]["public_key"], now=expires)


# ---------------------------------------------------------------------------------------------- CLI


def _cli(*args: str, env: dict | None = None, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}\nimport sys\nfrom pocketfleet.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )




from tests.conftest import NO_TORCH  # noqa: E402


def test_cli_keys_sign_verify_inspect_without_torch(
    tmp_path: Path, model_file: Path, pkg: Path, keys: dict
) -> None:
    """On a device (no torch, no onnx): keys, sign, verify, inspect all work through the CLI."""
    unsigned = tmp_path / "u.pfpkg"
    build_package(model_file, FIELDS, _samples(), unsigned)
    r = _cli("keys", "generate", "--out", str(tmp_path / "k"), "--json", prelude=NO_TORCH)
    assert r.returncode == 0, r.stderr
    key_id = json.loads(r.stdout)["key_id"]
    r = _cli("sign", str(unsigned), "--key", str(tmp_path / "k" / "pocketfleet.key"), prelude=NO_TORCH)
    assert r.returncode == 0, r.stderr
    r = _cli(
        "verify",
        str(unsigned),
        "--trust",
        str(tmp_path / "k" / "pocketfleet.pub"),
        "--json",
        prelude=NO_TORCH,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) | {"files": None} == {
        "package": str(unsigned),
        "valid": True,
        "name": "mm",
        "version": 3,
        "format": "onnx",
        "dtype": "fp32",
        "expires": read_manifest(unsigned).expires,
        "files": None,
    }
    r = _cli("inspect", str(unsigned), "--json", prelude=NO_TORCH)
    assert r.returncode == 0 and json.loads(r.stdout)["key_id"] == key_id
    # the wrong trust: rejected, specific message, non-zero exit
    r = _cli("verify", str(unsigned), "--trust", keys["good"]["public_key"], prelude=NO_TORCH)
    assert r.returncode == 4 and "which is not trusted" in r.stderr and "Traceback" not in r.stderr
    r = _cli("inspect", str(unsigned), "--trust", keys["good"]["public_key"], prelude=NO_TORCH)
    assert r.returncode == 4 and "REJECTED: UntrustedKeyError" in r.stdout


def test_extract_and_smoke_test_without_torch(pkg: Path, keys: dict, tmp_path: Path) -> None:
    code = (
        NO_TORCH
        + f"""
from export import extract_package, Samples, check_samples
from export.runtimes import load_runtime
m = extract_package({str(pkg)!r}, {str(tmp_path / "x")!r}, {keys["good"]["public_key"]!r})
s = Samples.from_bytes(open({str(tmp_path / "x")!r} + '/' + m.samples['path'], 'rb').read(), m.samples)
print(check_samples(load_runtime({str(tmp_path / "x")!r} + '/' + m.model).run, s))
assert 'torch' not in sys.modules and 'onnx' not in sys.modules
"""
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "'y'" in r.stdout
