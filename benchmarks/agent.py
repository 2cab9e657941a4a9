"""The on-device agent on digits-cnn, in one run:

- latency: agent API (keep-alive client, binary .npy and JSON) against a direct onnxruntime call through
  export.runtimes, p50/p99, interleaved in blocks so that machine noise hits both alike;
- throughput with 1, 4 and 16 concurrent clients (separate processes, one keep-alive connection each);
- >= 10 hot swaps under sustained load from 4 client processes: requests, failures, latency during swaps;
- cold start (process start to first answer) and idle RSS with both runtimes loaded (onnxruntime and LiteRT).

The agent runs as `pocketfleet agent run` in its own process, exactly as on a device; clients are
`edge_agent.Client`. The digits-cnn model is trained by compress.zoo and exported (ONNX and TFLite fp32)
by export.export_model once, then cached in --workdir.

    python benchmarks/agent.py                 # about 2-4 minutes after the first (cached) setup
    python benchmarks/agent.py --quick         # shorter phases, for a smoke test

Writes benchmarks/results/agent.json. Goals (issue 5): p50 overhead <= max(15%, 0.3 ms); zero failed
requests across >= 10 swaps under load; cold start < 2 s; idle RSS <= 150 MB with both runtimes loaded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.client import Client  # noqa: E402
from edge_agent.store import ModelStore  # noqa: E402
from pocketfleet import table  # noqa: E402
from pocketfleet.timing import summarize  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
NAME, TFL_NAME = "digits-cnn", "digits-cnn-tflite"


# ---------------------------------------------------------------------------------------------- setup


def prepare(work: Path, swaps: int) -> dict[str, Any]:
    """Keys, the digits-cnn model dir, ONNX + TFLite packages (cached), and swap packages v2..v(swaps+1)."""
    from export import Samples, build_package, export_model, extract_package, generate_keys

    work.mkdir(parents=True, exist_ok=True)
    keys = work / "keys"
    if not (keys / "pocketfleet.key").exists():
        generate_keys(keys)
    priv, pub = str(keys / "pocketfleet.key"), str(keys / "pocketfleet.pub")
    onnx_pkg, tfl_pkg = work / "digits-cnn-onnx-v1.pfpkg", work / "digits-cnn-tflite-v1.pfpkg"
    if not onnx_pkg.exists() or not tfl_pkg.exists():
        from compress.zoo import load_model_dir, make_model_dir

        model_dir = work / "digits-cnn"
        if not (model_dir / "meta.json").exists() and not any(model_dir.glob("*")):
            make_model_dir(NAME, model_dir, progress=False)
        log("exporting digits-cnn to ONNX and TFLite (parity-checked)")
        lm = load_model_dir(model_dir)
        export_model(lm, "onnx", "fp32", out=onnx_pkg, name=NAME, version=1, key=priv)
        export_model(lm, "tflite", "fp32", out=tfl_pkg, name=TFL_NAME, version=1, key=priv)
    extracted = work / "onnx-v1"
    if not extracted.exists():
        extract_package(onnx_pkg, extracted, pub)
    manifest = json.loads((extracted / "manifest.json").read_text())
    samples = Samples.from_bytes((extracted / manifest["samples"]["path"]).read_bytes(), manifest["samples"])
    swap_pkgs = []
    keep = ("format", "dtype", "inputs", "outputs", "workload", "preprocessing", "report", "device")
    for v in range(2, swaps + 2):
        pkg = work / f"digits-cnn-onnx-v{v}.pfpkg"
        if not pkg.exists():
            fields = {k: manifest[k] for k in keep if k in manifest}
            build_package({manifest["model"]: extracted / manifest["model"]}, {**fields, "name": NAME, "version": v},
                          samples, pkg, key=priv)
        swap_pkgs.append(pkg)
    return {"pub": pub, "onnx": onnx_pkg, "tflite": tfl_pkg, "model_file": extracted / manifest["model"],
            "inputs": samples.inputs["image"], "swap_pkgs": swap_pkgs}


def log(msg: str) -> None:
    print(f"[agent-bench] {msg}", file=sys.stderr, flush=True)


def start_agent(state: Path, pub: str, *extra: str) -> tuple[subprocess.Popen, str, float, float]:
    """Start `pocketfleet agent run`; returns (process, url, wall seconds from start to the first 200
    answer, CPU seconds the agent process used until then)."""
    port_file = state / "agent.json"
    port_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pocketfleet", "agent", "run", "--state-dir", str(state), "--trust", pub,
         "--listen", "127.0.0.1:0", "--log-level", "warning", *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    x = np.zeros((1, 1, 8, 8), np.float32)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            info = json.loads(port_file.read_text())
            if info.get("pid") == proc.pid:
                with Client(info["urls"][0], timeout=10) as c:
                    c.predict({"image": x}, model=NAME)
                return proc, info["urls"][0], time.perf_counter() - t0, cpu_seconds(proc.pid)
        except (OSError, ValueError, KeyError):
            pass
        except Exception:  # not answering yet
            pass
        time.sleep(0.002)
        if time.perf_counter() - t0 > 60:
            proc.kill()
            raise RuntimeError("agent did not answer within 60 s")


def stop_agent(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_mb": round(fields["VmRSS"], 1), "peak_rss_mb": round(fields["VmHWM"], 1)}


# ---------------------------------------------------------------------------------------------- load workers


def _worker(url: str, inputs: np.ndarray, seconds: float, barrier: Any, conn: Any) -> None:
    """One client process: connect, wait for all clients, then predict in a loop for `seconds`."""
    lat, versions, failures, errors = [], {}, 0, []
    with Client(url, timeout=30) as c:
        c.health()  # connected before the clock starts
        barrier.wait()
        stop_at = time.perf_counter() + seconds
        i = 0
        while True:
            t = time.perf_counter()
            if t >= stop_at:
                break
            try:
                pred = c.predict({"image": inputs[i % len(inputs)][None]}, model=NAME)
                lat.append(time.perf_counter() - t)
                v = pred.model["version"]
                versions[v] = versions.get(v, 0) + 1
            except Exception as exc:  # every failure is counted and reported
                failures += 1
                if len(errors) < 5:
                    errors.append(repr(exc))
            i += 1
    conn.send({"latencies": lat, "versions": versions, "failures": failures, "errors": errors})
    conn.close()


def run_load(url: str, inputs: np.ndarray, clients: int, seconds: float, during: Any = None) -> dict[str, Any]:
    """`clients` client processes for `seconds` (all start together); `during()` runs meanwhile."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(clients + 1)
    pipes, procs = [], []
    for _ in range(clients):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(url, inputs, seconds, barrier, child))
        p.start()
        pipes.append(parent)
        procs.append(p)
    barrier.wait()
    extra = during(time.time() + seconds) if during is not None else None
    results = [p.recv() for p in pipes]
    for p in procs:
        p.join()
    lat = np.concatenate([np.asarray(r["latencies"]) for r in results]) if results else np.array([])
    versions: dict[int, int] = {}
    for r in results:
        for v, n in r["versions"].items():
            versions[v] = versions.get(v, 0) + n
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": int(lat.size),
        "failures": int(sum(r["failures"] for r in results)),
        "errors": [e for r in results for e in r["errors"]][:5],
        "throughput_rps": round(lat.size / seconds, 1),
        "latency": summarize(lat).to_dict() if lat.size else None,
        "max_ms": round(float(lat.max()) * 1e3, 3) if lat.size else None,
        "versions": {str(k): n for k, n in sorted(versions.items())},
        "during": extra,
    }


