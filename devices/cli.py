"""`pocketfleet devices ...`: list and show device profiles, estimate a model on a device."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands (parsers only; handlers import lazily)."""
    from pocketfleet import add_json_flag

    parser = subparsers.add_parser(
        "devices",
        help="device profiles, cost estimates, live host probe",
        description="Device profiles (what a target runs and how fast), static cost estimates of a model "
        "on a device, and a live probe of this machine (the 'host' device).",
    )
    sub = parser.add_subparsers(dest="devices_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: _help(parser))

    p = sub.add_parser("list", help="list the known device profiles", description="List the device profiles.")
    p.add_argument(
        "--host", action="store_true", help="include the live 'host' profile (probes on first use)"
    )
    add_json_flag(p)
    p.set_defaults(func=_list)

    p = sub.add_parser(
        "show",
        help="show one device profile with its sources",
        description="Show one device profile; 'host' measures this machine (cached; --refresh measures again).",
    )
    p.add_argument("name", help="profile name (see 'pocketfleet devices list'), 'host', or a .toml file")
    p.add_argument("--refresh", action="store_true", help="re-run the host probe instead of using the cache")
    add_json_flag(p)
    p.set_defaults(func=_show)

    p = sub.add_parser(
        "estimate",
        help="estimate latency, RAM and storage of a model on a device",
        description="Estimate a .pfpkg package or a bare .onnx/.tflite model on a device: MACs, parameters, "
        "peak activation memory, modelled latency and whether it fits. On 'host' the model is also run "
        "(1 thread, batch 1) and the measured latency is reported next to the estimate.",
    )
    p.add_argument("model", help="a .pfpkg package, .onnx or .tflite file")
    p.add_argument("--device", required=True, help="profile name, 'host', or a .toml profile file")
    p.add_argument(
        "--seq-len", type=int, default=128, help="length of dynamic sequence dimensions (default 128)"
    )
    p.add_argument(
        "--measure",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the model on this machine (default: only for --device host)",
    )
    p.add_argument("--ops", action="store_true", help="include the per-op breakdown")
    p.add_argument("--refresh", action="store_true", help="re-run the host probe first (with --device host)")
    add_json_flag(p)
    p.set_defaults(func=_estimate)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _list(args: argparse.Namespace) -> int:
    import re

    from devices.profile import list_profiles
    from pocketfleet import emit, table

    rows = [
        {
            "name": p.name,
            "cpu": re.split(r"[,(:@]", p.cpu)[0].strip(),
            "threads": p.threads,
            "fp32_gmacs": p.throughput_gmacs["fp32"],
            "int8_gmacs": p.throughput_gmacs.get("int8", ""),
            "ram_mb": _mb(p.ram_bytes),
            "storage_mb": _mb(p.storage_budget_bytes),
            "runtimes": ",".join(p.runtimes),
        }
        for p in list_profiles(include_host=args.host)
    ]
    if not args.json and not args.host:
        rows.append({"name": "host", "cpu": "(this machine, probed: pocketfleet devices show host)"})
    emit(rows, args.json, lambda r: table(r))
    return 0


def _mb(n: int) -> float | int:
    return round(n / 2**20, 1) if n < 10 * 2**20 else n // 2**20


def _show(args: argparse.Namespace) -> int:
    from devices.probe import probe_host
    from devices.profile import load_profile
    from pocketfleet import emit

    profile = probe_host(refresh=True) if args.name == "host" and args.refresh else load_profile(args.name)
    emit(profile.to_dict(), args.json, _render_profile)
    return 0


def _render_profile(d: dict[str, Any]) -> str:
    lines = [f"{d['name']}: {d['description']}"]
    for key in (
        "cpu", "accelerator", "cores", "clock_ghz", "threads", "ram_bytes", "storage_budget_bytes", "runtimes",
        "preferred_format", "supported_dtypes", "int8_accelerated", "throughput_gmacs", "mem_bandwidth_gbs",
        "cache_bytes", "cache_bandwidth_gbs", "op_overhead_us", "invoke_overhead_us", "runtime_ram_bytes", "weights_in_ram",
    ):  # fmt: skip
        if d.get(key) not in (None, ""):
            value = d[key]
            if isinstance(value, list):
                value = ", ".join(value)
            elif isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            source = d["sources"].get(key, "")
            lines.append(f"  {key:22} {value}" + (f"\n  {'':22}   source: {source}" if source else ""))
    if d.get("notes"):
        lines.append("  notes: " + d["notes"])
    if d.get("measured"):
        lines.append(f"  probed at {d['measured'].get('timestamp')}")
    return "\n".join(lines)


def _estimate(args: argparse.Namespace) -> int:
    from devices.estimate import estimate
    from devices.probe import probe_host
    from pocketfleet import emit

    device: Any = args.device
    if args.device == "host" and args.refresh:
        device = probe_host(refresh=True)
    result = estimate(args.model, device, seq_len=args.seq_len, measure=args.measure)
    emit(result.to_dict(include_ops=args.ops), args.json, _render_estimate)
    return 0


def _render_estimate(d: dict[str, Any]) -> str:
    from pocketfleet import table

    mb = 2**20
    lines = [
        f"{d['model']} ({d['format']}) on {d['device']}, batch 1, seq_len {d['seq_len']}",
        f"  MACs               {d['macs']:,}",
        f"  parameters         {d['params_bytes'] / mb:.3f} MiB",
        f"  peak activations   {d['peak_activation_bytes'] / mb:.3f} MiB",
        f"  ops dispatched     {d['op_count']}",
        f"  estimated latency  {d['estimated_ms']:.4g} ms (compute {d['compute_ms']:.3g}, memory "
        f"{d['memory_ms']:.3g}, overhead {d['overhead_ms']:.3g})",
    ]
    if d.get("measured_ms") is not None:
        lines.append(
            f"  measured latency   {d['measured_ms']:.4g} ms (median of {d['measured_runs']} runs, "
            f"{d['measured_threads']} thread(s)); measured/estimated = {d['ratio']:.2f}"
        )
        lines.append(
            f"  measured CPU time  {d['measured_cpu_ms']:.4g} ms (calling thread); CPU/estimated = {d['cpu_ratio']:.2f}"
        )
    lines += [
        f"  RAM                {d['ram_needed_bytes'] / mb:.2f} of {d['ram_bytes'] / mb:.1f} MiB "
        f"-> {'fits' if d['fits_ram'] else 'DOES NOT FIT'}",
        f"  storage            {d['storage_needed_bytes'] / mb:.3f} of {d['storage_budget_bytes'] / mb:.1f} MiB "
        f"-> {'fits' if d['fits_storage'] else 'DOES NOT FIT'}",
        f"  runtime / dtypes   {'ok' if d['format_supported'] else 'format not supported'}, "
        f"{'ok' if d['dtypes_supported'] else 'dtype not supported'}",
    ]
    lines += [f"  warning: {w}" for w in d["warnings"]]
    if d.get("ops"):
        rows = [
            {k: op[k] for k in ("index", "op_type", "kind", "dtype", "macs", "bytes_moved", "weight_bytes")}
            for op in d["ops"]
        ]
        lines += ["", table(rows)]
    return "\n".join(lines)
