"""`pocketfleet` subcommands contributed by the export package: keys, sign, verify, inspect (torch-free).

`pocketfleet export` (a model -> a package) is in compress.cli, which loads model directories and factories."""

from __future__ import annotations

import argparse
from typing import Any

from pocketfleet import add_json_flag, emit, table


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands (parsers only; handlers import lazily)."""
    keys = subparsers.add_parser("keys", help="manage package signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    gen = keys_sub.add_parser("generate", help="write a new Ed25519 key pair (pocketfleet.key / .pub)")
    gen.add_argument("--out", required=True, metavar="DIR", help="directory for the key files")
    gen.add_argument("--force", action="store_true", help="overwrite existing key files")
    add_json_flag(gen)
    gen.set_defaults(func=_cmd_keys_generate)
    keys.set_defaults(func=lambda args: keys.print_help() or 2)

    sign = subparsers.add_parser("sign", help="sign (or re-sign) a package with a private key")
    sign.add_argument("package", metavar="PKG")
    sign.add_argument("--key", required=True, metavar="PRIVATE")
    add_json_flag(sign)
    sign.set_defaults(func=_cmd_sign)

    verify = subparsers.add_parser(
        "verify",
        help="verify a package's signature, hashes, paths, sizes and expiry",
        description="Exit 0 when the package is valid for the trusted keys; otherwise print the reason "
        "and exit non-zero (4).",
    )
    verify.add_argument("package", metavar="PKG")
    verify.add_argument(
        "--trust", required=True, metavar="PUBLIC", help="public key file or directory of them"
    )
    add_json_flag(verify)
    verify.set_defaults(func=_cmd_verify)

    inspect = subparsers.add_parser("inspect", help="show a package's manifest and members")
    inspect.add_argument("package", metavar="PKG")
    inspect.add_argument("--trust", metavar="PUBLIC", help="also verify against these public keys")
    add_json_flag(inspect)
    inspect.set_defaults(func=_cmd_inspect)


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    from export.signing import generate_keys

    result = generate_keys(args.out, overwrite=args.force)
    emit(
        result,
        args.json,
        lambda r: f"wrote {r['private_key']} (keep secret) and {r['public_key']}; key id {r['key_id']}",
    )
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from export.package import sign_package
    from export.signing import key_id, load_private_key

    key = load_private_key(args.key)
    manifest = sign_package(args.package, key)
    result = {
        "package": args.package,
        "name": manifest.name,
        "version": manifest.version,
        "key_id": key_id(key.public_key()),
    }
    emit(
        result,
        args.json,
        lambda r: f"signed {r['package']} ({r['name']} v{r['version']}) with key {r['key_id']}",
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from export.verify import verify_package

    manifest = verify_package(args.package, args.trust)
    result = {
        "package": args.package,
        "valid": True,
        "name": manifest.name,
        "version": manifest.version,
        "format": manifest.format,
        "dtype": manifest.dtype,
        "expires": manifest.expires,
        "files": {p: e.size for p, e in manifest.files.items()},
    }
    emit(
        result,
        args.json,
        lambda r: (
            f"OK {r['package']}: {r['name']} v{r['version']} ({r['format']}/{r['dtype']}), expires {r['expires']}"
        ),
    )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from export.package import inspect_package

    info = inspect_package(args.package, trust=args.trust)
    emit(info, args.json, _render_inspect)
    return 0 if info["verified"] is not False else 4


def _render_inspect(info: dict[str, Any]) -> str:
    m = info["manifest"]
    status = {True: "verified", False: f"REJECTED: {info.get('error')}", None: "not verified (no --trust)"}
    lines = [
        f"{info['path']}  {info['size_bytes']} bytes  "
        + (f"signed by {info['key_id']}" if info["signed"] else "UNSIGNED")
        + f"  [{status[info['verified']]}]",
        f"{m['name']} v{m['version']}  {m['format']}/{m['dtype']}  workload {m['workload']}  device {m['device']}",
        f"created {m['created']}  expires {m['expires']}",
        "inputs:  " + ", ".join(f"{s['name']} {s['shape']} {s['dtype']}" for s in m["inputs"]),
        "outputs: " + ", ".join(f"{s['name']} {s['shape']} {s['dtype']}" for s in m["outputs"]),
        table([{"file": p, **e} for p, e in m["files"].items()]),
    ]
    report = m.get("report") or {}
    if report.get("metric"):
        lines.insert(3, f"metric  {report['metric'].get('metric')} = {report['metric'].get('value')}")
    return "\n".join(lines)