# ---------------------------------------------------------------------------------------------- phases


AGENT_PATHS = ("agent_npy", "agent_json", "agent_npy_unix")


def latency(url: str, unix: str, setup: dict[str, Any], rounds: int, block: int) -> dict[str, Any]:
    """Direct runtime call vs the agent API (TCP .npy and JSON, Unix socket .npy), interleaved blocks of
    `block` calls, `rounds` times."""
    from export.runtimes import load_runtime

    rt = load_runtime(setup["model_file"], threads=1)
    xs = [x[None].copy() for x in setup["inputs"]]
    times: dict[str, list[float]] = {"direct": [], **{k: [] for k in AGENT_PATHS}}
    with Client(url) as c, Client(f"unix:{unix}") as u:
        calls = {
            "direct": lambda x: rt.run({"image": x}),
            "agent_npy": lambda x: c.predict({"image": x}, model=NAME),
            "agent_json": lambda x: c.predict({"image": x}, model=NAME, binary=False),
            "agent_npy_unix": lambda x: u.predict({"image": x}, model=NAME),
        }
        for fn in calls.values():  # warm-up
            for i in range(200):
                fn(xs[i % len(xs)])
        for _ in range(rounds):
            for name, fn in calls.items():
                out = times[name]
                for i in range(block):
                    t = time.perf_counter()
                    fn(xs[i % len(xs)])
                    out.append(time.perf_counter() - t)
    stats = {k: summarize(v).to_dict() for k, v in times.items()}
    d50 = stats["direct"]["p50_ms"]
    for k in AGENT_PATHS:
        stats[k]["overhead_ms"] = round(stats[k]["p50_ms"] - d50, 4)
        stats[k]["overhead_ratio"] = round(stats[k]["p50_ms"] / d50 - 1, 3)
    stats["allowed_overhead_ms"] = round(max(0.15 * d50, 0.3), 4)
    return stats


