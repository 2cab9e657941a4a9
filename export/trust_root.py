"""A TUF-style root of trust for package-signing keys, on python-tuf's metadata API (torch-free).

The root (`root.json`, TUF root metadata) names two roles:
- `root`: the keys (and threshold) that may sign the next root version;
- `targets`: the package-signing keys; a package's manifest.sig must come from one of them.
(`snapshot` and `timestamp` exist because TUF's Root requires them; pocketfleet leaves them empty.)

Rotation: root version N+1 is accepted only when it is signed by a threshold of root N's root keys AND
a threshold of its own root keys (`Root.get_root_verification_result`). A device walks the chain
root.{N+1}.json, root.{N+2}.json, ... one version at a time, from its trust directory or from
`trust/root.<N>.json` members shipped inside a package, so a device that was offline across several
rotations catches up; every accepted version is persisted as root.json (no rollback). A key removed
from `targets` (revoked) no longer verifies any package; an expired current root refuses every package
(no freeze). Format and commands: docs/package-format.md ("Root of trust").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.ed25519 import PublicKey
from export.errors import KeyFileError, VerificationError
from export.signing import canonical_json, key_id, load_private_key, load_public_key

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from tuf.api.metadata import Metadata, Root

log = logging.getLogger("pocketfleet.trust")

ROOT_FILE = "root.json"
PACKAGE_ROLE = "targets"
ROOT_ROLE = "root"
MEMBER_DIR = "trust"  # package members trust/root.<N>.json
MAX_ROOT_BYTES = 256 * 1024
MAX_CHAIN_STEPS = 1024  # versions one catch-up may walk
MAX_CANDIDATES = 4096  # chain files looked at in one directory scan
DEFAULT_ROOT_DAYS = 365
_CHAIN_RE = re.compile(r"root\.([1-9][0-9]{0,8})\.json")
_MEMBER_RE = re.compile(rf"{MEMBER_DIR}/root\.([1-9][0-9]{{0,8}})\.json")
_SIG_RE = re.compile(r"[0-9a-f]{128}")


class TrustRootError(VerificationError):
    """A root of trust is unusable or a new root version was refused (exit 4)."""


class MalformedRootError(TrustRootError):
    """A root file is not valid TUF root metadata for pocketfleet (JSON, roles, Ed25519 keys, size)."""


class RootSignatureError(TrustRootError):
    """A new root is not signed by a threshold of the previous root's keys and of its own keys."""


class RootRollbackError(TrustRootError):
    """A root version that is not newer than the trusted one (or that skips a version) was offered."""


class ExpiredRootError(TrustRootError):
    """The current root of trust has expired: no package is accepted until a newer root arrives."""


# ------------------------------------------------------------------------------------------ parsing


def _tuf() -> Any:
    """python-tuf's metadata module (imported on first use: only root-mode trust needs it)."""
    from tuf.api import metadata

    return metadata


def parse_root(raw: bytes, where: str) -> Metadata[Root]:
    """Parse root metadata bytes; MalformedRootError names `where` for anything pocketfleet does not accept."""
    md = _tuf()
    if len(raw) > MAX_ROOT_BYTES:
        raise MalformedRootError(f"{where}: root metadata is {len(raw)} bytes, more than {MAX_ROOT_BYTES}")
    try:
        meta = md.Metadata.from_bytes(raw)
    except Exception as exc:  # tuf's DeserializationError, or anything json/dataclass parsing raises
        raise MalformedRootError(f"{where}: not TUF root metadata ({_reason(exc)})") from exc
    root = meta.signed
    if not isinstance(root, md.Root):
        raise MalformedRootError(f"{where}: metadata type is {root.type!r}, expected 'root'")
    for kid, key in root.keys.items():
        public = _ed25519(key, where)
        if _sslib_key(public).keyid != kid:
            raise MalformedRootError(f"{where}: key id {kid[:16]}... is not the SHA-256 id of its key")
    for role_name in (ROOT_ROLE, PACKAGE_ROLE):
        role = root.roles[role_name]
        missing = [k for k in role.keyids if k not in root.keys]
        if missing:
            raise MalformedRootError(f"{where}: role {role_name!r} names unknown key {missing[0][:16]}...")
        if len(role.keyids) < role.threshold:
            raise MalformedRootError(
                f"{where}: role {role_name!r} has threshold {role.threshold} but only {len(role.keyids)} keys"
            )
    if root.roles[PACKAGE_ROLE].threshold != 1:
        raise MalformedRootError(f"{where}: the package role ({PACKAGE_ROLE!r}) must have threshold 1 "
                                 "(manifest.sig carries one signature)")
    for kid, sig in meta.signatures.items():
        if not isinstance(sig.signature, str) or not _SIG_RE.fullmatch(sig.signature):
            raise MalformedRootError(f"{where}: signature by {kid[:16]}... is not 128 lowercase hex digits")
    return meta


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _ed25519(key: Any, where: str) -> PublicKey:
    if key.keytype != "ed25519" or key.scheme != "ed25519":
        raise MalformedRootError(f"{where}: key {key.keyid[:16]}... is {key.keytype}/{key.scheme}, expected ed25519")
    public = key.keyval.get("public") if isinstance(key.keyval, dict) else None
    if not isinstance(public, str) or not re.fullmatch(r"[0-9a-f]{64}", public):
        raise MalformedRootError(f"{where}: key {key.keyid[:16]}... is not a 32-byte hex Ed25519 public key")
    return PublicKey(bytes.fromhex(public))


