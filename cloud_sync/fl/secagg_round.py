"""Secure aggregation as phases of a round (secagg.py's protocol on the FL wire).

After selection the round's `training` state runs four phases, each closing when every expected device
answered or at its phase deadline with at least the threshold t (else the round is abandoned):

  keys    devices train, quantize their update to int8 (fixed clip) and advertise X25519 keys
  shares  the server sends the roster (and t) to those who advertised; they return encrypted shares
  masked  the server routes each device its shares and the mask set; devices return masked vectors
  unmask  the server names survivors and dropouts; survivors return the shares needed; the server
          rebuilds the exact sum and the aggregator applies its mean as the update.

Every message is JSON `pf.fl.secagg/1` {task, round, attempt, device?, kind, body} on fl/up/secagg and
fl/down/secagg; the server keeps each received one in SQLite (once per device and kind), so a restarted
aggregator rebuilds the protocol state by replaying them. The aggregator stores only masked vectors.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .errors import MalformedUpdateError, SecAggAbort, SecAggError
from .secagg import PRIME, SecAggClient, SecAggServer

SCHEMA = "pf.fl.secagg/1"
MAX_BYTES = 16 << 20
UP_KINDS = ("keys", "shares", "masked", "unmask")
PHASES = UP_KINDS
DOWN_KINDS = ("roster", "mask", "unmask_request")

TABLES = """
CREATE TABLE IF NOT EXISTS secagg_phase (task TEXT, round INTEGER, attempt INTEGER, phase TEXT NOT NULL,
    deadline REAL NOT NULL, threshold INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (task, round, attempt));
CREATE TABLE IF NOT EXISTS secagg_msgs (task TEXT, round INTEGER, attempt INTEGER, device TEXT, kind TEXT,
    body TEXT NOT NULL, PRIMARY KEY (task, round, attempt, device, kind));
