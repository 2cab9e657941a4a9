"""Whether a device takes an OTA command, decided before anything is downloaded: expiry, size, releases
rolled back before, and rollback protection (an older version needs a signed rollback authorization)."""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from typing import Any

from cloud_sync.ports import ModelStoreLike


class Refused(Exception):
    """The command is refused: not attempted, reported with state 'refused'."""


def admit(cmd: dict[str, Any], store: ModelStoreLike, max_package_bytes: int, revoked: Collection[str],
          rollback_floor: float) -> bool | None:
    """allow_downgrade (True only for a valid signed rollback), None when the release is already active;
    raises Refused with the reason otherwise."""
    rel = cmd["release"]
    if cmd["expires"] < time.time():
        raise Refused(f"the command expired at {cmd['expires']:.0f}")
    if rel["release_id"] in revoked:
        raise Refused(f"release {rel['release_id']} was rolled back on this device; it is not installed again")
    if rel["size"] > max_package_bytes:
        raise Refused(f"release is {rel['size']} bytes, above this device's max_package_bytes {max_package_bytes}")
    try:
        state = store.read_state().get(rel["name"])
    except Exception:  # noqa: BLE001 - an unreadable store state reads as "nothing installed"
        state = None
    if state is not None and state.active == rel["version"]:
        return None
    if state is not None and rel["version"] <= state.highest:
        if not rel.get("rollback_auth"):
            raise Refused(
                f"{rel['name']} v{rel['version']} is not newer than v{state.highest}, the highest version this "
                "device has run (replay/rollback protection; only a signed rollback release may go back)"
            )
        check_rollback_auth(rel, state.highest, store.trust, rollback_floor)
        return True
    return False


def check_rollback_auth(rel: dict[str, Any], highest: int, trust: Any, rollback_floor: float) -> None:
    """Refused unless `rel` carries a rollback authorization signed by a trusted key, for this very release,
    valid now, covering the highest version run, and newer than the last one applied (no replay)."""
    from cloud_sync.releases import ROLLBACK_PURPOSE
    from export.signing import canonical_json, load_trust, verify_bytes

    try:
        auth = json.loads(rel["rollback_auth"])
        doc, sig = auth["doc"], auth["sig"]
        verify_bytes(canonical_json(doc), canonical_json(sig), load_trust(trust), "rollback authorization")
    except Exception as exc:  # noqa: BLE001 - every failure here is a refusal
        raise Refused(f"the rollback authorization does not verify: {exc}") from exc
    want = {"purpose": ROLLBACK_PURPOSE, "release_id": rel["release_id"], "name": rel["name"],
            "version": rel["version"], "sha256": rel["sha256"]}
    bad = [k for k, v in want.items() if doc.get(k) != v]
    if bad:
        raise Refused(f"the rollback authorization is for another release (field {bad[0]!r} differs)")
    now = time.time()
    if not doc.get("issued", 0) <= now + 300 < doc.get("expires", 0) + 300:
        raise Refused("the rollback authorization is expired or not yet valid")
    if doc.get("from_version", -1) < highest:
        raise Refused(f"the rollback authorization covers going back from v{doc.get('from_version')}, "
                      f"this device has run v{highest}")
    if doc["issued"] <= rollback_floor:
        raise Refused("the rollback authorization is older than one already applied (replay)")