def swaps_under_load(url: str, state: Path, setup: dict[str, Any], clients: int) -> dict[str, Any]:
    store = ModelStore(state, setup["pub"])
    pkgs = setup["swap_pkgs"]
    seconds = max(6.0, 0.9 * len(pkgs))

    def do_swaps(stop_at: float) -> dict[str, Any]:
        records = []
        with Client(url) as c:
            time.sleep(0.3)
            for pkg in pkgs:
                t0 = time.perf_counter()
                res = store.install(pkg)  # what `pocketfleet agent install` does ...
                t1 = time.perf_counter()
                c.reload()  # ... then it asks the running agent to swap now
                while c.health()["models"][NAME]["version"] != res.version:
                    time.sleep(0.001)
                t2 = time.perf_counter()
                records.append({"version": res.version, "install_s": round(t1 - t0, 4), "switch_s": round(t2 - t1, 4)})
                time.sleep(0.25)
        return {"swaps": len(records), "records": records, "finished_before_load_stopped": time.time() < stop_at}

    out = run_load(url, setup["inputs"], clients, seconds, during=do_swaps)
    return out


def cold_start_and_rss(work: Path, setup: dict[str, Any], runs: int) -> dict[str, Any]:
    state = work / "state-both"
    if not state.exists():
        store = ModelStore(state, setup["pub"])
        store.install(setup["onnx"])
        store.install(setup["tflite"])
    starts, cpus, rss = [], [], {}
    x = setup["inputs"][:1]
    for i in range(runs):
        proc, url, seconds, cpu = start_agent(state, setup["pub"])
        starts.append(round(seconds, 3))
        cpus.append(round(cpu, 3))
        if i == runs - 1:
            with Client(url) as c:
                served = c.health()["models"]
                for _ in range(50):
                    c.predict({"image": x}, model=NAME)
                    c.predict({"image": x}, model=TFL_NAME)
            time.sleep(2.0)
            rss = {**rss_mb(proc.pid), "models": sorted(served)}
        stop_agent(proc)
    return {"cold_start_s": starts, "cold_start_median_s": float(np.median(starts)), "cold_start_cpu_s": cpus,
            "cold_start_cpu_median_s": float(np.median(cpus)), "idle": rss}


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short phases (smoke test)")
    ap.add_argument("--workdir", default="/tmp/pocketfleet-bench-agent", help="cache of the model and packages")
    ap.add_argument("--out", default=str(OUT / "agent.json"))
    ap.add_argument("--swaps", type=int, default=12)
    args = ap.parse_args()
    work = Path(args.workdir)
    quick = args.quick
    load_before = os.getloadavg()
    setup = prepare(work, args.swaps)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": [round(v, 2) for v in load_before]},
        "model": {"name": NAME, "format": "onnx", "dtype": "fp32", "threads": 1},
    }
    log("cold start and idle RSS (ONNX + TFLite models loaded)")
    result["cold_start"] = cold_start_and_rss(work, setup, runs=3 if quick else 5)

    state = work / "state-swap"
    if state.exists():
        import shutil

        shutil.rmtree(state)
    ModelStore(state, setup["pub"]).install(setup["onnx"])
    unix = str(state / "agent.sock")
    proc, url, _, _ = start_agent(state, setup["pub"], "--unix-socket", unix)
    try:
        log("latency: direct runtime call vs agent API")
        result["latency"] = latency(url, unix, setup, rounds=4 if quick else 10, block=250 if quick else 500)
        result["throughput"] = []
        for n in (1, 4, 16):
            log(f"throughput with {n} concurrent clients")
            result["throughput"].append(run_load(url, setup["inputs"], n, 2.0 if quick else 5.0))
        log(f"{len(setup['swap_pkgs'])} swaps under load from 4 clients")
        result["swaps"] = swaps_under_load(url, state, setup, clients=4)
    finally:
        stop_agent(proc)
    result["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["goals"] = goals(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    print(f"\nwrote {args.out}")
    return 0


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    lat, sw, cold = r["latency"], r["swaps"], r["cold_start"]
    allowed = lat["allowed_overhead_ms"]
    return [
        {"goal": "p50 overhead <= max(15%, 0.3 ms) (npy)", "value": f"{lat['agent_npy']['overhead_ms']:.3f} ms ({lat['agent_npy']['overhead_ratio']:+.0%})",
         "limit": f"{allowed:.3f} ms", "met": lat["agent_npy"]["overhead_ms"] <= allowed},
        {"goal": "p50 overhead <= max(15%, 0.3 ms) (JSON)", "value": f"{lat['agent_json']['overhead_ms']:.3f} ms ({lat['agent_json']['overhead_ratio']:+.0%})",
         "limit": f"{allowed:.3f} ms", "met": lat["agent_json"]["overhead_ms"] <= allowed},
        {"goal": "p50 overhead <= max(15%, 0.3 ms) (npy, Unix socket)", "value": f"{lat['agent_npy_unix']['overhead_ms']:.3f} ms ({lat['agent_npy_unix']['overhead_ratio']:+.0%})",
         "limit": f"{allowed:.3f} ms", "met": lat["agent_npy_unix"]["overhead_ms"] <= allowed},
        {"goal": "zero failed requests across >= 10 swaps under load", "value": f"{sw['failures']} failed / {sw['requests']} requests, {sw['during']['swaps']} swaps",
         "limit": "0, >= 10", "met": sw["failures"] == 0 and sw["during"]["swaps"] >= 10},
        {"goal": "cold start to first answer < 2 s", "value": f"{cold['cold_start_median_s']:.3f} s wall (median of {len(cold['cold_start_s'])}; {cold['cold_start_cpu_median_s']:.2f} s CPU)",
         "limit": "2 s", "met": cold["cold_start_median_s"] < 2.0},
        {"goal": "idle RSS <= 150 MB, onnxruntime + LiteRT loaded", "value": f"{cold['idle']['rss_mb']:.1f} MB",
         "limit": "150 MB", "met": cold["idle"]["rss_mb"] <= 150},
    ]


def render(r: dict[str, Any]) -> str:
    lat = r["latency"]
    rows = [{"path": k, "p50 ms": lat[k]["p50_ms"], "p99 ms": lat[k]["p99_ms"], "mean ms": lat[k]["mean_ms"],
             "overhead ms": lat[k].get("overhead_ms", ""), "overhead": f"{lat[k]['overhead_ratio']:+.0%}" if "overhead_ratio" in lat[k] else "",
             "runs": lat[k]["runs"]} for k in ("direct", *AGENT_PATHS)]
    thr = [{"clients": t["clients"], "req/s": t["throughput_rps"], "p50 ms": t["latency"]["p50_ms"], "p99 ms": t["latency"]["p99_ms"],
            "failures": t["failures"]} for t in r["throughput"]]
    sw = r["swaps"]
    switch = [s["switch_s"] for s in sw["during"]["records"]]
    swap_rows = [{"swaps": sw["during"]["swaps"], "requests": sw["requests"], "failures": sw["failures"],
                  "p50 ms": sw["latency"]["p50_ms"], "p99 ms": sw["latency"]["p99_ms"], "max ms": sw["max_ms"],
                  "versions served": len(sw["versions"]), "switch s (median)": float(np.median(switch)) if switch else None}]
    cold = r["cold_start"]
    return "\n\n".join([
        "latency, batch 1 (digits-cnn, onnxruntime, 1 thread)\n" + table(rows),
        "throughput (client processes, keep-alive)\n" + table(thr),
        "hot swaps under load (4 client processes)\n" + table(swap_rows),
        f"cold start to first answer: {cold['cold_start_s']} s wall, {cold['cold_start_cpu_s']} s CPU of the agent; idle RSS {cold['idle']['rss_mb']} MB "
        f"(peak {cold['idle']['peak_rss_mb']} MB) serving {cold['idle']['models']}",
        "goals\n" + table(r["goals"]),
        f"machine: {r['machine']['cpus']} CPUs, load average {r['machine']['loadavg_start']} -> {r['machine']['loadavg_end']}",
    ])


if __name__ == "__main__":
    sys.exit(main())
