"""Root of trust (TUF root metadata via python-tuf): rotation thresholds, rollback, revocation, freeze,
an offline device catching up across rotations from a chain shipped in a package, and the keys CLI.

Real Ed25519 keys, real packages (a real ONNX model), the real agent model store."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from export import Samples, UntrustedKeyError, build_package, generate_keys, load_trust, verify_package
from export.errors import KeyFileError
from export.trust_root import (
    ExpiredRootError,
    MalformedRootError,
    RootRollbackError,
    RootSignatureError,
    RootTrust,
    attach_roots,
    init_root,
    load_root_trust,
    parse_root,
    rotate_root,
    sign_pending_root,
)
from pocketfleet.cli import main as pocketfleet_main
from tests.agent_fixtures import FIELDS, X, cli, conv_net
from tests.conftest import NO_TORCH


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Named key pairs: r1..r5 (root keys), p1..p4 (package-signing keys)."""
    base = tmp_path_factory.mktemp("keyring")
    return {n: generate_keys(base / n) for n in ("r1", "r2", "r3", "r4", "r5", "p1", "p2", "p3", "p4")}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    from export.runtimes import load_runtime

    path = conv_net(tmp_path_factory.mktemp("model") / "m.onnx", seed=3)
    return path, load_runtime(path).run({"image": X})["logits"]


def priv(keyring: dict, *names: str) -> list[str]:
    return [keyring[n]["private_key"] for n in names]


def pub(keyring: dict, *names: str) -> list[str]:
    return [keyring[n]["public_key"] for n in names]


def make_pkg(out: Path, model: tuple[Path, np.ndarray], version: int, key: str) -> Path:
    path, logits = model
    build_package(path, {**FIELDS, "name": "digits", "version": version}, Samples({"image": X}, {"logits": logits}),
                  out, key=key)
    return out


def repo_2of3(tmp_path: Path, keyring: dict) -> Path:
    repo = tmp_path / "repo"
    init_root(repo, priv(keyring, "r1", "r2", "r3"), pub(keyring, "p1"), threshold=2)
    return repo


def device_trust(tmp_path: Path, repo: Path, name: str = "device-trust") -> Path:
    """What provisioning puts on a device: a copy of the repository's current root.json."""
    d = tmp_path / name
    d.mkdir()
    shutil.copy(repo / "root.json", d / "root.json")
    return d


# ------------------------------------------------------------------------------------------ rotation


def test_new_root_signed_by_threshold_of_old_and_new_keys_is_accepted(tmp_path: Path, keyring: dict) -> None:
    repo = repo_2of3(tmp_path, keyring)
    dev = device_trust(tmp_path, repo)
    rotate_root(repo, priv(keyring, "r1", "r2"), add_package_keys=pub(keyring, "p2"))
    trust = load_root_trust(dev)
    assert trust.version == 1
    assert trust.catch_up({2: (repo / "root.2.json").read_bytes()}) == [2]
    assert trust.version == 2 and len(trust) == 2
    assert json.loads((dev / "root.json").read_bytes())["signed"]["version"] == 2  # persisted: no rollback


def test_rotation_below_old_threshold_is_refused(tmp_path: Path, keyring: dict) -> None:
    repo = repo_2of3(tmp_path, keyring)
    dev = device_trust(tmp_path, repo)
    with pytest.raises(RootSignatureError, match="1 of root v1's keys, needs 2"):
        rotate_root(repo, priv(keyring, "r1"), add_package_keys=pub(keyring, "p2"))
    assert not (repo / "root.2.json").exists()
    # a forged v2 that only one old key signed (written by hand, as an attacker holding r1 would) is refused
    forged = _sign_next(repo / "root.1.json", priv(keyring, "r1"), add_package=pub(keyring, "p4"))
    trust = load_root_trust(dev)
    with pytest.raises(RootSignatureError, match="needs 2"):
        trust.offer(forged)
    (dev / "root.2.json").write_bytes(forged)  # dropped into the trust directory: the agent must not start on it
    with pytest.raises(RootSignatureError):
        load_root_trust(dev)
    assert trust.version == 1 and set(trust) == set(load_trust(keyring["p1"]["public_key"]))


