"""Ed25519 public keys that verify with or without pyca/cryptography.

A device only verifies. With `cryptography` installed (workstation, cloud, the `agent` extra) it does the
check; the lean device extras (`agent-onnx`, `agent-tflite`) leave it out (17 MB) and the check falls back to
securesystemslib's pure-Python Ed25519 (already installed with `tuf`; about 20 ms a signature, paid once per
package or root). Signing always needs `cryptography`, and imports it where it signs.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from export.errors import KeyFileError

# DER of a SubjectPublicKeyInfo for Ed25519 (RFC 8410) is this prefix and the 32 raw key bytes.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM = re.compile(rb"-----BEGIN PUBLIC KEY-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END PUBLIC KEY-----")


def have_cryptography() -> bool:
    try:
        import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401
    except ImportError:
        return False
    return True


class PublicKey:
    """A raw 32-byte Ed25519 public key."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes) or len(raw) != 32:
            raise KeyFileError(
                f"an Ed25519 public key has 32 bytes, got {len(raw) if isinstance(raw, bytes) else raw!r}"
            )
        self.raw = raw

    @classmethod
    def of(cls, key: Any) -> PublicKey:
        """This key, or the public half of a pyca/cryptography Ed25519 public or private key object."""
        if isinstance(key, PublicKey):
            return key
        if hasattr(key, "public_key") and not hasattr(key, "public_bytes"):  # a private key object
            key = key.public_key()
        if hasattr(key, "public_bytes"):
            from cryptography.hazmat.primitives import serialization

            return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        raise KeyFileError(f"expected an Ed25519 public key, got {type(key).__name__}")

    @classmethod
    def from_pem(cls, pem: bytes, where: str) -> PublicKey:
        """Parse a SubjectPublicKeyInfo PEM (`pocketfleet.pub`); `where` names it in errors."""
        match = _PEM.search(pem)
        if match is None:
            raise KeyFileError(f"{where} is not a PEM public key (no BEGIN/END PUBLIC KEY block)")
        try:
            der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KeyFileError(f"{where} is not a PEM public key: its body is not base64") from exc
        if len(der) != len(_SPKI_PREFIX) + 32 or not der.startswith(_SPKI_PREFIX):
            raise KeyFileError(
                f"{where} holds a public key that is not Ed25519 (expected an Ed25519 public key)"
            )
        return cls(der[len(_SPKI_PREFIX) :])

    def to_pem(self) -> bytes:
        body = base64.encodebytes(_SPKI_PREFIX + self.raw).replace(b"\n", b"")
        return b"-----BEGIN PUBLIC KEY-----\n" + body + b"\n-----END PUBLIC KEY-----\n"

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when `signature` is this key's Ed25519 signature over `data`."""
        try:
            from cryptography.exceptions import InvalidSignature
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        except ImportError:
            return _verify_pure(self.raw, signature, data)
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.raw.hex()[:16]}...)"


def _verify_pure(raw: bytes, signature: bytes, data: bytes) -> bool:
    """securesystemslib's public verify API; without cryptography it runs its pure-Python Ed25519."""
    from securesystemslib.exceptions import UnverifiedSignatureError
    from securesystemslib.signer import Signature, SSlibKey

    key = SSlibKey("k", "ed25519", "ed25519", {"public": raw.hex()})
    try:
        key.verify_signature(Signature("k", signature.hex()), data)
    except UnverifiedSignatureError:
        return False
    return True