def _sslib_key(public: PublicKey) -> Any:
    """The TUF key for `public`, with securesystemslib's default key id (SHA-256 of its canonical JSON;
    the same as SSlibKey.from_crypto, computed here so that a device needs no pyca/cryptography)."""
    from securesystemslib.signer import SSlibKey

    fields = {"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": public.raw.hex()}}
    return SSlibKey(hashlib.sha256(canonical_json(fields)).hexdigest(), **fields)


def package_keys(meta: Metadata[Root], where: str = ROOT_FILE) -> dict[str, PublicKey]:
    """pocketfleet key id (16 hex) -> public key, for every key of the package role."""
    root = meta.signed
    keys = (_ed25519(root.keys[k], where) for k in root.roles[PACKAGE_ROLE].keyids)
    return {key_id(k): k for k in keys}


def verify_self(meta: Metadata[Root], where: str) -> None:
    """A root must meet its own root threshold (checked for the pinned root and every new one)."""
    result = meta.signed.get_root_verification_result(None, meta.signed_bytes, meta.signatures)
    if not result.second.verified:
        raise RootSignatureError(
            f"{where}: root v{meta.signed.version} is signed by {len(result.second.signed)} of its own root keys, "
            f"needs {result.second.threshold}"
        )


def verify_next(trusted: Metadata[Root], new: Metadata[Root], where: str) -> None:
    """Accept `new` as the successor of `trusted` or raise (rollback, gap, thresholds)."""
    old_v, new_v = trusted.signed.version, new.signed.version
    if new_v <= old_v:
        raise RootRollbackError(f"{where}: root v{new_v} is not newer than the trusted root v{old_v}")
    if new_v != old_v + 1:
        raise RootRollbackError(f"{where}: root v{new_v} does not follow the trusted root v{old_v} (needs v{old_v + 1})")
    try:
        result = new.signed.get_root_verification_result(trusted.signed, new.signed_bytes, new.signatures)
    except Exception as exc:  # securesystemslib raises on a signature it cannot even parse
        raise RootSignatureError(f"{where}: root v{new_v} signatures cannot be checked ({_reason(exc)})") from exc
    if not result.first.verified:
        raise RootSignatureError(
            f"{where}: root v{new_v} is signed by {len(result.first.signed)} of root v{old_v}'s keys, "
            f"needs {result.first.threshold}"
        )
    if not result.second.verified:
        raise RootSignatureError(
            f"{where}: root v{new_v} is signed by {len(result.second.signed)} of its own root keys, "
            f"needs {result.second.threshold}"
        )


def _expires(meta: Metadata[Root]) -> datetime:
    exp = meta.signed.expires
    return exp if exp.tzinfo else exp.replace(tzinfo=timezone.utc)


# ---------------------------------------------------------------------------------------- the device


def is_root_path(path: str | Path) -> bool:
    """True when `path` is root-mode trust: a directory holding root.json, or a *.json root file."""
    p = Path(path)
    if p.is_dir():
        return (p / ROOT_FILE).is_file()
    return p.suffix == ".json" and p.is_file()


