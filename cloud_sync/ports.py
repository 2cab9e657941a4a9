"""The seams between cloud_sync's device side and whoever runs it (the agent, a simulator): small
Protocols, so that cloud_sync never imports edge_agent. `edge_agent.store.ModelStore` and
`edge_agent.outbox.Record` satisfy them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol


class ModelState(Protocol):
    """One model's entry in the store's state: the version it serves (None: nothing yet)."""

    active: int | None
    highest: int


class InstallOutcome(Protocol):
    version: int
    resumed: bool


class ModelStoreLike(Protocol):
    """What OTA needs of a device's model store: read its state, install, roll back, load for a probe."""

    trust: Any  # the trust setting (a key file or a directory of *.pub) packages are verified against

    def read_state(self) -> Mapping[str, ModelState]: ...

    def install(self, package: str | Path, allow_downgrade: bool = False) -> Any: ...

    def rollback(self, name: str) -> Any: ...

    def load(self, name: str, version: int | None = None) -> Any: ...


class OutboxRecord(Protocol):
    """A durable outbox record, as a sink receives it."""

    id: int
    kind: str
    created: int
    payload: bytes

    def json(self) -> Any: ...


class RecordSink(Protocol):
    """Where an outbox drains: `send` returns the ids the far end acknowledged (safe to delete)."""

    def send(self, records: Sequence[OutboxRecord]) -> Iterable[int]: ...
