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
    init = keys_sub.add_parser(
        "init-root",
        help="write a root of trust (root.1.json + root.json): root keys with a threshold, package-signing keys",
        description="Create a TUF root (python-tuf metadata) in DIR. Copy root.json into each device's trust "
        "directory (agent --trust DIR). Every --root-key signs root.1.json.",
    )
    init.add_argument("--out", required=True, metavar="DIR", help="root repository directory (root.<N>.json files)")
    init.add_argument("--root-key", action="append", required=True, metavar="PRIVATE",
                      help="a root key (private key file; repeat)")
    init.add_argument("--threshold", type=int, default=1, help="root keys needed to sign the next root (default 1)")
    init.add_argument("--package-key", action="append", required=True, metavar="KEY",
                      help="a package-signing key (.pub or private key file; repeat)")
    init.add_argument("--expires-days", type=float, default=365, help="days until this root expires (default 365)")
    add_json_flag(init)
    init.set_defaults(func=_cmd_keys_init_root)

    rot = keys_sub.add_parser(
        "rotate",
        help="write the next root version: add/remove root keys, add/revoke package keys, change the threshold",
        description="Write root.<N+1>.json (and root.json) in the repository. It must be signed (--key) by a "
        "threshold of root N's keys AND a threshold of the new root's keys; otherwise nothing is written (exit 4). "
        "Ship the chain to devices with `pocketfleet sign PKG --key K --roots DIR` or by copying the files into "
        "their trust directory.",
    )
    rot.add_argument("--repo", required=True, metavar="DIR", help="root repository directory")
    rot.add_argument("--key", action="append", default=[], metavar="PRIVATE",
                     help="a root key (old or new) that signs the new root (repeat)")
    rot.add_argument("--add-root-key", action="append", default=[], metavar="KEY")
    rot.add_argument("--remove-root-key", action="append", default=[], metavar="KEY_ID|FILE")
    rot.add_argument("--threshold", type=int, help="new root threshold (default: unchanged)")
    rot.add_argument("--add-package-key", action="append", default=[], metavar="KEY")
    rot.add_argument("--revoke-package-key", action="append", default=[], metavar="KEY_ID|FILE",
                     help="remove a package-signing key: its packages are refused from this root on")
    rot.add_argument("--expires-days", type=float, default=365, help="days until the new root expires (default 365)")
    rot.add_argument("--partial", action="store_true",
                     help="short of signatures: write root.<N+1>.pending.json for the other key holders "
                     "(`keys sign-root`) instead of refusing")
    add_json_flag(rot)
    rot.set_defaults(func=_cmd_keys_rotate)

    sroot = keys_sub.add_parser(
        "sign-root",
        help="add your root key's signature to a pending root; it takes effect when both thresholds are met",
    )
    sroot.add_argument("--repo", required=True, metavar="DIR", help="root repository directory")
    sroot.add_argument("--key", action="append", required=True, metavar="PRIVATE", help="a root key (repeat)")
    add_json_flag(sroot)
    sroot.set_defaults(func=_cmd_keys_sign_root)

    show = keys_sub.add_parser("show", help="verify and show the current root of a trust or repository directory")
    show.add_argument("path", metavar="DIR_OR_ROOT_JSON")
    add_json_flag(show)
    show.set_defaults(func=_cmd_keys_show)
    keys.set_defaults(func=lambda args: keys.print_help() or 2)

    sign = subparsers.add_parser("sign", help="sign (or re-sign) a package with a private key")
    sign.add_argument("package", metavar="PKG")
    sign.add_argument("--key", required=True, metavar="PRIVATE")
    sign.add_argument("--roots", metavar="DIR",
                      help="also ship this root repository's chain (trust/root.<N>.json) so offline devices catch up")
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


def _render_root(r: dict[str, Any]) -> str:
    def ids(role: dict[str, Any]) -> str:
        return ", ".join(k["key_id"] for k in role["keys"])

    lines = [
        f"root v{r['version']}  expires {r['expires']}" + ("  EXPIRED" if r["expired"] else ""),
        f"root keys     {r['root']['threshold']} of {len(r['root']['keys'])}: {ids(r['root'])}",
        f"package keys  {ids(r['packages'])}",
    ]
    if r.get("chain"):
        lines.append(f"chain         {r['chain']} in {r['directory']}")
    if r.get("pending"):
        lines.append(f"PENDING (not in effect): {r['missing']}; more root keys sign with `pocketfleet keys sign-root`")
    if r.get("written"):
        lines.append("wrote " + ", ".join(r["written"]))
    return "\n".join(lines)


def _cmd_keys_init_root(args: argparse.Namespace) -> int:
    from export.trust_root import init_root

    result = init_root(args.out, args.root_key, args.package_key, threshold=args.threshold,
                       expires_days=args.expires_days)
    emit(result, args.json, _render_root)
    return 0


def _cmd_keys_rotate(args: argparse.Namespace) -> int:
    from export.trust_root import rotate_root

    result = rotate_root(
        args.repo, args.key, add_root_keys=args.add_root_key, remove_root_keys=args.remove_root_key,
        threshold=args.threshold, add_package_keys=args.add_package_key,
        revoke_package_keys=args.revoke_package_key, expires_days=args.expires_days, partial=args.partial,
    )
    emit(result, args.json, _render_root)
    return 0


def _cmd_keys_sign_root(args: argparse.Namespace) -> int:
    from export.trust_root import sign_pending_root

    emit(sign_pending_root(args.repo, args.key), args.json, _render_root)
    return 0


def _cmd_keys_show(args: argparse.Namespace) -> int:
    from export.trust_root import show_root

    emit(show_root(args.path), args.json, _render_root)
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from export.package import sign_package
    from export.signing import key_id, load_private_key

    if args.roots:
        from export.trust_root import attach_roots

        result = attach_roots(args.package, args.roots, args.key)
        emit(result, args.json, lambda r: f"signed {r['package']} ({r['name']} v{r['version']}) with key "
             f"{r['key_id']}, shipping roots {r['roots']}")
        return 0
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
