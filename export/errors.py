"""Errors raised by export/ (torch-free). Every one is a PocketfleetError with a message naming the file."""

from __future__ import annotations

from pocketfleet import PocketfleetError


class ExportError(PocketfleetError):
    """The model could not be converted (unsupported op, bad arguments, converter failure)."""


class ParityError(ExportError):
    """The exported model's outputs differ from the PyTorch model's beyond the allowed bounds."""


class PackageError(PocketfleetError):
    """A package could not be built or signed (bad manifest fields, missing model file, bad key)."""


class KeyFileError(PocketfleetError):
    """A private key, public key or trust directory could not be read."""


class VerificationError(PocketfleetError):
    """A package was rejected. Subclasses name the reason; the message names the package and member."""

    exit_code = 4


class NotAPackageError(VerificationError):
    """The file is not a zip archive (or cannot be read)."""


class MalformedManifestError(VerificationError):
    """manifest.json is not valid, canonical JSON or lacks a required field."""


class MalformedSignatureError(VerificationError):
    """manifest.sig is not the expected JSON document."""


class UnsignedPackageError(VerificationError):
    """The package has no manifest.sig."""


class UntrustedKeyError(VerificationError):
    """The package is signed by a key that is not in the trust set."""


class BadSignatureError(VerificationError):
    """The signature does not verify over manifest.json with the named key."""


class ExpiredPackageError(VerificationError):
    """The manifest's `expires` time has passed."""


class MissingFileError(VerificationError):
    """A file listed in the manifest (or manifest.json itself) is absent from the package."""


class UnexpectedFileError(VerificationError):
    """The package holds a member that the manifest does not list."""


class FileMismatchError(VerificationError):
    """A member's size or SHA-256 differs from the manifest: the file was changed."""


class UnsafePathError(VerificationError):
    """A member path could escape the extraction directory (.., absolute, backslash, drive letter)."""


class OversizeError(VerificationError):
    """A member (or the whole package) declares a size beyond the limits: a possible zip bomb."""


class MalformedPackageError(VerificationError):
    """The zip is well-formed but breaks the package rules (duplicate or compressed members, directories)."""


class DowngradeError(VerificationError):
    """A package's version is not newer than the highest version installed (rollback protection)."""


class HeadError(PocketfleetError):
    """A manifest's trainable_head entry or the head weights are malformed (names the field or tensor)."""
