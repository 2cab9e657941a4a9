"""The `host` device profile, measured live on this machine and cached (torch-free).

    profile = probe_host()              # cached under $POCKETFLEET_CACHE or ~/.cache/pocketfleet
    profile = probe_host(refresh=True)  # measure again

What is measured (one thread everywhere, to match how `estimate` times models on the host):
  - cores (scheduler affinity), RAM (/proc/meminfo, capped by a cgroup limit), free disk, CPU model/clock;
  - fp32 and int8 matmul throughput in onnxruntime (MatMul / MatMulInteger, 512^3), and numpy's
    float32 matmul GFLOP/s for reference;
  - memory bandwidth (a 64 MiB numpy copy: bytes read + written per second), the last-level cache size
    (sysfs) and the bandwidth of a copy whose source and destination fit in it;
  - per-op dispatch and per-call overhead of each runtime: a chain of 64 tiny element-wise ops timed
    against a chain of 1 through export.runtimes (the same call path `estimate` measures);
  - the RAM each runtime takes (resident set growth when it is imported and loads a model).
The measurements run in a subprocess with BLAS/OpenMP pinned to one thread, so they neither depend on
nor disturb the caller's thread pools; times are the calling thread's CPU time, so a busy machine does
not make the host look slower than it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from devices.profile import DeviceProfile, ProfileError
from pocketfleet.fs import atomic_write_json
from pocketfleet.timing import time_calls

SCHEMA = "pocketfleet.host-probe/1"
PROBE_DIR = Path(__file__).parent / "probe_models"
CHAIN = 64  # ops in the long probe chain (devices/_build_probe_models.py)
MATMUL = 512
_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def cache_dir() -> Path:
    return Path(os.environ.get("POCKETFLEET_CACHE") or Path.home() / ".cache" / "pocketfleet")


def cache_path() -> Path:
    return cache_dir() / "host-probe.json"


def probe_host(refresh: bool = False, cache: Path | None = None) -> DeviceProfile:
    """The host profile: from the cache when it matches this machine and software, else measured now."""
    path = cache or cache_path()
    key = _cache_key()
    if not refresh and path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("schema") == SCHEMA and doc.get("key") == key:
                return DeviceProfile.from_dict(doc["profile"], origin=str(path))
        except (OSError, ValueError, KeyError, ProfileError):
            pass  # unreadable or stale cache: measure again
    profile = _build_profile(_run_worker(), path.parent)
    doc = {
        "schema": SCHEMA,
        "key": key,
        "timestamp": profile.measured["timestamp"],
        "profile": profile.to_dict(),
    }
    with contextlib.suppress(OSError):  # a read-only home still gets a (not cached) profile
        atomic_write_json(path, doc)
    return profile


def _cache_key() -> dict[str, Any]:
    """What invalidates a cached probe: another CPU, core count or runtime version."""
    return {
        "cpu": _cpu_model(),
        "cores": _cores(),
        "python": platform.python_version(),
        "runtimes": _runtime_versions(),
    }


def _runtime_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("onnxruntime", "ai-edge-litert", "tflite-runtime", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


# ---------------------------------------------------------------------------------------------- static facts


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() not in out:
                out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")  # what int8 kernels use


def cpu_summary() -> dict[str, object]:
    """This host's CPU model and the int8-relevant instruction-set flags it reports (for benchmark JSON:
    int8-vs-fp32 ratios depend on them)."""
    flags = set((_cpuinfo().get("flags") or _cpuinfo().get("Features") or "").split())
    return {"model": _cpu_model(), "cpus": os.cpu_count(), "int8_flags": [f for f in INT8_FLAGS if f in flags]}


def _cpu_model() -> str:
    info = _cpuinfo()
    for key in ("model name", "Model", "Hardware", "Processor", "cpu model"):
        if info.get(key):
            return info[key]
    return platform.processor() or platform.machine() or "unknown"


def _clock_ghz() -> tuple[float, str]:
    try:
        khz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text().strip())
        return khz / 1e6, "measured: /sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    mhz = _cpuinfo().get("cpu MHz")
    if mhz:
        return float(mhz) / 1e3, "measured: /proc/cpuinfo 'cpu MHz' (current clock; no cpufreq max exposed)"
    return 1.0, "unknown: no cpufreq or /proc/cpuinfo clock; 1.0 GHz placeholder"


def _ram_bytes() -> tuple[int, str]:
    total, source = 0, ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total, source = int(line.split()[1]) * 1024, "measured: /proc/meminfo MemTotal"
                break
    except (OSError, ValueError):
        pass
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            source = "measured: sysconf(SC_PHYS_PAGES)"
        except (ValueError, OSError, AttributeError):
            total, source = 1 << 30, "unknown: 1 GiB placeholder"
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(Path(limit_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if 0 < limit < total:
            return limit, f"measured: cgroup limit {limit_file} (below MemTotal)"
    return total, source


def _last_level_cache() -> tuple[int, str]:
    """Size in bytes of the highest cache level of cpu0 (data or unified), from sysfs; 0 if unknown."""
    best_level, size = 0, 0
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or level < best_level:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            best_level, size = level, int(text.rstrip("KMGB")) * unit
        except ValueError:
            continue
    if not size:
        return 0, ""
    return size, f"measured: /sys/devices/system/cpu/cpu0/cache (L{best_level}, shared with other cores)"


def _int8_accelerated() -> tuple[bool, str]:
    flags = set((_cpuinfo().get("flags") or _cpuinfo().get("Features") or "").split())
    found = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})
    if found:
        return True, f"measured: /proc/cpuinfo flags {', '.join(found)} (int8 dot-product instructions)"
    return False, "measured: /proc/cpuinfo has no VNNI/AMX/dot-product flags"


# ---------------------------------------------------------------------------------------------- measurement


def _run_worker() -> dict[str, Any]:
    env = dict(os.environ)
    env.update({k: "1" for k in _THREAD_ENV})
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "devices.probe", "--worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ProfileError(f"the host probe failed (exit {proc.returncode}): {tail[0][:300]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _median_us(fn: Any, runs: int) -> float:
    """Median CPU time of the calling thread per call of `fn`, in microseconds.

    Everything probed runs on the calling thread (one-thread sessions, BLAS pinned to one thread), so
    thread CPU time measures the machine and not how busy it is; wall-clock best-of would be preempted
    on a loaded machine.
    """
    stats = time_calls(fn, min_runs=runs, min_seconds=0.0, max_runs=runs, warmup_seconds=0.0)
    return float(stats.cpu_p50_ms or 0.0) * 1e3


def _runtime_overheads(fmt: str) -> dict[str, Any]:
    """Per-op and per-call overhead of one runtime from the chain models, plus its RAM footprint."""
    import numpy as np

    from export.runtimes import load_runtime

    rss0 = _rss_bytes()
    short = load_runtime(PROBE_DIR / f"chain1.{fmt}", threads=1)
    long = load_runtime(PROBE_DIR / f"chain{CHAIN}.{fmt}", threads=1)
    rss = _rss_bytes() - rss0
    rng = np.random.default_rng(0)
    feeds = {s.name: rng.random((1, 16), dtype=np.float32) for s in short.inputs}
    feeds_long = dict(zip([s.name for s in long.inputs], feeds.values(), strict=True))
    t_short, t_long = [], []
    for _ in range(5):  # interleave rounds so drift on a shared machine hits both alike
        for _ in range(50):
            short.run(feeds)
            long.run(feeds_long)
        t_short.append(_median_us(lambda: short.run(feeds), 400))
        t_long.append(_median_us(lambda: long.run(feeds_long), 400))
    one, many = float(np.median(t_short)), float(np.median(t_long))
    per_op = max((many - one) / (CHAIN - 1), 0.0)
    return {
        "op_overhead_us": per_op,
        "invoke_overhead_us": max(one - per_op, 0.0),
        "chain1_us": one,
        f"chain{CHAIN}_us": many,
        "runtime_ram_bytes": max(rss, 0),
    }


def _matmul_gmacs(int8: bool) -> float:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    name = "matmul_int8.onnx" if int8 else "matmul_fp32.onnx"
    session = ort.InferenceSession(str(PROBE_DIR / name), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    n = MATMUL
    if int8:
        feeds = {
            "a": rng.integers(0, 255, (n, n), dtype=np.uint8),
            "b": rng.integers(-127, 127, (n, n), dtype=np.int8),
        }
    else:
        feeds = {"a": rng.random((n, n), dtype=np.float32), "b": rng.random((n, n), dtype=np.float32)}
    for _ in range(3):
        session.run(None, feeds)
    best = min(_median_us(lambda: session.run(None, feeds), 1) for _ in range(12))
    return n**3 / (best * 1e-6) / 1e9


def _numpy_matmul_gflops() -> float:
    import numpy as np

    a = np.random.default_rng(0).random((MATMUL, MATMUL), dtype=np.float32)
    for _ in range(3):
        a @ a
    best = min(_median_us(lambda: a @ a, 1) for _ in range(12))
    return 2 * MATMUL**3 / (best * 1e-6) / 1e9


def _bandwidth_gbs() -> float:
    import numpy as np

    src = np.ones(64 << 18, dtype=np.float32)  # 64 MiB: well past the last-level cache
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_median_us(lambda: np.copyto(dst, src), 1) for _ in range(6))
    return 2 * src.nbytes / (best * 1e-6) / 1e9


def _cache_bandwidth_gbs(cache_bytes: int) -> float:
    """Copy bandwidth with source + destination filling a quarter of the last-level cache."""
    import numpy as np

    n = max(cache_bytes // 8 // 4, 16 << 10)  # float32 elements per array: 2 arrays = cache / 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    reps = max(1, (64 << 20) // (2 * src.nbytes))  # ~64 MiB moved per timing: amortizes the call cost

    def copies() -> None:
        for _ in range(reps):
            np.copyto(dst, src)

    copies()
    best = min(_median_us(copies, 1) for _ in range(6))
    return 2 * src.nbytes * reps / (best * 1e-6) / 1e9


def _worker() -> dict[str, Any]:
    """Everything that needs timing; runs in the probe subprocess."""
    import importlib.util

    out: dict[str, Any] = {"runtimes": {}}
    has_ort = importlib.util.find_spec("onnxruntime") is not None
    has_litert = any(importlib.util.find_spec(m) for m in ("ai_edge_litert", "tflite_runtime"))
    import numpy  # noqa: F401  - loaded before the runtimes so their RSS growth excludes it

    if has_litert:
        out["runtimes"]["tflite"] = _runtime_overheads("tflite")
    if has_ort:
        out["runtimes"]["onnx"] = _runtime_overheads("onnx")
        out["ort_fp32_gmacs"] = _matmul_gmacs(int8=False)
        out["ort_int8_gmacs"] = _matmul_gmacs(int8=True)
    out["numpy_fp32_gflops"] = _numpy_matmul_gflops()
    out["mem_bandwidth_gbs"] = _bandwidth_gbs()
    cache_bytes, _ = _last_level_cache()
    if cache_bytes:
        out["cache_bandwidth_gbs"] = _cache_bandwidth_gbs(cache_bytes)
    return out


def _build_profile(m: dict[str, Any], disk_dir: Path) -> DeviceProfile:
    if not m["runtimes"]:
        raise ProfileError("the host has neither onnxruntime nor LiteRT installed: nothing to probe")
    clock, clock_src = _clock_ghz()
    ram, ram_src = _ram_bytes()
    int8_acc, int8_src = _int8_accelerated()
    cache_bytes, cache_src = _last_level_cache()
    cache_bw = m.get("cache_bandwidth_gbs", 0.0) if cache_bytes else 0.0
    probe_dir = disk_dir
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    free = shutil.disk_usage(probe_dir).free
    runtimes = tuple(f for f in ("onnx", "tflite") if f in m["runtimes"])
    rt = m["runtimes"]
    chain = f"a chain of {CHAIN} vs 1 tiny Add/Mul ops via export.runtimes, 1 thread, median thread CPU time of 5x400 runs"
    if "ort_fp32_gmacs" in m:
        fp32 = m["ort_fp32_gmacs"]
        throughput = {"fp32": fp32, "int8": m["ort_int8_gmacs"]}
        tp_src = f"measured: onnxruntime MatMul / MatMulInteger {MATMUL}x{MATMUL}x{MATMUL}, 1 thread, best thread CPU time of 12"
    else:
        fp32 = m["numpy_fp32_gflops"] / 2
        throughput = {"fp32": fp32}
        tp_src = f"measured: numpy float32 matmul {MATMUL}^3, 1 thread (no onnxruntime to time)"
    stamp = datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return DeviceProfile(
        name="host",
        description="this machine, measured live by devices/probe.py (1 thread)",
        cpu=_cpu_model(),
        cores=_cores(),
        clock_ghz=round(clock, 3),
        ram_bytes=ram,
        storage_budget_bytes=free,
        runtimes=runtimes,
        preferred_format="onnx" if "onnx" in runtimes else runtimes[0],
        supported_dtypes=tuple(d for d in ("fp32", "int8") if d in throughput),
        int8_accelerated=int8_acc,
        threads=1,
        throughput_gmacs={k: round(v, 3) for k, v in throughput.items()},
        mem_bandwidth_gbs=round(m["mem_bandwidth_gbs"], 3),
        op_overhead_us={f: round(rt[f]["op_overhead_us"], 4) for f in runtimes},
        invoke_overhead_us={f: round(rt[f]["invoke_overhead_us"], 3) for f in runtimes},
        runtime_ram_bytes={f: int(rt[f]["runtime_ram_bytes"]) for f in runtimes},
        cache_bytes=cache_bytes if cache_bw else 0,
        cache_bandwidth_gbs=round(cache_bw, 3),
        sources={
            "cache_bytes": cache_src,
            "cache_bandwidth_gbs": "measured: numpy copy with source + destination = 1/4 of the last-level "
            "cache, ~64 MiB moved per timing, best thread CPU time of 6",
            "cpu": "measured: /proc/cpuinfo (platform.processor() elsewhere)",
            "cores": "measured: os.sched_getaffinity (os.cpu_count elsewhere)",
            "clock_ghz": clock_src,
            "ram_bytes": ram_src,
            "storage_budget_bytes": f"measured: free disk at {probe_dir} (shutil.disk_usage)",
            "runtimes": "measured: importable onnxruntime / LiteRT",
            "supported_dtypes": "measured: dtypes whose matmul ran in onnxruntime",
            "int8_accelerated": int8_src,
            "throughput_gmacs": tp_src,
            "mem_bandwidth_gbs": "measured: numpy copy of a 64 MiB float32 array, (read+write bytes)/s, best thread CPU time of 6",
            "op_overhead_us": f"measured: {chain}; (t64 - t1) / 63",
            "invoke_overhead_us": f"measured: {chain}; t1 - one op",
            "runtime_ram_bytes": "measured: resident-set growth when the runtime loads the two chain models",
        },
        notes="Live measurements on one thread; fp16 models are costed at the fp32 rate (no fp16 matmul probe).",
        measured={
            "timestamp": stamp,
            "numpy_fp32_gflops": round(m["numpy_fp32_gflops"], 3),
            "runtimes": rt,
            "versions": _runtime_versions(),
        },
    )


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker()))
