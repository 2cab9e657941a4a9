"""The agent stage of `pocketfleet demo`: start an agent, install a package, swap to the next ones while
client threads keep asking, and report what every version answered (for the demo's table).

    from pocketfleet.sim.swap import swap_under_load
    result = swap_under_load("demo/agent-state", "keys/pocketfleet.pub", [pkg_v1, pkg_v2])
    result["rows"]   # one row per version served: requests, failures, p50/max latency
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.client import Client
from edge_agent.config import AgentConfig
from edge_agent.daemon import Agent
from edge_agent.store import ModelStore


def swap_under_load(
    state_dir: str | Path, trust: str | Path, packages: Sequence[str | Path], clients: int = 2, dwell_s: float = 1.0
) -> dict[str, Any]:
    """Install packages[0], serve, then install each next package (same model name, higher version)
    while `clients` threads predict on the packages' own sample inputs; returns rows and swap timings."""
    store = ModelStore(state_dir, str(trust))
    first = store.install(packages[0])
    agent = Agent(AgentConfig(state_dir=str(state_dir), trust=str(trust), listen="127.0.0.1:0", watch_interval_s=0.05)).start()
    model = agent.model(first.name)
    inputs = _sample_inputs(model)
    stop = threading.Event()
    seen: dict[int, list[float]] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def load() -> None:
        with Client(agent.urls()[0]) as c:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    version = c.predict(inputs, model=first.name).model["version"]
                except Exception as exc:  # reported, never hidden
                    with lock:
                        failures.append(repr(exc))
                    continue
                with lock:
                    seen.setdefault(version, []).append(time.perf_counter() - t)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(clients)]
    swaps = []
    try:
        for t in threads:
            t.start()
        time.sleep(dwell_s)
        for pkg in packages[1:]:
            t0 = time.perf_counter()
            res = store.install(pkg)
            agent.reload()
            swaps.append({"from": res.previous, "to": res.version, "install_and_swap_s": round(time.perf_counter() - t0, 3)})
            time.sleep(dwell_s)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        agent.stop()
    rows = [
        {
            "model": first.name,
            "version": v,
            "requests": len(lat),
            "p50_ms": round(float(np.median(lat)) * 1e3, 3),
            "max_ms": round(float(np.max(lat)) * 1e3, 3),
        }
        for v, lat in sorted(seen.items())
    ]
    return {"rows": rows, "swaps": swaps, "failures": len(failures), "errors": failures[:5]}


def _sample_inputs(model: Any) -> dict[str, np.ndarray]:
    from export.samples import Samples

    path = model.path / model.manifest.samples["path"]
    samples = Samples.from_bytes(path.read_bytes(), model.manifest.samples)
    return {k: v[:1] for k, v in samples.inputs.items()}