class RootTrust(dict[str, PublicKey]):
    """The package-signing keys of the current trusted root (a `Trust` dict: key id -> public key).

    The dict is updated in place when the root advances, so holders of it (the agent's model store)
    see rotations and revocations at once. `catch_up` walks newer root versions; `check_fresh` refuses
    an expired root.
    """

    def __init__(self, meta: Metadata[Root], directory: Path | None, where: str) -> None:
        super().__init__(package_keys(meta, where))
        self._meta = meta
        self.directory = directory
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return int(self._meta.signed.version)

    @property
    def expires(self) -> datetime:
        return _expires(self._meta)

    @property
    def metadata(self) -> Metadata[Root]:
        return self._meta

    def check_fresh(self, now: datetime | None = None, where: str = "trust") -> None:
        moment = now or datetime.now(timezone.utc)
        if self.expires <= moment:
            raise ExpiredRootError(
                f"{where}: the root of trust v{self.version} expired at {self.expires:%Y-%m-%dT%H:%M:%SZ}: "
                "no package is accepted until a newer root (root.<N>.json) arrives"
            )

    def directory_candidates(self) -> dict[int, bytes]:
        """root.<N>.json files in the trust directory newer than the current root."""
        if self.directory is None:
            return {}
        out: dict[int, bytes] = {}
        try:
            entries = sorted(os.listdir(self.directory))[:MAX_CANDIDATES]
        except OSError:
            return {}
        for name in entries:
            m = _CHAIN_RE.fullmatch(name)
            if m is None or int(m.group(1)) <= self.version:
                continue
            with contextlib.suppress(OSError):
                path = self.directory / name
                if path.stat().st_size <= MAX_ROOT_BYTES:
                    out[int(m.group(1))] = path.read_bytes()
        return out

    def catch_up(self, candidates: Mapping[int, bytes] | None = None, where: str = "trust") -> list[int]:
        """Accept root versions N+1, N+2, ... from `candidates` (version -> bytes) and the trust directory.

        Every accepted version is kept (in memory, and as root.json / root.<N>.json in the directory when
        it is writable) before the next is checked; the first refused version raises. Returns the
        versions accepted.
        """
        with self._lock:
            offered = {**self.directory_candidates(), **dict(candidates or {})}
            accepted: list[int] = []
            for _ in range(MAX_CHAIN_STEPS):
                raw = offered.get(self.version + 1)
                if raw is None:
                    break
                label = f"{where}: root.{self.version + 1}.json"
                new = parse_root(raw, label)
                verify_next(self._meta, new, label)
                self._advance(new, raw)
                accepted.append(self.version)
            if accepted:
                log.info("root of trust advanced to v%d (accepted %s)", self.version, accepted)
            return accepted

    def offer(self, raw: bytes, where: str = "root") -> None:
        """Accept exactly one new root version (the next one), or raise why not (rollback, gap, signatures)."""
        new = parse_root(raw, where)
        with self._lock:
            verify_next(self._meta, new, where)
            self._advance(new, raw)

    def _advance(self, new: Metadata[Root], raw: bytes) -> None:
        keys = package_keys(new)
        self._meta = new
        self.update(keys)  # add first, then drop the revoked: a concurrent lookup never sees an empty set
        for stale in [k for k in self if k not in keys]:
            del self[stale]
        if self.directory is not None:
            try:
                _atomic_write(self.directory / f"root.{new.signed.version}.json", raw)
                _atomic_write(self.directory / ROOT_FILE, raw)
            except OSError as exc:
                log.warning("root of trust v%d accepted but not saved in %s (%s): it holds until restart",
                            new.signed.version, self.directory, exc.strerror or exc)

    def describe(self) -> dict[str, Any]:
        return describe_root(self._meta, self.directory)


def load_root_trust(path: str | Path) -> RootTrust:
    """The trusted root in a trust directory (root.json, advanced over any root.<N>.json found beside it)."""
    p = Path(path)
    directory = p if p.is_dir() else p.parent
    file = p / ROOT_FILE if p.is_dir() else p
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the root of trust {file}: {exc.strerror or exc}") from exc
    meta = parse_root(raw, str(file))
    verify_self(meta, str(file))
    trust = RootTrust(meta, directory, str(file))
    trust.catch_up(where=str(directory))
    return trust


