"""Secure aggregation (Bonawitz et al. 2017, honest-but-curious server): the aggregator learns only the
sum of the devices' integer vectors, never one device's vector, and can still finish when up to
n - t devices drop out after masking.

Per round, each device u:
1. advertise: two X25519 public keys, c_u (to encrypt shares) and s_u (to agree on pairwise masks).
2. share_keys: picks a self-mask seed b_u; Shamir-splits b_u and its private s key into n shares with
   threshold t; encrypts each device's share pair with AES-GCM under a key derived from X25519(c_u, c_v).
3. masked_input: sends y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)   (mod 2^32),
   where s_uv = HKDF(X25519(s_u, s_v)) is shared by u and v only.
4. unmask: for every device still in the round it reveals its share of b_v; for every device that
   dropped after step 2 its share of s_v (never both for one device).
The server rebuilds each survivor's b_v and each dropped device's s key from >= t shares, removes the
self masks and the dropped devices' pairwise masks, and gets sum(x_u) mod 2^32 exactly. With fewer than
t devices left at step 3 or 4 it raises SecAggAbort: nothing can be (or is) unmasked.

Works with the int8 codec: devices quantize their clipped update with a scale fixed by the round
(`quantize_fixed`), lift the int8 values to uint32, and the server reads the sum back as int32.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .codecs import INT8_MAX, stochastic_round
from .errors import SecAggAbort, SecAggError

try:  # the lean device extras (agent-onnx, agent-tflite) leave cryptography out: no secure aggregation there
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError:
    _HAVE_CRYPTO = False
else:
    _HAVE_CRYPTO = True

PRIME = 2**521 - 1  # Mersenne prime field for Shamir shares of 256-bit secrets


def _new_key() -> X25519PrivateKey:
    if not _HAVE_CRYPTO:
        raise SecAggError(
            "secure aggregation needs the 'cryptography' package, which this device's install lacks "
            "(pip install 'pocketfleet[agent]')"
        )
    return X25519PrivateKey.generate()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise SecAggError(f"secagg: {what} is not base64") from exc


def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` pseudo-random uint32 words from a 32-byte seed (ChaCha20 keystream)."""
    enc = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\x00" * (4 * length)), dtype="<u4").astype(np.uint32)


# ------------------------------------------------------------------------------------------- Shamir


def shamir_split(secret: int, n: int, t: int, rng: secrets.SystemRandom | None = None) -> list[tuple[int, int]]:
    """Shares (x, y) for x = 1..n of `secret` < PRIME; any t of them rebuild it, fewer reveal nothing."""
    if not 1 <= t <= n:
        raise SecAggError(f"secagg: threshold {t} must lie in [1, {n}]")
    rng = rng or secrets.SystemRandom()
    coeffs = [secret] + [rng.randrange(PRIME) for _ in range(t - 1)]
    out = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        out.append((x, y))
    return out


def shamir_combine(shares: Sequence[tuple[int, int]], t: int) -> int:
    """Lagrange interpolation at 0 from the first t distinct shares."""
    pts = list({x: y for x, y in shares}.items())[:t]
    if len(pts) < t:
        raise SecAggAbort(f"secagg: {len(pts)} shares, need {t}")
    secret = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret


# ------------------------------------------------------------------------------------------- int8 domain


def quantize_fixed(values: np.ndarray, clip: float, rng: np.random.Generator) -> np.ndarray:
    """Clip to [-clip, clip], stochastic-round to int8 steps of clip/127, lift to uint32 (two's complement)."""
    scale = np.float32(clip / INT8_MAX)
    q = np.clip(stochastic_round(np.clip(np.asarray(values, np.float32), -clip, clip) / scale, rng), -INT8_MAX, INT8_MAX)
    return q.astype(np.int64).astype(np.uint32)


def dequantize_sum(total: np.ndarray, clip: float, count: int) -> np.ndarray:
    """Mean of `count` vectors from their uint32 sum (read as int32; |sum| <= count·127 < 2^31)."""
    if count * INT8_MAX >= 2**31:
        raise SecAggError(f"secagg: {count} devices could overflow the 32-bit sum")
    return total.astype(np.uint32).view(np.int32).astype(np.float32) * np.float32(clip / INT8_MAX) / count


# ------------------------------------------------------------------------------------------- device side