"""


def _strs(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _str_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())


def _keys(v: Any) -> bool:
    return isinstance(v, dict) and isinstance(v.get("c_pk"), str) and isinstance(v.get("s_pk"), str)


def _share(v: Any) -> bool:
    """One Shamir share [x, y]: 0 < x < 2**31, 0 <= y < the field prime."""
    return (isinstance(v, list) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            and 0 < v[0] < 2**31 and 0 <= v[1] < PRIME)


# the shape of each kind's body: checked on arrival, so that a stored body can always be replayed
_BODIES: dict[str, Callable[[Any], bool]] = {
    "keys": _keys,
    "shares": _str_map,
    "masked": lambda b: isinstance(b, dict) and isinstance(b.get("y"), str),
    "unmask": lambda b: isinstance(b, dict) and all(
        isinstance(b.get(k, {}), dict) and all(_share(s) for s in b.get(k, {}).values()) for k in ("b", "s")),
    "roster": lambda b: isinstance(b, dict) and isinstance(b.get("roster"), dict)
    and all(_keys(v) for v in b["roster"].values()) and isinstance(b.get("threshold"), int)
    and not isinstance(b.get("threshold"), bool),
    "mask": lambda b: isinstance(b, dict) and _strs(b.get("mask_set")) and _str_map(b.get("shares")),
    "unmask_request": lambda b: isinstance(b, dict) and _strs(b.get("survivors")) and _strs(b.get("dropped")),
}


def encode(task: str, rnd: int, attempt: int, kind: str, body: Any, device: str | None = None) -> bytes:
    msg = {"schema": SCHEMA, "task": task, "round": rnd, "attempt": attempt, "kind": kind, "body": body}
    if device is not None:
        msg["device"] = device
    return json.dumps(msg, separators=(",", ":")).encode()


def decode(payload: bytes, kinds: tuple[str, ...]) -> dict[str, Any]:
    if len(payload) > MAX_BYTES:
        raise MalformedUpdateError(f"{SCHEMA}: {len(payload)} bytes, above {MAX_BYTES}")
    try:
        msg = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also a 5000-digit integer
        raise MalformedUpdateError(f"{SCHEMA}: not UTF-8 JSON ({exc})") from exc
    if not isinstance(msg, dict) or msg.get("schema") != SCHEMA or msg.get("kind") not in kinds:
        raise MalformedUpdateError(f"{SCHEMA}: wrong schema or kind {msg.get('kind') if isinstance(msg, dict) else None!r}")
    for key in ("round", "attempt"):
        if not isinstance(msg.get(key), int) or isinstance(msg.get(key), bool):
            raise MalformedUpdateError(f"{SCHEMA}: field {key!r} must be an integer")
    if not isinstance(msg.get("task"), str) or not isinstance(msg.get("body"), (dict, list)):
        raise MalformedUpdateError(f"{SCHEMA}: task or body missing")
    if not _BODIES[msg["kind"]](msg["body"]):
        raise MalformedUpdateError(f"{SCHEMA}: the body of a {msg['kind']!r} message has the wrong shape")
    return msg


def vec_to_b64(v: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(v, dtype="<u4").tobytes()).decode()


def vec_from_b64(text: str, length: int) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise MalformedUpdateError("secagg: masked vector is not base64") from exc
    if len(raw) != 4 * length:
        raise MalformedUpdateError(f"secagg: masked vector has {len(raw) // 4} words, expected {length}")
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


class SecAggCoordinator:
    """Server side, state in the RoundStore's database. `send(device, task, payload)` reaches fl/down/secagg."""

    def __init__(self, store: Any, send: Callable[[str, str, bytes], None]) -> None:
        self.store, self.send = store, send
        with store.lock:
            store.db.executescript(TABLES)

    def begin(self, db: Any, task: str, rnd: int, attempt: int, deadline: float) -> None:
        db.execute("INSERT OR REPLACE INTO secagg_phase VALUES (?, ?, ?, 'keys', ?, 0)", (task, rnd, attempt, deadline))

    def clear(self, db: Any, task: str, rnd: int) -> None:
        db.execute("DELETE FROM secagg_msgs WHERE task = ? AND round = ?", (task, rnd))

    def phase(self, task: str, rnd: int, attempt: int) -> tuple[str, float, int] | None:
        return self.store.one("SELECT phase, deadline, threshold FROM secagg_phase WHERE task = ? AND round = ? "
                              "AND attempt = ?", task, rnd, attempt)

    def _msgs(self, task: str, rnd: int, attempt: int, kind: str) -> dict[str, Any]:
        rows = self.store.all("SELECT device, body FROM secagg_msgs WHERE task = ? AND round = ? AND attempt = ? "
                              "AND kind = ?", task, rnd, attempt, kind)
        return {d: json.loads(b) for d, b in rows}

    def expected(self, task: str, rnd: dict[str, Any], phase: str) -> set[str]:
        if phase == "keys":
            return set(rnd["selected"])
        prev = PHASES[PHASES.index(phase) - 1]
        return set(self._msgs(task, rnd["round"], rnd["attempt"], prev))

    def on_message(self, task: str, rnd: dict[str, Any], device: str, msg: Mapping[str, Any]) -> str:
        state = self.phase(task, rnd["round"], rnd["attempt"])
        if state is None or (msg["round"], msg["attempt"]) != (rnd["round"], rnd["attempt"]):
            return "late"
        if msg["kind"] != state[0]:
            return "secagg_out_of_phase"
        if device not in self.expected(task, rnd, state[0]):
            return "unselected"
        if msg["kind"] == "masked":
            vec_from_b64(msg["body"].get("y", ""), int(rnd["config"]["secagg"]["length"]))
        with self.store.transaction() as db:
            cur = db.execute("INSERT OR IGNORE INTO secagg_msgs VALUES (?, ?, ?, ?, ?, ?)",
                             (task, rnd["round"], rnd["attempt"], device, msg["kind"], json.dumps(msg["body"])))
            if cur.rowcount != 1:
                return "duplicate"
            self.store.count(task, f"secagg_{msg['kind']}", conn=db)
        return "accepted"

    def advance(self, task: str, rnd: dict[str, Any], now: float, phase_s: float, threshold: float) -> Any:
        """None (wait), "abort: reason", or (sum uint32, survivors) when the unmask phase completes."""
        r, a = rnd["round"], rnd["attempt"]
        phase, deadline, t = self.phase(task, r, a)
        got = set(self._msgs(task, r, a, phase))
        want = self.expected(task, rnd, phase)
        if got < want and now < deadline:
            return None
        if phase == "keys":
            t = max(2, math.ceil(threshold * len(got))) if threshold < 1 else int(threshold)
        if len(got) < max(t, 2):
            return f"abort: {len(got)} devices answered the {phase} phase, threshold {t}"
        if phase == "unmask":
            try:
                return self._unmask(task, rnd, t)
            except SecAggAbort as exc:
                return f"abort: {exc}"
        nxt = PHASES[PHASES.index(phase) + 1]
        with self.store.transaction() as db:
            db.execute("UPDATE secagg_phase SET phase = ?, deadline = ?, threshold = ? WHERE task = ? AND round = ? "
                       "AND attempt = ?", (nxt, now + phase_s, t, task, r, a))
        self.resend(task, rnd)
        return None

    def resend(self, task: str, rnd: dict[str, Any]) -> None:
        """Send the current phase's requests (on entering it, and again after a restart)."""
        r, a = rnd["round"], rnd["attempt"]
        phase, _, t = self.phase(task, r, a)
        if phase == "keys":
            return
        prev = self._msgs(task, r, a, PHASES[PHASES.index(phase) - 1])
        if phase == "shares":
            for dev in prev:
                self.send(dev, task, encode(task, r, a, "roster", {"roster": prev, "threshold": t}))
        elif phase == "masked":
            for dev in prev:
                mine = {u: cts[dev] for u, cts in prev.items() if dev in cts}
                self.send(dev, task, encode(task, r, a, "mask", {"mask_set": sorted(prev), "shares": mine}))
        else:
            shared = set(self._msgs(task, r, a, "shares"))
            body = {"survivors": sorted(prev), "dropped": sorted(shared - set(prev))}
            for dev in prev:
                self.send(dev, task, encode(task, r, a, "unmask_request", body))

    def _unmask(self, task: str, rnd: dict[str, Any], t: int) -> tuple[np.ndarray, list[str]]:
        r, a = rnd["round"], rnd["attempt"]
        length = int(rnd["config"]["secagg"]["length"])
        server = SecAggServer(length, t)
        for dev, body in self._msgs(task, r, a, "keys").items():
            server.add_keys({"device": dev, **body})
        for dev, body in self._msgs(task, r, a, "shares").items():
            server.add_shares(dev, body)
        for dev, body in self._msgs(task, r, a, "masked").items():
            server.add_masked(dev, vec_from_b64(body["y"], length))
        for dev, body in self._msgs(task, r, a, "unmask").items():
            server.add_unmask(dev, body)
        return server.unmasked_sum(), sorted(server.masked)


