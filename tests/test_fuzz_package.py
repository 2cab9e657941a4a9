"""Fuzzing the package reader, manifest checker, signature parser and root-of-trust parser: whatever the
bytes, only VerificationError subclasses (exit 4) come out, within the profile's deadline."""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from export import (
    VerificationError,
    build_package,
    canonical_json,
    extract_package,
    generate_keys,
    inspect_package,
    load_trust,
    verify_package,
)
from export.package import parse_manifest
from export.signing import parse_signature
from export.specs import TensorSpec
from export.trust_root import MalformedRootError, init_root, parse_root
from tests.fuzz_helpers import examples, huge_int, huge_ints, json_values, mutated, nested

FIELDS = {
    "name": "fz",
    "version": 1,
    "format": "onnx",
    "dtype": "fp32",
    "inputs": [TensorSpec("x", ("batch", 4), "float32")],
    "outputs": [TensorSpec("y", ("batch", 3), "float32")],
}
NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
SETTINGS = {"suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("fuzz-pkg")
    keys = generate_keys(base / "keys")
    pkg = base / "fz.pfpkg"
    build_package({"model.onnx": b"\x08\x07model-bytes" * 8, "head.bin": b"h" * 40}, FIELDS, None, pkg,
                  key=keys["private_key"], now=datetime(2026, 1, 1, tzinfo=timezone.utc))
    raw = pkg.read_bytes()
    central = raw.find(b"PK\x01\x02")
    end = raw.find(b"PK\x05\x06")
    regions = [(central, end), (end, len(raw))]
    locals_ = [(i, i + 30) for i in range(len(raw)) if raw.startswith(b"PK\x03\x04", i)]
    repo = base / "repo"
    init_root(repo, [keys["private_key"]], [keys["public_key"]])
    return World({"base": base, "raw": raw, "regions": regions + locals_, "trust": load_trust(keys["public_key"]),
            "manifest": json.loads(zipfile.ZipFile(pkg).read("manifest.json")), "key": keys["private_key"],
            "root": (repo / "root.1.json").read_bytes()})


class World(dict):
    """The fixture's data, with a short repr so that hypothesis' failure reports stay readable."""

    def __repr__(self) -> str:
        return f"World({sorted(self)})"


_COUNT = {"n": 0}


def _file(world: dict, data: bytes) -> Path:
    _COUNT["n"] += 1
    path = world["base"] / f"case-{_COUNT['n']}.pfpkg"
    path.write_bytes(data)
    return path


def _all_readers(world: dict, path: Path) -> None:
    for call in (
        lambda: verify_package(path, world["trust"], now=NOW),
        lambda: extract_package(path, world["base"] / f"out-{_COUNT['n']}", world["trust"], now=NOW),
        lambda: inspect_package(path),
    ):
        with contextlib.suppress(VerificationError):
            call()


def _version_needed(raw: bytes) -> bytes:
    """Found by the deep profile: 'version needed to extract' 8.4 in the central directory makes
    zipfile.ZipFile() raise NotImplementedError."""
    data = bytearray(raw)
    data[raw.find(b"PK\x01\x02") + 6] = 84
    return bytes(data)


def _encrypted_flag(raw: bytes) -> bytes:
    """The issue-12 case: the 'encrypted' bit set in the first central-directory entry."""
    data = bytearray(raw)
    data[raw.find(b"PK\x01\x02") + 8] |= 1
    return bytes(data)


@settings(max_examples=examples(150), **SETTINGS)
@given(data=st.data())
def test_package_reader_mutated_packages(world: dict, data: st.DataObject) -> None:
    raw = data.draw(mutated(world["raw"], world["regions"]))
    _all_readers(world, _file(world, raw))


def test_package_reader_regressions(world: dict) -> None:
    for raw in (_encrypted_flag(world["raw"]), _version_needed(world["raw"]), world["raw"][:-22],
                b"PK\x05\x06" + b"\0" * 18):
        _all_readers(world, _file(world, raw))


@settings(max_examples=examples(40), **SETTINGS)
@given(raw=st.binary(max_size=512))
def test_random_bytes_are_not_a_package(world: dict, raw: bytes) -> None:
    _all_readers(world, _file(world, raw))


@settings(max_examples=examples(60), **SETTINGS)
@given(members=st.dictionaries(st.text(min_size=1, max_size=30), st.binary(max_size=64), min_size=1, max_size=5),
       sig=st.one_of(st.none(), st.binary(max_size=200), st.just(nested(2000))))
def test_crafted_zip_members(world: dict, members: dict, sig: bytes | None) -> None:
    """Zips with arbitrary member names (unicode, '..', '/x', 'a\\n'), a signed manifest and any signature."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("manifest.json", canonical_json(world["manifest"]))
        if sig is not None:
            zf.writestr("manifest.sig", sig)
        for name, blob in members.items():
            with contextlib.suppress(Exception):  # names zipfile itself cannot write are not a reader case
                zf.writestr(name, blob)
    _all_readers(world, _file(world, buf.getvalue()))


FIELD_KEYS = ["format_version", "name", "version", "created", "expires", "format", "dtype", "model", "inputs",
              "outputs", "files", "samples", "trainable_head", "report", "extra", "device", "workload",
              "files.model.onnx.size", "files.model.onnx.sha256", "inputs.0", "new-field"]
EDGE_VALUES = st.sampled_from(["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "2026-13-01T00:00:00Z",
                               "fz\n", 2**64, -1, 10**400, [], {}, "model.onnx\n", "trust/root.2.json"])
# one to three edits: (field, value) replaces, (field, None-marker) deletes
patches = st.lists(st.tuples(st.sampled_from(FIELD_KEYS), st.one_of(json_values, EDGE_VALUES), st.booleans()),
                   min_size=1, max_size=3)


def _patched(base: dict, edits: list) -> dict:
    doc = json.loads(json.dumps(base))
    for key, value, delete in edits:
        if key.startswith("files.model.onnx."):
            entry = doc.get("files", {}).get("model.onnx") if isinstance(doc.get("files"), dict) else None
            if isinstance(entry, dict):
                entry[key.rsplit(".", 1)[1]] = value
        elif key == "inputs.0":
            doc["inputs"] = [value]
        elif delete and key in doc:
            del doc[key]
        else:
            doc[key] = value
    return doc


@settings(max_examples=examples(200), **SETTINGS)
@example(edits=[("expires", "9999-12-31T23:59:59-23:59", False)])  # issue 12: OverflowError
@example(edits=[("created", "0001-01-01T00:00:00+23:59", False)])
@example(edits=[("version", 10**400, False)])
@example(edits=[("name", "fz\n", False)])
@example(edits=[("inputs.0", 7, False)])  # found by fuzzing: AttributeError from TensorSpec.from_dict
@given(edits=patches)
def test_manifest_checker(world: dict, edits: list) -> None:
    _check_manifest(world, _patched(world["manifest"], edits))


@settings(max_examples=examples(60), **SETTINGS)
@example(raw=nested(100_000))
@example(raw=huge_int(5000, "version"))
@given(raw=st.one_of(st.binary(max_size=200), huge_ints, json_values.map(lambda v: json.dumps(v).encode())))
def test_manifest_bytes_parser(raw: bytes) -> None:
    with contextlib.suppress(VerificationError):
        parse_manifest(raw, "fuzz")


def _check_manifest(world: dict, doc: dict) -> None:
    try:
        raw = canonical_json(doc)
    except ValueError:
        return
    try:
        m = parse_manifest(raw, "fuzz")
        m.expires_at, m.created_at  # noqa: B018 - the verifier reads both
    except VerificationError:
        pass
    # and through a whole signed package (the verifier's own path)
    from export.signing import sign_bytes

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("manifest.json", raw)
        zf.writestr("manifest.sig", sign_bytes(raw, world["key"]))
        zf.writestr("model.onnx", b"\x08\x07model-bytes" * 8)
        zf.writestr("head.bin", b"h" * 40)
    _all_readers(world, _file(world, buf.getvalue()))


@settings(max_examples=examples(100), **SETTINGS)
@example(raw=nested(2048))
@example(raw=huge_int(4400, "alg"))  # a 4,400-digit integer: json's ValueError, not JSONDecodeError
@example(raw=b'{"alg":"ed25519","key_id":"00","signature":"' + b"A" * 3000 + b'"}')
@given(raw=st.one_of(st.binary(max_size=300), huge_ints, json_values.map(lambda v: json.dumps(v).encode()),
                     st.fixed_dictionaries({"alg": st.sampled_from(["ed25519", "rsa"]), "key_id": st.text(max_size=20),
                                            "signature": st.text(max_size=100)}).map(lambda v: json.dumps(v).encode())))
def test_signature_parser(raw: bytes) -> None:
    try:
        sig = parse_signature(raw, "fuzz")
    except VerificationError:
        return
    assert len(sig["signature_bytes"]) == 64


@settings(max_examples=examples(100), **SETTINGS)
@given(data=st.data())
def test_root_parser_mutations(world: dict, data: st.DataObject) -> None:
    with contextlib.suppress(MalformedRootError):
        parse_root(data.draw(mutated(world["root"])), "fuzz")


@settings(max_examples=examples(60), **SETTINGS)
@example(raw=nested(5000))
@given(raw=st.one_of(st.binary(max_size=200),
                     json_values.map(lambda v: json.dumps({"signed": v, "signatures": []}).encode())))
def test_root_parser_bytes(raw: bytes) -> None:
    with contextlib.suppress(MalformedRootError):
        parse_root(raw, "fuzz")
