"""Ed25519 keys, canonical manifest bytes and the manifest signature (torch-free).

Keys are PEM files: `pocketfleet.key` (PKCS#8, unencrypted, mode 0600) and `pocketfleet.pub`
(SubjectPublicKeyInfo). A key id is the first 16 hex digits of SHA-256 over the raw 32-byte public key.
A trust set is one public key file or a directory of them (`*.pub`, `*.pem`), or a root of trust: a
directory holding `root.json` (TUF root metadata, export/trust_root.py) whose package role lists the keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.ed25519 import PublicKey
from export.errors import (
    BadSignatureError,
    KeyFileError,
    MalformedSignatureError,
    UntrustedKeyError,
)

ALG = "ed25519"
PRIVATE_KEY_FILE = "pocketfleet.key"
PUBLIC_KEY_FILE = "pocketfleet.pub"
KEY_ID_HEX = 16

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

Trust = dict[str, PublicKey]
TrustLike = str | Path | PublicKey | Mapping[str, PublicKey] | Iterable[Any]


def canonical_json(obj: Any) -> bytes:
    """The canonical bytes of a JSON document: sorted keys, compact separators, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def key_id(public_key: Any) -> str:
    """The key id of a PublicKey (or a pyca/cryptography Ed25519 key object)."""
    return hashlib.sha256(PublicKey.of(public_key).raw).hexdigest()[:KEY_ID_HEX]


def generate_keys(out_dir: str | Path, overwrite: bool = False) -> dict[str, str]:
    """Write a new Ed25519 key pair into `out_dir`; returns the paths and the key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise KeyFileError(f"{priv_path} or {pub_path} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(priv_path, 0o600)
    pub_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return {"private_key": str(priv_path), "public_key": str(pub_path), "key_id": key_id(key.public_key())}


def load_private_key(path: str | Path | Ed25519PrivateKey) -> Ed25519PrivateKey:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError as exc:
        raise KeyFileError(
            "signing needs the 'cryptography' package (pip install 'pocketfleet[all]'); a device only verifies"
        ) from exc
    if isinstance(path, Ed25519PrivateKey):
        return path
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise KeyFileError(f"cannot read private key {path}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, expected an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> PublicKey:
    path = Path(path)
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc.strerror or exc}") from exc
    return PublicKey.from_pem(pem, str(path))


def load_trust(trust: TrustLike) -> Trust:
    """Key id -> public key, from a public key file, a directory of them, a root-of-trust directory
    (root.json: a RootTrust, which advances in place), key objects or a ready dict."""
    from export.trust_root import RootTrust, is_root_path, load_root_trust

    if isinstance(trust, RootTrust):
        return trust  # the live root (it advances in place; see export/trust_root.py)
    if isinstance(trust, Mapping):
        return {kid: PublicKey.of(k) for kid, k in trust.items()}
    if isinstance(trust, PublicKey) or hasattr(trust, "public_bytes"):
        key = PublicKey.of(trust)
        return {key_id(key): key}
    if isinstance(trust, (str, Path)):
        path = Path(trust)
        if is_root_path(path):
            return load_root_trust(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".pub", ".pem") and p.is_file())
            if not files:
                raise KeyFileError(f"trust directory {path} holds no *.pub or *.pem public keys")
            keys = [load_public_key(p) for p in files]
        else:
            keys = [load_public_key(path)]
        return {key_id(k): k for k in keys}
    out: Trust = {}
    for item in trust:
        out.update(load_trust(item))
    return out


def sign_bytes(data: bytes, key: str | Path | Ed25519PrivateKey) -> bytes:
    """The manifest.sig document for `data` (the exact bytes of manifest.json)."""
    private = load_private_key(key)
    doc = {
        "alg": ALG,
        "key_id": key_id(private.public_key()),
        "signature": base64.b64encode(private.sign(data)).decode("ascii"),
    }
    return canonical_json(doc)


def parse_signature(raw: bytes, where: str) -> dict[str, Any]:
    """Parse and shape-check manifest.sig; raises MalformedSignatureError naming `where`."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except RecursionError as exc:
        raise MalformedSignatureError(f"{where}: manifest.sig is nested too deeply") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedSignatureError(f"{where}: manifest.sig is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise MalformedSignatureError(f"{where}: manifest.sig must be a JSON object")
    for field in ("alg", "key_id", "signature"):
        if not isinstance(doc.get(field), str):
            raise MalformedSignatureError(f"{where}: manifest.sig field {field!r} is missing or not a string")
    if doc["alg"] != ALG:
        raise MalformedSignatureError(
            f"{where}: manifest.sig alg {doc['alg']!r} is not supported (only {ALG!r})"
        )
    try:
        sig = base64.b64decode(doc["signature"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedSignatureError(f"{where}: manifest.sig signature is not base64") from exc
    if len(sig) != 64:
        raise MalformedSignatureError(f"{where}: manifest.sig signature has {len(sig)} bytes, expected 64")
    return {**doc, "signature_bytes": sig}


def verify_bytes(data: bytes, sig_raw: bytes, trust: Trust, where: str) -> str:
    """Check manifest.sig over `data` against the trust set; returns the signing key id."""
    sig = parse_signature(sig_raw, where)
    public = trust.get(sig["key_id"])
    if public is None:
        known = ", ".join(sorted(trust)) or "none"
        raise UntrustedKeyError(
            f"{where}: signed by key {sig['key_id']}, which is not trusted (trusted: {known})"
        )
    if not PublicKey.of(public).verify(sig["signature_bytes"], data):
        raise BadSignatureError(f"{where}: the signature of manifest.json does not verify with key {sig['key_id']}")
    return sig["key_id"]