def test_new_root_needs_a_threshold_of_its_own_keys(tmp_path: Path, keyring: dict) -> None:
    repo = repo_2of3(tmp_path, keyring)
    # v2 hands the root over to r4 + r5 (2 of 2) but only the old keys sign it
    with pytest.raises(RootSignatureError, match="0 of its own root keys, needs 2"):
        rotate_root(repo, priv(keyring, "r1", "r2"), add_root_keys=pub(keyring, "r4", "r5"),
                    remove_root_keys=pub(keyring, "r1", "r2", "r3"), threshold=2)
    result = rotate_root(repo, priv(keyring, "r1", "r2", "r4", "r5"), add_root_keys=pub(keyring, "r4", "r5"),
                         remove_root_keys=pub(keyring, "r1", "r2", "r3"), threshold=2)
    assert result["version"] == 2 and result["root"]["threshold"] == 2 and len(result["root"]["keys"]) == 2
    # from now on the old root keys cannot sign anything
    with pytest.raises(RootSignatureError):
        rotate_root(repo, priv(keyring, "r4"), add_package_keys=pub(keyring, "p2"))
    with pytest.raises(KeyFileError, match="not a root key"):
        rotate_root(repo, priv(keyring, "r1", "r2", "r4"), add_package_keys=pub(keyring, "p2"))


def test_root_rollback_and_version_gaps_are_refused(tmp_path: Path, keyring: dict) -> None:
    repo = repo_2of3(tmp_path, keyring)
    dev = device_trust(tmp_path, repo)
    for p in ("p2", "p3"):
        rotate_root(repo, priv(keyring, "r1", "r2"), add_package_keys=pub(keyring, p))
    trust = load_root_trust(dev)
    with pytest.raises(RootRollbackError, match="does not follow the trusted root v1"):
        trust.offer((repo / "root.3.json").read_bytes())
    trust.offer((repo / "root.2.json").read_bytes())
    trust.offer((repo / "root.3.json").read_bytes())
    assert trust.version == 3
    for old in (1, 2, 3):
        with pytest.raises(RootRollbackError, match="not newer than the trusted root v3"):
            trust.offer((repo / f"root.{old}.json").read_bytes())
    # a restart reads the persisted v3 even if someone puts the old root.json back beside it
    shutil.copy(repo / "root.1.json", dev / "root.1.json")
    assert load_root_trust(dev).version == 3


def test_revoked_package_key_is_refused(tmp_path: Path, keyring: dict, model: tuple) -> None:
    repo = repo_2of3(tmp_path, keyring)
    dev = device_trust(tmp_path, repo)
    by_p1 = make_pkg(tmp_path / "p1.pfpkg", model, 1, keyring["p1"]["private_key"])
    assert verify_package(by_p1, dev).version == 1
    rotate_root(repo, priv(keyring, "r2", "r3"), add_package_keys=pub(keyring, "p2"),
                revoke_package_keys=[keyring["p1"]["key_id"]])
    shutil.copy(repo / "root.2.json", dev / "root.2.json")  # the new root reaches the trust directory
    with pytest.raises(UntrustedKeyError, match=keyring["p1"]["key_id"]):
        verify_package(by_p1, dev)
    by_p2 = make_pkg(tmp_path / "p2.pfpkg", model, 2, keyring["p2"]["private_key"])
    assert verify_package(by_p2, dev).version == 2
    r = cli("verify", str(by_p1), "--trust", str(dev), "--json", prelude=NO_TORCH)  # device footprint: no torch
    assert r.returncode == 4 and "not trusted" in r.stderr + r.stdout
    r = cli("verify", str(by_p2), "--trust", str(dev), "--json", prelude=NO_TORCH)
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == 2, r.stderr