class SecAggParticipant:
    """Device side: one SecAggClient per (task, round, attempt); answers are kept to resend on redelivery."""

    def __init__(self, device: str, send: Callable[[bytes], None]) -> None:
        self.device, self.send = device, send
        self.sessions: dict[tuple[str, int, int], dict[str, Any]] = {}

    def start(self, key: tuple[str, int, int], x: np.ndarray) -> None:
        client = SecAggClient(self.device, len(x), threshold=2)
        self.sessions = {key: {"client": client, "x": x, "sent": {}}}  # one live round per device
        adv = client.advertise()
        self._answer(key, "keys", {"c_pk": adv["c_pk"], "s_pk": adv["s_pk"]})

    def _answer(self, key: tuple[str, int, int], kind: str, body: Any) -> None:
        data = encode(*key, kind, body, device=self.device)
        self.sessions[key]["sent"][kind] = data
        self.send(data)

    def on_message(self, payload: bytes) -> None:
        msg = decode(payload, DOWN_KINDS)
        key = (msg["task"], msg["round"], msg["attempt"])
        s = self.sessions.get(key)
        if s is None:
            raise SecAggError(f"secagg: no session for {key}")
        reply = {"roster": "shares", "mask": "masked", "unmask_request": "unmask"}[msg["kind"]]
        if reply in s["sent"]:
            self.send(s["sent"][reply])  # redelivered request: same answer
            return
        client: SecAggClient = s["client"]
        body = msg["body"]
        if msg["kind"] == "roster":
            client.threshold = int(body["threshold"])
            self._answer(key, "shares", client.share_keys(body["roster"]))
        elif msg["kind"] == "mask":
            client.receive_shares(body["shares"])
            self._answer(key, "masked", {"y": vec_to_b64(client.masked_input(s["x"], body["mask_set"]))})
        else:
            self._answer(key, "unmask", client.unmask(body["survivors"], body["dropped"]))