def package_root_members(names: Iterable[str]) -> dict[int, str]:
    """version -> member name of the trust/root.<N>.json members of a package."""
    out: dict[int, str] = {}
    for name in names:
        m = _MEMBER_RE.fullmatch(name)
        if m is not None:
            out[int(m.group(1))] = name
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    from pocketfleet.fs import atomic_write_bytes

    atomic_write_bytes(path, data)


# --------------------------------------------------------------------------------------- the signer


def _public(key: str | Path | PublicKey | Ed25519PrivateKey) -> PublicKey:
    """A public key from a .pub file, a private key file, or a key object."""
    if not isinstance(key, (str, Path)):
        return PublicKey.of(key)
    path = Path(key)
    try:
        return load_public_key(path)
    except KeyFileError:
        return load_private_key(path).public_key()


def _signer(key: str | Path | Ed25519PrivateKey) -> Any:
    from securesystemslib.signer import CryptoSigner

    private = load_private_key(key)
    return CryptoSigner(private, _sslib_key(PublicKey.of(private)))


def _serialize(meta: Metadata[Root]) -> bytes:
    from tuf.api.serialization.json import JSONSerializer

    return meta.to_bytes(JSONSerializer(compact=False)) + b"\n"


def _expiry(days: float, now: datetime | None) -> datetime:
    return ((now or datetime.now(timezone.utc)) + timedelta(days=days)).replace(microsecond=0)