def test_expired_root_freezes_installs_until_a_newer_root(tmp_path: Path, keyring: dict, model: tuple) -> None:
    repo = tmp_path / "repo"
    init_root(repo, priv(keyring, "r1"), pub(keyring, "p1"), expires_days=1)
    dev = device_trust(tmp_path, repo)
    pkg = make_pkg(tmp_path / "p.pfpkg", model, 1, keyring["p1"]["private_key"])
    later = datetime.now(timezone.utc) + timedelta(days=2)
    assert verify_package(pkg, dev).version == 1
    with pytest.raises(ExpiredRootError, match="root of trust v1 expired"):
        verify_package(pkg, dev, now=later)
    rotate_root(repo, priv(keyring, "r1"), expires_days=30)
    shipped = tmp_path / "p-roots.pfpkg"
    attach_roots(pkg, repo, keyring["p1"]["private_key"], out_path=shipped)
    assert verify_package(shipped, dev, now=later).version == 1  # the fresh v2 came inside the package
    assert load_root_trust(dev).version == 2


def test_key_holders_sign_a_pending_root_one_by_one(tmp_path: Path, keyring: dict) -> None:
    repo = repo_2of3(tmp_path, keyring)
    first = rotate_root(repo, priv(keyring, "r1"), add_package_keys=pub(keyring, "p2"), partial=True)
    assert first["pending"] and "needs 2" in first["missing"]
    assert not (repo / "root.2.json").exists() and load_root_trust(repo).version == 1  # not in effect
    r = cli("keys", "sign-root", "--repo", str(repo), "--key", keyring["r3"]["private_key"], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pending"] is False
    assert load_root_trust(repo).version == 2 and not (repo / "root.2.pending.json").exists()
    with pytest.raises(KeyFileError, match="no pending root v3"):
        sign_pending_root(repo, priv(keyring, "r1"))


# ---------------------------------------------------------------------------------- offline catch-up


def test_offline_agent_catches_up_across_three_rotations(tmp_path: Path, keyring: dict, model: tuple) -> None:
    from edge_agent.store import ModelStore

    repo = repo_2of3(tmp_path, keyring)
    dev = device_trust(tmp_path, repo)
    store = ModelStore(tmp_path / "state", dev)
    assert store.install(make_pkg(tmp_path / "v1.pfpkg", model, 1, keyring["p1"]["private_key"])).version == 1
    # the device goes offline; meanwhile: v2 replaces the package key, v3 replaces two root keys,
    # v4 raises the threshold to 3 of 3 and revokes p2 again for p3
    rotate_root(repo, priv(keyring, "r1", "r2"), add_package_keys=pub(keyring, "p2"), revoke_package_keys=pub(keyring, "p1"))
    rotate_root(repo, priv(keyring, "r1", "r3", "r4", "r5"), add_root_keys=pub(keyring, "r4", "r5"),
                remove_root_keys=pub(keyring, "r1", "r2"))
    rotate_root(repo, priv(keyring, "r3", "r4", "r5"), threshold=3, add_package_keys=pub(keyring, "p3"),
                revoke_package_keys=pub(keyring, "p2"))
    v2 = make_pkg(tmp_path / "v2.pfpkg", model, 2, keyring["p3"]["private_key"])
    with pytest.raises(UntrustedKeyError):  # without the chain the device cannot know p3
        store.install(v2)
    shipped = tmp_path / "v2-roots.pfpkg"
    r = cli("sign", str(v2), "--key", keyring["p3"]["private_key"], "--roots", str(repo), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["roots"] == [1, 2, 3, 4]
    shutil.copy(v2, shipped)
    result = store.install(shipped)
    assert result.version == 2
    assert isinstance(store.trust, RootTrust) and store.trust.version == 4
    assert set(store.trust) == {keyring["p3"]["key_id"]}
    assert sorted(p.name for p in dev.glob("root.*.json")) == ["root.2.json", "root.3.json", "root.4.json"]
    # after a restart the device stays on v4: an old package key is refused
    old = make_pkg(tmp_path / "v3-old-key.pfpkg", model, 3, keyring["p1"]["private_key"])
    with pytest.raises(UntrustedKeyError):
        ModelStore(tmp_path / "state", dev).install(old)


def test_a_bad_root_in_a_package_refuses_the_package(tmp_path: Path, keyring: dict, model: tuple) -> None:
    repo = repo_2of3(tmp_path, keyring)
    dev = device_trust(tmp_path, repo)
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(repo / "root.1.json", evil / "root.1.json")
    (evil / "root.2.json").write_bytes(_sign_next(repo / "root.1.json", priv(keyring, "r1"), add_package=pub(keyring, "p4")))
    shutil.copy(evil / "root.2.json", evil / "root.json")
    pkg = make_pkg(tmp_path / "p.pfpkg", model, 1, keyring["p4"]["private_key"])
    with pytest.raises(RootSignatureError):  # the packager checks its own chain first
        attach_roots(pkg, evil, keyring["p4"]["private_key"])
    _attach_unchecked(pkg, {1: (evil / "root.1.json").read_bytes(), 2: (evil / "root.2.json").read_bytes()},
                      keyring["p4"]["private_key"])
    with pytest.raises(RootSignatureError, match="root.2.json"):
        verify_package(pkg, dev)
    assert load_root_trust(dev).version == 1


def test_pub_file_trust_directories_still_work(tmp_path: Path, keyring: dict, model: tuple) -> None:
    d = tmp_path / "trust"
    d.mkdir()
    shutil.copy(keyring["p1"]["public_key"], d / "p1.pub")
    pkg = make_pkg(tmp_path / "p.pfpkg", model, 1, keyring["p1"]["private_key"])
    assert not isinstance(load_trust(d), RootTrust)
    assert verify_package(pkg, d).version == 1


NO_CRYPTO = NO_TORCH + "BLOCKED = BLOCKED + ('cryptography',)\n"  # the lean device extras lack it


def test_a_device_without_cryptography_verifies_packages_and_roots(tmp_path: Path, keyring: dict, model: tuple) -> None:
    """agent-onnx / agent-tflite leave pyca/cryptography out: verification falls back to pure-Python Ed25519
    (securesystemslib); a tampered signature, an untrusted and a revoked key are still refused."""
    import subprocess
    import sys

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from securesystemslib.signer import SSlibKey

    from export.ed25519 import PublicKey
    from export.signing import load_private_key
    from export.trust_root import _sslib_key

    private = load_private_key(keyring["p1"]["private_key"])
    assert _sslib_key(PublicKey.of(private)).keyid == SSlibKey.from_crypto(private.public_key()).keyid
    data = b"manifest bytes"
    check = f"""
from export.ed25519 import PublicKey, have_cryptography
assert not have_cryptography()
k = PublicKey.from_pem(open({keyring["p1"]["public_key"]!r}, "rb").read(), "p1.pub")
sig = bytes.fromhex({private.sign(data).hex()!r})
assert k.verify(sig, {data!r}) and not k.verify(sig, {data!r} + b"x")
assert not k.verify(bytes.fromhex({Ed25519PrivateKey.generate().sign(data).hex()!r}), {data!r})
from cloud_sync.fl.secagg import SecAggClient
from cloud_sync.fl.errors import SecAggError
try:
    SecAggClient("d1", 4, 2)
except SecAggError as exc:
    print("secagg:", exc)
"""
    r = subprocess.run([sys.executable, "-c", NO_CRYPTO + check], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "secure aggregation needs the 'cryptography' package" in r.stdout

    repo = repo_2of3(tmp_path, keyring)
    dev = device_trust(tmp_path, repo)
    by_p1 = make_pkg(tmp_path / "p1.pfpkg", model, 1, keyring["p1"]["private_key"])
    r = cli("verify", str(by_p1), "--trust", str(dev), "--json", prelude=NO_CRYPTO)
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == 1, r.stderr
    rotate_root(repo, priv(keyring, "r2", "r3"), add_package_keys=pub(keyring, "p2"),
                revoke_package_keys=[keyring["p1"]["key_id"]])
    shutil.copy(repo / "root.2.json", dev / "root.2.json")
    r = cli("verify", str(by_p1), "--trust", str(dev), "--json", prelude=NO_CRYPTO)
    assert r.returncode == 4 and "not trusted" in r.stderr + r.stdout
    r = cli("verify", str(by_p1), "--trust", keyring["p2"]["public_key"], prelude=NO_CRYPTO)
    assert r.returncode == 4 and "not trusted" in r.stderr + r.stdout


@pytest.mark.parametrize("mutate", ["not json", "wrong type", "rsa scheme", "keyid", "package threshold", "sig hex"])
def test_malformed_root_files_are_refused_with_one_error(tmp_path: Path, keyring: dict, mutate: str) -> None:
    repo = repo_2of3(tmp_path, keyring)
    doc = json.loads((repo / "root.1.json").read_bytes())
    kid = next(iter(doc["signed"]["keys"]))
    if mutate == "not json":
        raw = b"[[[[" * 1000
    else:
        if mutate == "wrong type":
            doc["signed"]["_type"] = "targets"
        elif mutate == "rsa scheme":
            doc["signed"]["keys"][kid]["scheme"] = "rsassa-pss-sha256"
        elif mutate == "keyid":
            doc["signed"]["keys"]["ab" * 32] = doc["signed"]["keys"].pop(kid)
        elif mutate == "package threshold":
            doc["signed"]["roles"]["targets"]["threshold"] = 2
        elif mutate == "sig hex":
            doc["signatures"][0]["sig"] = "zz"
        raw = json.dumps(doc).encode()
    with pytest.raises(MalformedRootError):
        parse_root(raw, "root.1.json")


# ------------------------------------------------------------------------------------------------ CLI


def test_keys_cli_init_rotate_show_json(tmp_path: Path, keyring: dict) -> None:
    repo = tmp_path / "repo"
    args = ["keys", "init-root", "--out", str(repo), "--threshold", "2", "--json"]
    for k in priv(keyring, "r1", "r2", "r3"):
        args += ["--root-key", k]
    r = cli(*args, "--package-key", keyring["p1"]["public_key"])
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["version"] == 1 and doc["root"]["threshold"] == 2 and len(doc["root"]["keys"]) == 3
    assert doc["packages"]["keys"][0]["key_id"] == keyring["p1"]["key_id"]
    r = cli("keys", "rotate", "--repo", str(repo), "--key", keyring["r1"]["private_key"],
            "--add-package-key", keyring["p2"]["public_key"], "--json")
    assert r.returncode == 4 and "needs 2" in r.stderr
    r = cli("keys", "rotate", "--repo", str(repo), "--key", keyring["r1"]["private_key"], "--key",
            keyring["r3"]["private_key"], "--revoke-package-key", keyring["p1"]["key_id"],
            "--add-package-key", keyring["p2"]["public_key"], "--json")
    assert r.returncode == 0, r.stderr
    assert [k["key_id"] for k in json.loads(r.stdout)["packages"]["keys"]] == [keyring["p2"]["key_id"]]
    r = cli("keys", "show", str(repo), "--json")
    shown = json.loads(r.stdout)
    assert r.returncode == 0 and shown["version"] == 2 and shown["chain"] == [1, 2] and not shown["expired"]
    assert pocketfleet_main(["keys", "show", str(repo)]) == 0


# --------------------------------------------------------------------------------------------- helpers


def _sign_next(root_file: Path, keys: list[str], add_package: list[str]) -> bytes:
    """A next root version signed by `keys`, built with python-tuf directly (no pocketfleet checks)."""
    from tuf.api.metadata import Metadata

    from export.trust_root import _public, _serialize, _signer, _sslib_key

    meta = Metadata.from_bytes(root_file.read_bytes())
    meta.signed.version += 1
    for k in add_package:
        meta.signed.add_key(_sslib_key(_public(k)), "targets")
    meta.signatures.clear()
    for k in keys:
        meta.sign(_signer(k), append=True)
    return _serialize(meta)


def _attach_unchecked(pkg: Path, roots: dict[int, bytes], key: str) -> None:
    """Put roots into a package and re-sign it, skipping attach_roots' own chain check."""
    import hashlib
    import zipfile

    from export import canonical_json
    from export.signing import sign_bytes

    with zipfile.ZipFile(pkg) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    manifest = json.loads(members["manifest.json"])
    for v, raw in roots.items():
        name = f"trust/root.{v}.json"
        members[name] = raw
        manifest["files"][name] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    members["manifest.json"] = canonical_json(manifest)
    members["manifest.sig"] = sign_bytes(members["manifest.json"], key)
    with zipfile.ZipFile(pkg, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
