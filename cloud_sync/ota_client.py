"""The device side of OTA (torch-free): fetch a release's missing chunks, resume, verify, install, report.

Flow for one pf.cmd.update/1 command (docs/protocol.md has the messages):

1. Refuse without downloading when the command expired, the release is bigger than `max_package_bytes`,
   it was rolled back on this device before, or it is older than what the store has run and carries no
   valid signed rollback authorization. A release already active is reported installed at once.
2. Fetch the chunk index (its SHA-256 is in the command), then cut the files of the installed versions
   with the release's chunking parameters: every chunk found locally is copied, the rest is requested from
   the cloud in a sliding window (optionally under a bandwidth cap). Each chunk is checked against its
   SHA-256 before it is written at its offset in `ota/job.part`; a bad chunk is counted and fetched again.
3. Progress (which chunks are on disk) is saved in `ota/job.have`, so a disconnect or a restart of the
   process resumes where it stopped; chunks the broker queued for the persistent session still count.
4. When complete: whole-package SHA-256, then `ModelStore.install` (signature, hashes, expiry, version,
   health check, atomic switch), then the canary probe if the command asks for one, then the report.

A pf.cmd.rollback/1 cancels a download of that release or, if the release is active, switches the store
back to its previous known-good version; the release id is remembered and never installed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_sync.chunks import ChunkIndex, Chunking, LocalChunks, file_sha256
from cloud_sync.client import Message, MqttClient
from cloud_sync.errors import OtaError, ProtocolError
from cloud_sync.ota_admission import Refused, admit
from cloud_sync.ota_job import JOB_FILES, OtaJob
from cloud_sync.ports import ModelStoreLike
from cloud_sync.protocol import (
    FRAME_INDEX,
    MAX_REQUEST_IDX,
    Counters,
    decode,
    decode_frame,
    dev_topic,
    encode,
    is_multicast_topic,
)
from pocketfleet.fs import atomic_write_bytes, atomic_write_json

log = logging.getLogger("pocketfleet.ota")

@dataclass
class OtaSettings:
    """Device-side OTA tuning ([mqtt.ota] in the agent config)."""

    window: int = 16  # chunks requested ahead of what arrived
    window_bytes: int = 2 << 20  # ... and at most this many bytes (large chunks): bounds redelivery after a drop
    chunk_timeout_s: float = 10.0  # no chunk for this long: ask again for what is outstanding
    max_chunk_retries: int = 8  # a chunk failing verification this often fails the job
    bandwidth_bps: int = 0  # average cap on requested chunk bytes per second (0 = none)
    max_package_bytes: int = 1 << 30
    progress_every_s: float = 5.0
    multicast: bool = True  # take a release's chunks from its group multicast topic when the command names one

    def check(self, where: str) -> None:
        from cloud_sync.errors import ConfigError

        if not 1 <= self.window <= 1024:
            raise ConfigError(f"{where}: window must be in [1, 1024], got {self.window}")
        if self.bandwidth_bps < 0 or self.max_package_bytes < 1 or self.chunk_timeout_s <= 0:
            raise ConfigError(f"{where}: bandwidth_bps >= 0, max_package_bytes >= 1, chunk_timeout_s > 0")


class OtaClient:
    """OTA for one device, bound to its agent state directory and model store.

    `client` is the device's MqttClient (shared with presence and the outbox sink); `on_change` is called
    after the active version changed (the DeviceLink republishes the device status).
    """

    def __init__(self, device_id: str, client: MqttClient, store: ModelStoreLike, state_dir: str | Path,
                 settings: OtaSettings | None = None, on_change: Callable[[], None] | None = None,
                 install_slots: threading.Semaphore | None = None) -> None:
        self.device = device_id
        self.client = client
        self.store = store
        # installs (verify, extract, health check) and probes hold a model in memory: a simulator running
        # many devices in one process shares one semaphore to bound them; a real device needs none
        self.install_slots: Any = install_slots or contextlib.nullcontext()
        self.settings = settings or OtaSettings()
        self.on_change = on_change
        self.dir = Path(state_dir) / "ota"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.counters = Counters()
        self._state = self._load_state()
        self._cmds: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._kick = False  # the worker has something to do (set under _wake)
        self._job: OtaJob | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = int(time.time() * 1000)
        self.last_report: dict[str, Any] | None = None
        self.reports: list[dict[str, Any]] = []  # in-memory history (tests, demo)
        # the download on disk is picked up before the client connects: chunks the broker kept for the
        # persistent session arrive first thing and must find their job, or they are dropped and refetched
        self._resume_job()
        client.subscribe(dev_topic(device_id, "cmd"), self._on_cmd, qos=1)
        client.subscribe(dev_topic(device_id, "chunk"), self._on_chunk, qos=1)

    # ----------------------------------------------------------------------------------------- state

    def _load_state(self) -> dict[str, Any]:
        try:
            state = json.loads((self.dir / "state.json").read_text())
            if isinstance(state, dict):
                return {"revoked": list(state.get("revoked", [])), "rollback_floor": float(state.get("rollback_floor", 0)),
                        "last": state.get("last")}
        except (OSError, ValueError, TypeError):
            pass
        return {"revoked": [], "rollback_floor": 0.0, "last": None}

    def _save_state(self) -> None:
        self._state["revoked"] = self._state["revoked"][-256:]
        atomic_write_json(self.dir / "state.json", self._state)

    def next_seq(self) -> int:
        with self._lock:
            self._seq = max(self._seq + 1, int(time.time() * 1000))
            return self._seq

    def summary(self) -> dict[str, Any] | None:
        """The `ota` object of the device status: the last command's release and state."""
        return self._state.get("last")

    # -------------------------------------------------------------------------------------- lifecycle

    def start(self) -> OtaClient:
        if self._job is None:  # started again after stop()
            self._resume_job()
        self._thread = threading.Thread(target=self._run, name=f"{self.device}-ota", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            if self._job is not None:
                self._job.save()
                self._job.close()
                self._job = None  # chunks still in flight now count as stale; job.* files stay for resume

    def on_reconnect(self, session_present: bool) -> None:
        """After a reconnect without a session, whatever was outstanding is lost: ask again now."""
        with self._wake:
            job = self._job
            if job is not None and not session_present:
                job.last_progress = 0.0
                job.index_requested = 0.0
                job.again = True
            self._kick = True
            self._wake.notify_all()

    def _resume_job(self) -> None:
        path = self.dir / "job.json"
        if not path.exists():
            return
        try:
            cmd = json.loads(path.read_text())
            decode(json.dumps(cmd).encode(), ("pf.cmd.update/1",))
        except (OSError, ValueError, ProtocolError) as exc:
            log.warning("%s: discarding unreadable OTA job: %s", self.device, exc)
            self._clear_job_files()
            return
        job = OtaJob(self.dir, cmd)
        idx_path = self.dir / "job.index"
        if idx_path.exists():
            raw = idx_path.read_bytes()
            if hashlib.sha256(raw).hexdigest() == job.release["index_sha256"]:
                job.open(ChunkIndex.from_bytes(raw), raw)
                recovered = job.recover_written()
                if recovered:
                    log.info("%s: %d chunks were on disk past the last saved bitmap", self.device, recovered)
        self._job = job
        log.info("%s: resuming download of release %s", self.device, job.release_id)

    # ---------------------------------------------------------------------------------- incoming

    def _on_cmd(self, msg: Message) -> None:
        cmd = decode(msg.payload, ("pf.cmd.update/1", "pf.cmd.rollback/1"))
        self.counters.add("commands")
        with self._wake:
            self._cmds.append(cmd)
            self._wake.notify_all()

    def _on_chunk(self, msg: Message) -> None:
        frame = decode_frame(msg.payload)
        with self._wake:
            job = self._job
            if job is None or frame.release_id != job.release_id or (frame.kind != FRAME_INDEX and job.fd is None):
                self.counters.add("stale_chunks")
                return
            if frame.kind == FRAME_INDEX:
                if job.index is None:
                    job.index_raw = bytes(frame.data)
                    self._kick = True
                    self._wake.notify_all()
                return
            index = job.index
            i = frame.idx
            if index is None or i >= len(index):
                self.counters.add("stale_chunks")
                return
            asked = job.outstanding.pop(i, None)
            now = time.monotonic()
            if asked is not None:
                job.rtt = (now - asked) if not job.rtt else 0.8 * job.rtt + 0.2 * (now - asked)
            job.last_progress = now
            job.again = False
            size = len(frame.data)
            job.bytes_rx += size
            if job.has(i):
                self.counters.add("duplicate_chunks")
                self.counters.add("duplicate_bytes", size)
                return
            if size != index.sizes[i] or frame.offset != index.offsets[i] \
                    or hashlib.sha256(frame.data).hexdigest() != index.hashes[i]:
                self.counters.add("bad_chunks")
                job.retries[i] = job.retries.get(i, 0) + 1
                log.warning("%s: chunk %d of release %s failed verification (attempt %d); fetching it again",
                            self.device, i, job.release_id, job.retries[i])
                self._kick = True
                self._wake.notify_all()
                return
            os.pwrite(job.fd, frame.data, index.offsets[i])  # type: ignore[arg-type]
            job.mark(i)
            self.counters.add("chunks")
            if len(job.outstanding) <= self.settings.window // 2 or not job.missing:
                self._kick = True
                self._wake.notify_all()

    # ----------------------------------------------------------------------------------- reporting

    def _active(self, name: str) -> dict[str, Any] | None:
        try:
            state = self.store.read_state().get(name)
        except Exception:  # noqa: BLE001 - an unreadable state reads as "nothing active"
            return None
        if state is None or state.active is None:
            return None
        return {"name": name, "version": state.active}

    def _report(self, state: str, cmd: dict[str, Any] | None, name: str | None = None, **extra: Any) -> None:
        rel = (cmd or {}).get("release") or {}
        release_id = rel.get("release_id") or (cmd or {}).get("release_id")
        name = name or rel.get("name") or (cmd or {}).get("name")
        body = {
            "device": self.device, "seq": self.next_seq(), "ts": time.time(), "state": state,
            "rollout_id": (cmd or {}).get("rollout_id"), "release_id": release_id,
            "active": self._active(name) if name else None, **extra,
        }
        payload = encode("pf.ota.report/1", **body)
        self.client.publish(dev_topic(self.device, "ota"), payload, qos=1)
        self.last_report = body
        self.reports.append(body)
        if state != "downloading":
            self._state["last"] = {"release_id": release_id, "rollout_id": body["rollout_id"], "state": state,
                                   "name": name}
            self._save_state()
            log.info("%s: release %s %s%s", self.device, release_id, state,
                     f" ({extra['error']})" if extra.get("error") else "")

    # --------------------------------------------------------------------------------------- worker

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                if not self._cmds and not self._kick:  # idle: commands, reconnects and stop() notify
                    self._wake.wait(0.5 if self._job is not None else 5.0)
                self._kick = False
                cmd = self._cmds.popleft() if self._cmds else None
            if self._stop.is_set():
                return
            try:
                if cmd is not None:
                    self._handle(cmd)
                if self._job is not None:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything
                self.counters.add("job_errors")
                log.exception("%s: OTA step failed", self.device)
                job = self._job
                if job is not None:
                    self._report("failed", job.cmd, error=f"{type(exc).__name__}: {exc}"[:2000])
                    self._drop_job()

    def _handle(self, cmd: dict[str, Any]) -> None:
        if cmd["schema"] == "pf.cmd.rollback/1":
            self._rollback(cmd)
            return
        rel = cmd["release"]
        job = self._job
        if job is not None and job.release_id == rel["release_id"]:
            job.cmd = cmd  # newer command (rollout / phase) for the same release: keep the download
            atomic_write_json(self.dir / "job.json", cmd)
            return
        try:
            allow_downgrade = self._admit(cmd)
        except Refused as exc:
            self.counters.add("refused")
            self._report("refused", cmd, error=str(exc))
            return
        if allow_downgrade is None:  # already active
            self._report("installed", cmd, probe=self._probe(cmd, rel["name"], rel["version"]))
            return
        if job is not None:
            log.info("%s: release %s replaces the download of %s", self.device, rel["release_id"], job.release_id)
            self._drop_job()
        self._clear_job_files()
        atomic_write_json(self.dir / "job.json", cmd)
        with self._lock:
            self._job = OtaJob(self.dir, cmd)
            self._kick = True
        self._report("accepted", cmd)

    def _join_multicast(self, job: OtaJob) -> None:
        """Subscribe to the release's group multicast topic (named in the command) for this download.

        Joined with the first chunk request (SUBSCRIBE goes out before it on the same connection, so the
        broker has it when the cloud answers) and left when every chunk is here: a device takes the
        multicast only while it lacks chunks. What arrives there is handled like a unicast chunk:
        verified against the chunk index whose SHA-256 the device's own command carries."""
        topic = job.cmd.get("multicast")
        if not self.settings.multicast or job.mc_topic or not is_multicast_topic(topic, job.release_id):
            return
        job.mc_topic, job.mc = topic, True
        self.client.subscribe(topic, self._on_chunk, qos=1)

    def _leave_multicast(self, job: OtaJob) -> None:
        if job.mc_topic:
            self.client.unsubscribe(job.mc_topic)
            job.mc_topic, job.mc = None, False

    def _admit(self, cmd: dict[str, Any]) -> bool | None:
        """Checks before downloading: returns allow_downgrade, None when already active; Refused otherwise."""
        return admit(cmd, self.store, self.settings.max_package_bytes, self._state["revoked"],
                     self._state["rollback_floor"])

    def _rollback(self, cmd: dict[str, Any]) -> None:
        rid = cmd["release_id"]
        if rid not in self._state["revoked"]:
            self._state["revoked"].append(rid)
            self._save_state()
        job = self._job
        if job is not None and job.release_id == rid:
            self._drop_job()
            self._report("rolled_back", cmd, name=cmd["name"])
            return
        active = self._active(cmd["name"])
        if active is not None and active["version"] == cmd["version"]:
            try:
                result = self.store.rollback(cmd["name"])
            except Exception as exc:  # noqa: BLE001
                self._report("failed", cmd, name=cmd["name"], error=f"rollback failed: {exc}"[:2000])
                return
            log.info("%s: rolled back %s v%s -> v%s", self.device, cmd["name"], cmd["version"], result["version"])
            self._changed()
        self._report("rolled_back", cmd, name=cmd["name"])

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # noqa: BLE001
                log.exception("%s: status update failed", self.device)

    def _drop_job(self) -> None:
        with self._lock:
            job, self._job = self._job, None
        if job is not None:
            self._leave_multicast(job)
            job.close()
        self._clear_job_files()

    def _clear_job_files(self) -> None:
        for name in JOB_FILES:
            (self.dir / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------- download

    def _step(self) -> None:
        job = self._job
        assert job is not None
        if job.index is None:
            self._step_index(job)
            return
        if not job.missing:
            self._finish(job)
            return
        s = self.settings
        now = time.monotonic()
        with self._wake:
            too_often = [i for i, n in job.retries.items() if n >= s.max_chunk_retries]
            if too_often:
                raise OtaError(f"chunk {too_often[0]} failed verification {s.max_chunk_retries} times")
            retry = [i for i in job.retries if i in job.missing and i not in job.outstanding]
            if job.outstanding and now - job.last_progress > max(s.chunk_timeout_s, 4 * job.rtt):
                retry += list(job.outstanding)  # lost or expired: ask again
                self.counters.add("timeouts")
                job.mc = False  # a multicast that did not arrive (e.g. refused by the broker): unicast from now on
                job.outstanding.clear()
                job.last_progress = now
            budget = s.window - len(job.outstanding)
            want: list[int] = []
            for i in retry:
                if len(want) >= budget:
                    break
                if i not in want:
                    want.append(i)
                    job.refetched += 1
            retried = len(want)
            if len(want) < budget and budget >= max(1, s.window // 2):
                for i in sorted(job.missing):
                    if len(want) >= budget:
                        break
                    if i not in job.outstanding and i not in want:
                        want.append(i)
            want = self._throttle(job, self._fit_window(job, want))
            for i in want:
                job.outstanding[i] = now
                job.bytes_requested += job.index.sizes[i]
            again = job.again
        # re-requests say so: the cloud drops repeats of recently sent chunks (MQTT-level redeliveries of a
        # request after a reconnect) unless the device asks again on purpose
        parts = [(want[:retried], True), (want[retried:], again)]
        if want[retried:] and not again and not job.mc_topic and not job.refetched:
            self._join_multicast(job)
        for idx, flag in parts:
            for k in range(0, len(idx), MAX_REQUEST_IDX):
                self._request(job, idx[k : k + MAX_REQUEST_IDX], again=flag, mc=job.mc and not flag)
        if now - getattr(job, "_saved", 0.0) > 0.5:
            job.save()
            job._saved = now  # type: ignore[attr-defined]
        if now - getattr(job, "_reported", 0.0) > s.progress_every_s:
            job._reported = now  # type: ignore[attr-defined]
            self._report("downloading", job.cmd, progress=job.progress())
        if not job.missing:
            self._kick = True

    def _fit_window(self, job: OtaJob, want: list[int]) -> list[int]:
        assert job.index is not None
        sizes = job.index.sizes
        used = sum(sizes[i] for i in job.outstanding)
        out = []
        for i in want:
            if (out or job.outstanding) and used + sizes[i] > self.settings.window_bytes:
                break
            out.append(i)
            used += sizes[i]
        return out

    def _throttle(self, job: OtaJob, want: list[int]) -> list[int]:
        rate = self.settings.bandwidth_bps
        if not rate or not want or job.index is None:
            return want
        allowed = rate * (time.monotonic() - job.started) + max(job.index.sizes)
        out, planned = [], job.bytes_requested
        for i in want:
            if planned + job.index.sizes[i] > allowed:
                break
            out.append(i)
            planned += job.index.sizes[i]
        return out

    def _request(self, job: OtaJob, idx: list[int], index: bool = False, again: bool = False,
                 mc: bool = False) -> None:
        extra = {"mc": True} if mc else {}
        payload = encode("pf.chunk.request/1", release_id=job.release_id, idx=idx, index=index, again=again, **extra)
        self.client.publish(dev_topic(self.device, "req"), payload, qos=1)
        self.counters.add("requests")

    def _step_index(self, job: OtaJob) -> None:
        rel = job.release
        raw = job.index_raw
        if raw is not None:
            if len(raw) != rel["index_size"] or hashlib.sha256(raw).hexdigest() != rel["index_sha256"]:
                self.counters.add("bad_chunks")
                job.index_raw = None
                job.index_requested = 0.0
                log.warning("%s: chunk index of %s failed verification; fetching it again", self.device, job.release_id)
                return
            index = ChunkIndex.from_bytes(raw)
            if index.total != rel["size"] or len(index) != rel["chunks"]:
                raise OtaError(f"chunk index covers {index.total} bytes in {len(index)} chunks, the release says "
                               f"{rel['size']} in {rel['chunks']}")
            atomic_write_bytes(self.dir / "job.index", raw)
            with self._wake:
                job.open(index, raw)
                self._kick = True
            self._reuse_local(job)
            return
        now = time.monotonic()
        if now - job.index_requested > self.settings.chunk_timeout_s:
            job.index_requested = now
            self._request(job, [], index=True)

    def _local_sources(self) -> list[Path]:
        """Files of installed versions (as the store extracted them)."""
        out = []
        versions = getattr(self.store, "versions", None)
        if versions is not None and Path(versions).is_dir():
            for path in sorted(Path(versions).rglob("*")):
                if path.is_file() and path.name not in ("manifest.sig",):
                    out.append(path)
        return out

    def _reuse_local(self, job: OtaJob) -> None:
        index = job.index
        assert index is not None
        local = LocalChunks(Chunking.from_dict(job.release["chunking"]), self.dir / "cdc-cache")
        for path in self._local_sources():
            local.add_file(path)
        reused = 0
        for i in sorted(job.missing):
            data = local.read(index.hashes[i])
            if data is not None:
                os.pwrite(job.fd, data, index.offsets[i])  # type: ignore[arg-type]
                with self._lock:
                    job.mark(i)
                reused += len(data)
        job.bytes_reused += reused
        job.save()
        self.counters.add("bytes_reused", reused)
        log.info("%s: release %s: %d of %d bytes found locally, fetching %d chunks", self.device, job.release_id,
                 reused, index.total, len(job.missing))

    # --------------------------------------------------------------------------------------- finish

    def _finish(self, job: OtaJob) -> None:
        assert job.index is not None and job.fd is not None
        self._leave_multicast(job)  # every chunk is here: stop taking the stage's multicast
        os.fsync(job.fd)
        job.save()
        if file_sha256(job.part) != job.release["sha256"]:
            bad = self._recheck_chunks(job)
            if not bad:
                raise OtaError("every chunk matches the index but the package hash does not: the index is wrong")
            log.warning("%s: %d chunk(s) damaged on disk; fetching them again", self.device, len(bad))
            return
        job.close()
        pkg = self.dir / "job.pfpkg"
        os.replace(job.part, pkg)
        cmd = job.cmd
        rel = job.release
        allow_downgrade = bool(rel.get("rollback_auth"))
        from export.errors import DowngradeError, VerificationError

        try:
            with self.install_slots:
                result = self.store.install(pkg, allow_downgrade=allow_downgrade)
        except (DowngradeError, VerificationError) as exc:
            self.counters.add("refused")
            self._report("refused", cmd, progress=job.progress(), error=str(exc)[:2000])
            self._drop_job()
            return
        except Exception as exc:  # noqa: BLE001 - health check failures and the like
            self._report("failed", cmd, progress=job.progress(), error=f"{type(exc).__name__}: {exc}"[:2000])
            self._drop_job()
            return
        if allow_downgrade:
            self._state["rollback_floor"] = json.loads(rel["rollback_auth"])["doc"]["issued"]
            self._save_state()
        self._changed()
        probe = self._probe(cmd, result.name, result.version)
        progress = job.progress()
        self._drop_job()
        self._report("installed", cmd, progress=progress, probe=probe)

    def _recheck_chunks(self, job: OtaJob) -> list[int]:
        assert job.index is not None
        bad = [i for i in range(len(job.index)) if not job.intact(i)]
        with self._lock:
            for i in bad:
                job.mark(i, present=False)
        job.refetched += len(bad)
        return bad

    def _probe(self, cmd: dict[str, Any], name: str, version: int) -> dict[str, Any] | None:
        probe = cmd.get("probe")
        if not probe:
            return None
        from cloud_sync.probe import run_probe

        try:
            with self.install_slots:
                loaded = self.store.load(name, version)
                return run_probe(loaded, int(probe.get("runs", 20)))
        except Exception as exc:  # noqa: BLE001 - a model that cannot be probed counts as all errors
            log.warning("%s: probe of %s v%s failed: %s", self.device, name, version, exc)
            return {"requests": 1, "errors": 1, "p95_ms": 0.0, "golden": None, "golden_kind": None}