@dataclass
class SecAggClient:
    """One device's side of one round. Messages are JSON-able dicts (base64 for bytes)."""

    device: str
    length: int
    threshold: int
    c_key: X25519PrivateKey = field(default_factory=_new_key)
    s_key: X25519PrivateKey = field(default_factory=_new_key)
    self_seed: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    roster: dict[str, dict[str, bytes]] = field(default_factory=dict)
    shares: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # owner -> {"b": , "s": }
    masked_with: list[str] = field(default_factory=list)
    revealed: bool = False

    def advertise(self) -> dict[str, str]:
        return {
            "device": self.device,
            "c_pk": _b64(self.c_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)),
            "s_pk": _b64(self.s_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)),
        }

    def _aead(self, peer: str) -> AESGCM:
        pk = X25519PublicKey.from_public_bytes(self.roster[peer]["c_pk"])
        return AESGCM(_kdf(self.c_key.exchange(pk), b"pf-secagg-enc"))

    def share_keys(self, roster: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        """Given every advertised key (device -> {c_pk, s_pk}), return encrypted shares per recipient."""
        if len(roster) < self.threshold:
            raise SecAggAbort(f"secagg: {len(roster)} devices advertised keys, threshold is {self.threshold}")
        if self.device not in roster:
            raise SecAggError(f"secagg: {self.device} is missing from the roster")
        self.roster = {d: {k: _unb64(v[k], f"{d}.{k}") for k in ("c_pk", "s_pk")} for d, v in roster.items()}
        order = sorted(self.roster)
        n = len(order)
        s_raw = self.s_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        b_shares = shamir_split(int.from_bytes(self.self_seed, "big"), n, self.threshold)
        s_shares = shamir_split(int.from_bytes(s_raw, "big"), n, self.threshold)
        out = {}
        for i, peer in enumerate(order):
            share = {"b": b_shares[i], "s": s_shares[i]}
            if peer == self.device:
                self.shares[self.device] = share
                continue
            plain = json.dumps({"from": self.device, "to": peer, "b": share["b"], "s": share["s"]}).encode()
            nonce = secrets.token_bytes(12)
            ct = self._aead(peer).encrypt(nonce, plain, f"{self.device}>{peer}".encode())
            out[peer] = _b64(nonce + ct)
        return out

    def receive_shares(self, ciphertexts: Mapping[str, str]) -> None:
        """Decrypt and keep the shares other devices made for this one (sender -> ciphertext)."""
        for sender, text in ciphertexts.items():
            if sender not in self.roster:
                raise SecAggError(f"secagg: shares from {sender}, who did not advertise keys")
            raw = _unb64(text, f"share from {sender}")
            try:
                plain = json.loads(self._aead(sender).decrypt(raw[:12], raw[12:], f"{sender}>{self.device}".encode()))
            except (InvalidTag, ValueError) as exc:
                raise SecAggError(f"secagg: the share from {sender} does not decrypt") from exc
            if plain.get("from") != sender or plain.get("to") != self.device:
                raise SecAggError(f"secagg: the share from {sender} is addressed wrongly")
            self.shares[sender] = {"b": tuple(plain["b"]), "s": tuple(plain["s"])}

    def pair_seed(self, peer: str) -> bytes:
        return _kdf(self.s_key.exchange(X25519PublicKey.from_public_bytes(self.roster[peer]["s_pk"])), b"pf-secagg-mask")

    def masked_input(self, x: np.ndarray, mask_set: Sequence[str]) -> np.ndarray:
        """y = x + PRG(b) ± PRG(s_uv) for each other device v of `mask_set` (those who shared keys)."""
        x = np.asarray(x)
        if x.dtype != np.uint32 or x.shape != (self.length,):
            raise SecAggError(f"secagg: input must be uint32[{self.length}], got {x.dtype}{list(x.shape)}")
        y = x + prg(self.self_seed, self.length)
        for peer in sorted(set(mask_set) - {self.device}):
            mask = prg(self.pair_seed(peer), self.length)
            y = y + mask if self.device < peer else y - mask
        self.masked_with = sorted(set(mask_set))
        return y.astype(np.uint32)

    def unmask(self, survivors: Sequence[str], dropped: Sequence[str]) -> dict[str, dict[str, list[int]]]:
        """Shares of b for survivors and of s for dropped devices; refuses an overlap or a short list."""
        survivors, dropped = set(survivors), set(dropped)
        if survivors & dropped:
            raise SecAggError(f"secagg: {sorted(survivors & dropped)} listed as both survived and dropped")
        if not survivors | dropped <= set(self.masked_with) or self.device not in survivors:
            raise SecAggError("secagg: the unmask request names devices outside this round")
        if len(survivors) < self.threshold:
            raise SecAggAbort(f"secagg: {len(survivors)} survivors, threshold is {self.threshold}")
        self.revealed = True
        return {
            "b": {d: list(self.shares[d]["b"]) for d in sorted(survivors) if d in self.shares},
            "s": {d: list(self.shares[d]["s"]) for d in sorted(dropped) if d in self.shares},
        }


# ------------------------------------------------------------------------------------------- server side


@dataclass
class SecAggServer:
    """The aggregator's side of one round: routes messages, never sees an unmasked vector."""

    length: int
    threshold: int
    keys: dict[str, dict[str, str]] = field(default_factory=dict)
    routed: dict[str, dict[str, str]] = field(default_factory=dict)  # recipient -> {sender: ct}
    shared: set[str] = field(default_factory=set)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    unmask_replies: dict[str, dict[str, dict[str, list[int]]]] = field(default_factory=dict)

    def add_keys(self, msg: Mapping[str, str]) -> None:
        self.keys[str(msg["device"])] = {"c_pk": str(msg["c_pk"]), "s_pk": str(msg["s_pk"])}

    def roster(self) -> dict[str, dict[str, str]]:
        if len(self.keys) < self.threshold:
            raise SecAggAbort(f"secagg: {len(self.keys)} devices advertised keys, threshold is {self.threshold}")
        return dict(self.keys)

    def add_shares(self, sender: str, ciphertexts: Mapping[str, str]) -> None:
        if sender not in self.keys:
            raise SecAggError(f"secagg: shares from {sender}, who did not advertise keys")
        for recipient, ct in ciphertexts.items():
            self.routed.setdefault(recipient, {})[sender] = ct
        self.shared.add(sender)

    def mask_set(self) -> list[str]:
        if len(self.shared) < self.threshold:
            raise SecAggAbort(f"secagg: {len(self.shared)} devices shared keys, threshold is {self.threshold}")
        return sorted(self.shared)

    def shares_for(self, recipient: str) -> dict[str, str]:
        return {s: ct for s, ct in self.routed.get(recipient, {}).items() if s in self.shared}

    def add_masked(self, sender: str, y: np.ndarray) -> None:
        y = np.asarray(y)
        if sender not in self.shared:
            raise SecAggError(f"secagg: masked input from {sender}, who shared no keys")
        if y.dtype != np.uint32 or y.shape != (self.length,):
            raise SecAggError(f"secagg: masked input from {sender} must be uint32[{self.length}]")
        self.masked[sender] = y

    def unmask_request(self) -> dict[str, list[str]]:
        survivors = sorted(self.masked)
        if len(survivors) < self.threshold:
            raise SecAggAbort(f"secagg: {len(survivors)} masked inputs, threshold is {self.threshold}; round aborted")
        return {"survivors": survivors, "dropped": sorted(self.shared - set(survivors))}

    def add_unmask(self, sender: str, reply: Mapping[str, Mapping[str, list[int]]]) -> None:
        if sender not in self.masked:
            raise SecAggError(f"secagg: unmask reply from {sender}, who sent no masked input")
        self.unmask_replies[sender] = {k: dict(reply.get(k, {})) for k in ("b", "s")}

    def _rebuild(self, kind: str, owner: str) -> bytes:
        shares = [tuple(r[kind][owner]) for r in self.unmask_replies.values() if owner in r[kind]]
        if len(shares) < self.threshold:
            raise SecAggAbort(f"secagg: {len(shares)} shares of {owner}'s {kind}, threshold {self.threshold}")
        secret = shamir_combine(shares, self.threshold)
        if secret >= 1 << 256:  # honest shares rebuild a 256-bit seed: someone sent bad shares
            raise SecAggAbort(f"secagg: the shares of {owner}'s {kind} do not rebuild a 256-bit seed")
        return secret.to_bytes(32, "big")

    def unmasked_sum(self) -> np.ndarray:
        """sum(x_u) mod 2^32 over the survivors; SecAggAbort with fewer than t unmask replies."""
        req = self.unmask_request()
        if len(self.unmask_replies) < self.threshold:
            raise SecAggAbort(
                f"secagg: {len(self.unmask_replies)} unmask replies, threshold is {self.threshold}; round aborted"
            )
        total = np.zeros(self.length, np.uint32)
        for u in req["survivors"]:
            total = total + self.masked[u] - prg(self._rebuild("b", u), self.length)
        for v in req["dropped"]:
            s_key = X25519PrivateKey.from_private_bytes(self._rebuild("s", v))
            for u in req["survivors"]:
                peer_pk = X25519PublicKey.from_public_bytes(_unb64(self.keys[u]["s_pk"], f"{u}.s_pk"))
                mask = prg(_kdf(s_key.exchange(peer_pk), b"pf-secagg-mask"), self.length)
                total = total - mask if u < v else total + mask  # u added +mask when u < v
        return total.astype(np.uint32)