def init_root(
    out_dir: str | Path,
    root_keys: Sequence[str | Path | Ed25519PrivateKey],
    package_keys_: Sequence[str | Path | PublicKey | Ed25519PrivateKey],
    threshold: int = 1,
    expires_days: float = DEFAULT_ROOT_DAYS,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Write root.1.json (and root.json) into `out_dir`: `threshold` of `root_keys` (private keys, all
    of which sign) may sign the next root; `package_keys_` may sign packages."""
    md = _tuf()
    out = Path(out_dir)
    if (out / ROOT_FILE).exists() or (out / "root.1.json").exists():
        raise KeyFileError(f"{out} already holds a root of trust; use `pocketfleet keys rotate`")
    if not root_keys:
        raise KeyFileError("a root needs at least one root key (--root-key)")
    if not package_keys_:
        raise KeyFileError("a root needs at least one package-signing key (--package-key)")
    signers = [_signer(k) for k in root_keys]
    if not 1 <= threshold <= len(signers):
        raise KeyFileError(f"threshold {threshold} must be between 1 and the {len(signers)} root keys")
    root = md.Root(version=1, expires=_expiry(expires_days, now), consistent_snapshot=False)
    for s in signers:
        root.add_key(s.public_key, ROOT_ROLE)
    for k in package_keys_:
        root.add_key(_sslib_key(_public(k)), PACKAGE_ROLE)
    root.roles[ROOT_ROLE].threshold = threshold
    meta = md.Metadata(root)
    for s in signers:
        meta.sign(s, append=True)
    raw = _serialize(meta)
    parsed = parse_root(raw, "root.1.json")
    verify_self(parsed, "root.1.json")
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "root.1.json", raw)
    _atomic_write(out / ROOT_FILE, raw)
    return {**describe_root(parsed, out), "written": [str(out / "root.1.json"), str(out / ROOT_FILE)]}


def _key_ref(ref: str, root: Root, role: str) -> str:
    """A TUF key id in `role` from a pocketfleet key id, a TUF key id (or prefix) or a key file."""
    ids = list(root.roles[role].keyids)
    if Path(ref).is_file():
        kid = _sslib_key(_public(ref)).keyid
        if kid in ids:
            return kid
        raise KeyFileError(f"key {ref} is not a {role!r} key of root v{root.version}")
    for kid in ids:
        if kid.startswith(ref) or key_id(_ed25519(root.keys[kid], "root")) == ref:
            return kid
    raise KeyFileError(f"no {role!r} key of root v{root.version} has id {ref!r}")


def rotate_root(
    repo: str | Path,
    signing_keys: Sequence[str | Path | Ed25519PrivateKey],
    add_root_keys: Sequence[str | Path] = (),
    remove_root_keys: Sequence[str] = (),
    threshold: int | None = None,
    add_package_keys: Sequence[str | Path] = (),
    revoke_package_keys: Sequence[str] = (),
    expires_days: float = DEFAULT_ROOT_DAYS,
    now: datetime | None = None,
    partial: bool = False,
) -> dict[str, Any]:
    """Write root.<N+1>.json (and root.json) in `repo`, signed by `signing_keys`.

    Refuses (RootSignatureError, nothing written) unless the new root is signed by a threshold of root
    N's keys and a threshold of its own: exactly the check a device applies. With `partial`, a root
    short of signatures is written as root.<N+1>.pending.json instead (devices never read it), for the
    other key holders to sign with `sign_pending_root`.
    """
    repo = Path(repo)
    current = load_root_trust(repo)  # the repository's own chain must verify too
    old = current.metadata
    new = _tuf().Metadata.from_bytes(old.to_bytes())
    root = new.signed
    root.version = old.signed.version + 1
    root.expires = _expiry(expires_days, now)
    for ref in remove_root_keys:
        root.revoke_key(_key_ref(ref, root, ROOT_ROLE), ROOT_ROLE)
    for ref in add_root_keys:
        root.add_key(_sslib_key(_public(ref)), ROOT_ROLE)
    for ref in revoke_package_keys:
        root.revoke_key(_key_ref(ref, root, PACKAGE_ROLE), PACKAGE_ROLE)
    for ref in add_package_keys:
        root.add_key(_sslib_key(_public(ref)), PACKAGE_ROLE)
    if not root.roles[PACKAGE_ROLE].keyids:
        raise KeyFileError("the new root would have no package-signing key: add one with --add-package-key")
    if threshold is not None:
        root.roles[ROOT_ROLE].threshold = threshold
    n_root = len(root.roles[ROOT_ROLE].keyids)
    if not 1 <= root.roles[ROOT_ROLE].threshold <= n_root:
        raise KeyFileError(f"root threshold {root.roles[ROOT_ROLE].threshold} must be between 1 and the {n_root} root keys")
    new.signatures.clear()
    return _sign_and_write(repo, old, new, signing_keys, partial)


def sign_pending_root(repo: str | Path, signing_keys: Sequence[str | Path | Ed25519PrivateKey]) -> dict[str, Any]:
    """Add signatures to root.<N+1>.pending.json; once both thresholds are met it becomes root.<N+1>.json."""
    repo = Path(repo)
    old = load_root_trust(repo).metadata
    pending = repo / _pending_name(old.signed.version + 1)
    try:
        raw = pending.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"no pending root v{old.signed.version + 1} in {repo} ({exc.strerror or exc}): "
                           "start one with `pocketfleet keys rotate --partial`") from exc
    return _sign_and_write(repo, old, parse_root(raw, pending.name), signing_keys, partial=True)


def _pending_name(version: int) -> str:
    return f"root.{version}.pending.json"


def _sign_and_write(
    repo: Path, old: Metadata[Root], new: Metadata[Root], signing_keys: Sequence[str | Path | Ed25519PrivateKey],
    partial: bool,
) -> dict[str, Any]:
    root = new.signed
    allowed = set(old.signed.roles[ROOT_ROLE].keyids) | set(root.roles[ROOT_ROLE].keyids)
    for k in signing_keys:
        signer = _signer(k)
        if signer.public_key.keyid not in allowed:
            raise KeyFileError(f"signing key {key_id(_public(k))} is not a root key of v{old.signed.version} or v{root.version}")
        new.sign(signer, append=True)
    raw = _serialize(new)
    label = f"root.{root.version}.json"
    parsed = parse_root(raw, label)
    pending = repo / _pending_name(root.version)
    try:
        verify_next(old, parsed, label)
    except RootSignatureError as exc:
        if not partial:
            raise
        _atomic_write(pending, raw)
        return {**describe_root(parsed, repo), "pending": True, "missing": str(exc), "written": [str(pending)]}
    _atomic_write(repo / label, raw)
    _atomic_write(repo / ROOT_FILE, raw)
    pending.unlink(missing_ok=True)
    return {**describe_root(parsed, repo), "pending": False, "written": [str(repo / label), str(repo / ROOT_FILE)]}


def root_chain(repo: str | Path) -> dict[int, bytes]:
    """version -> bytes of every root.<N>.json in a directory."""
    out: dict[int, bytes] = {}
    for p in sorted(Path(repo).iterdir())[:MAX_CANDIDATES]:
        m = _CHAIN_RE.fullmatch(p.name)
        if m is not None and p.is_file():
            out[int(m.group(1))] = p.read_bytes()
    return out


def describe_root(meta: Metadata[Root], directory: Path | None = None) -> dict[str, Any]:
    root = meta.signed

    def keys(role: str) -> list[dict[str, str]]:
        return [{"key_id": key_id(_ed25519(root.keys[k], "root")), "tuf_keyid": k} for k in root.roles[role].keyids]

    exp = _expires(meta)
    return {
        "version": int(root.version),
        "expires": exp.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expired": exp <= datetime.now(timezone.utc),
        "root": {"threshold": root.roles[ROOT_ROLE].threshold, "keys": keys(ROOT_ROLE)},
        "packages": {"threshold": root.roles[PACKAGE_ROLE].threshold, "keys": keys(PACKAGE_ROLE)},
        "signatures": len(meta.signatures),
        "directory": str(directory) if directory else None,
        "chain": sorted(root_chain(directory)) if directory and directory.is_dir() else [],
    }


def show_root(path: str | Path) -> dict[str, Any]:
    """What `pocketfleet keys show` prints: the verified current root of a trust directory or root file."""
    return load_root_trust(path).describe()


def catch_up_from_package(trust: RootTrust, reader: Any, where: str) -> list[int]:
    """Advance `trust` over the trust/root.<N>.json members of an open package (before its signature is
    checked: each root is authenticated by the chain itself) and the trust directory."""
    members = package_root_members(reader.names)
    wanted = {v: n for v, n in members.items() if v > trust.version}
    offered = {v: reader.read(n, MAX_ROOT_BYTES) for v, n in sorted(wanted.items())[:MAX_CHAIN_STEPS]}
    return trust.catch_up(offered, where)


def attach_roots(
    package: str | Path, repo: str | Path, key: str | Path | Ed25519PrivateKey, out_path: str | Path | None = None
) -> dict[str, Any]:
    """Ship the root chain of `repo` inside a package (members trust/root.<N>.json, listed in `files`) and
    re-sign it with `key`, which must be a package key of the repository's newest root."""
    from export.manifest import MANIFEST, RESERVED, SIGNATURE, Manifest
    from export.package import PackageReader, _write_zip
    from export.signing import canonical_json, sign_bytes
    from export.verify import check_package

    package = Path(package)
    out = Path(out_path) if out_path else package
    current = load_root_trust(repo)
    private = load_private_key(key)
    if key_id(private.public_key()) not in current:
        raise KeyFileError(
            f"key {key_id(private.public_key())} is not a package key of root v{current.version} in {repo}: "
            "devices that catch up to it would refuse the package"
        )
    chain = {v: raw for v, raw in root_chain(repo).items() if v <= current.version}
    with PackageReader(package) as reader:
        manifest = check_package(reader, trust=None, check_expiry=False)
        fields = json.loads(reader.manifest_bytes())
        files = {n: e for n, e in fields["files"].items() if not package_root_members([n])}
        roots = {f"{MEMBER_DIR}/root.{v}.json": raw for v, raw in sorted(chain.items())}
        for name, raw in roots.items():
            files[name] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
        fields["files"] = files
        manifest_raw = canonical_json(fields)
        new_manifest = Manifest.from_dict(json.loads(manifest_raw), where=f"{out.name}: {MANIFEST}")
        members: list[tuple[str, Any]] = [(MANIFEST, manifest_raw), (SIGNATURE, sign_bytes(manifest_raw, private))]
        members += [
            (name, reader.stream(name, manifest.files[name].size))
            for name in reader.names
            if name not in RESERVED and not package_root_members([name])
        ]
        members += list(roots.items())
        _write_zip(out, members, sizes={n: e.size for n, e in new_manifest.files.items()})
    return {
        "package": str(out),
        "name": new_manifest.name,
        "version": new_manifest.version,
        "key_id": key_id(private.public_key()),
        "roots": sorted(chain),
    }
