"""Device profiles: what a target can run and how fast, as typed data loaded from TOML (torch-free).

A profile lives in `devices/profiles/<name>.toml`. Every figure carries a public source in the `sources`
table (a URL, a datasheet name, or "estimate: ..." explaining how it was derived). Sizes may be given in
bytes (`ram_bytes`) or mebibytes (`ram_mb`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pocketfleet.config import ConfigError, load_toml, parse_config

PROFILES_DIR = Path(__file__).parent / "profiles"
FORMATS = ("onnx", "tflite", "pte", "coreml")
DTYPES = ("fp32", "fp16", "int8")
_MB = 1 << 20


class ProfileError(ConfigError):
    """A device profile is missing, unknown or malformed (the message names the file and the field)."""


Format = Literal["onnx", "tflite", "pte", "coreml"]
Dtype = Literal["fp32", "fp16", "int8"]


@dataclass(frozen=True)
class DeviceProfile:
    """One inference target. Throughput and bandwidth are sustained-realistic figures for the runtime
    running with `threads` threads, not datasheet peaks."""

    name: str
    description: str
    cpu: str
    cores: int
    clock_ghz: float
    ram_bytes: int
    storage_budget_bytes: int  # bytes a model package may take on the device
    runtimes: tuple[Format, ...]  # package formats it runs: "onnx", "tflite", "pte", "coreml"
    preferred_format: str
    supported_dtypes: tuple[Dtype, ...]  # "fp32", "fp16", "int8"
    int8_accelerated: bool  # int8 dot-product instructions or an int8 accelerator on the modelled path
    threads: int  # threads the throughput figures assume
    throughput_gmacs: dict[Dtype, float]  # dtype -> sustained GMAC/s
    mem_bandwidth_gbs: float  # sustained GB/s
    op_overhead_us: dict[Format, float]  # format -> per-op dispatch cost, microseconds
    invoke_overhead_us: dict[Format, float]  # format -> fixed cost of one inference call, microseconds
    runtime_ram_bytes: dict[Format, int]  # format -> RAM the runtime itself needs
    sources: dict[str, str]
    weights_in_ram: bool = True  # False: weights execute in place from flash (microcontrollers)
    cache_bytes: int = 0  # last-level cache the threads share; 0: no cache level modelled
    cache_bandwidth_gbs: float = 0.0  # sustained GB/s for data resident in that cache
    accelerator: str = ""
    notes: str = ""
    measured: dict[str, Any] = field(default_factory=dict)  # probe details (host profile only)

    def __post_init__(self) -> None:  # TOML arrays arrive as lists
        object.__setattr__(self, "runtimes", tuple(self.runtimes))
        object.__setattr__(self, "supported_dtypes", tuple(self.supported_dtypes))

    def throughput(self, dtype: str) -> tuple[float, bool]:
        """GMAC/s for `dtype`; falls back to fp32 (second value False) when the dtype has no figure."""
        if dtype in self.throughput_gmacs:
            return self.throughput_gmacs[dtype], True
        return self.throughput_gmacs["fp32"], False

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["runtimes"] = list(self.runtimes)
        out["supported_dtypes"] = list(self.supported_dtypes)
        if not self.measured:
            out.pop("measured")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "<dict>") -> DeviceProfile:
        return _build(dict(data), origin)


# Fields that are facts about the device or runtime and therefore need a source.
FIGURE_FIELDS = (
    "cpu",
    "cores",
    "clock_ghz",
    "ram_bytes",
    "storage_budget_bytes",
    "runtimes",
    "supported_dtypes",
    "int8_accelerated",
    "throughput_gmacs",
    "mem_bandwidth_gbs",
    "op_overhead_us",
    "invoke_overhead_us",
    "runtime_ram_bytes",
    "cache_bytes",
    "cache_bandwidth_gbs",
)

_FIELDS = {f.name for f in dataclasses.fields(DeviceProfile)}
_MB_ALIASES = {"ram_mb": "ram_bytes", "storage_budget_mb": "storage_budget_bytes", "cache_mb": "cache_bytes"}


def _build(data: dict[str, Any], origin: str) -> DeviceProfile:
    for alias, target in _MB_ALIASES.items():
        if alias in data:
            if target in data:
                raise ProfileError(f"give either '{alias}' or '{target}', not both", alias, origin)
            if isinstance(data[alias], bool) or not isinstance(data[alias], (int, float)):
                raise ProfileError(f"expected a number, got {data[alias]!r}", alias, origin)
            data[target] = int(data.pop(alias) * _MB)
    if isinstance(data.get("runtime_ram_mb"), dict):
        if "runtime_ram_bytes" in data:
            raise ProfileError("give either 'runtime_ram_mb' or 'runtime_ram_bytes', not both", "runtime_ram_mb", origin)
        data["runtime_ram_bytes"] = {k: int(v * _MB) for k, v in data.pop("runtime_ram_mb").items()}
    try:
        profile, _ = parse_config(DeviceProfile, data, "")
    except ConfigError as exc:
        raise ProfileError(exc.problem, exc.path, origin) from None
    _validate(profile, origin)
    return profile


def _validate(p: DeviceProfile, origin: str) -> None:
    positive = {
        "cores": p.cores,
        "clock_ghz": p.clock_ghz,
        "ram_bytes": p.ram_bytes,
        "storage_budget_bytes": p.storage_budget_bytes,
        "threads": p.threads,
        "mem_bandwidth_gbs": p.mem_bandwidth_gbs,
        **{f"throughput_gmacs.{k}": v for k, v in p.throughput_gmacs.items()},
    }
    for key, value in positive.items():
        if value <= 0:
            raise ProfileError(f"{origin}: field '{key}' must be > 0, got {value}")
    if p.preferred_format not in p.runtimes:
        raise ProfileError(
            f"{origin}: field 'preferred_format' is {p.preferred_format!r}, not one of runtimes {list(p.runtimes)}"
        )
    if bool(p.cache_bytes) != bool(p.cache_bandwidth_gbs) or p.cache_bytes < 0 or p.cache_bandwidth_gbs < 0:
        raise ProfileError(
            f"{origin}: fields 'cache_bytes' and 'cache_bandwidth_gbs' must both be > 0, or both 0"
        )
    if "fp32" not in p.throughput_gmacs:
        raise ProfileError(f"{origin}: field 'throughput_gmacs' needs an 'fp32' entry")
    for key in ("op_overhead_us", "invoke_overhead_us", "runtime_ram_bytes"):
        missing = [f for f in p.runtimes if f not in getattr(p, key)]
        if missing:
            raise ProfileError(f"{origin}: field '{key}' has no entry for runtime '{missing[0]}'")
    for key in p.sources:
        if key.split(".")[0] not in _FIELDS:
            raise ProfileError(f"{origin}: field 'sources.{key}' names no profile field")
    unsourced = missing_sources(p)
    if unsourced:
        raise ProfileError(f"{origin}: field '{unsourced[0]}' has no entry in [sources]")


def missing_sources(p: DeviceProfile) -> list[str]:
    """Figure fields (and table entries) with no source; a table may be sourced as a whole."""
    out = []
    for key in FIGURE_FIELDS:
        value = getattr(p, key)
        if key.startswith("cache_") and not value:
            continue  # optional, not modelled
        if key in p.sources and p.sources[key].strip():
            continue
        if isinstance(value, dict) and value and all(p.sources.get(f"{key}.{k}", "").strip() for k in value):
            continue
        out.append(key)
    return out


def load_profile_file(path: str | Path) -> DeviceProfile:
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"device profile not found: {path}")
    profile = _build(load_toml(path, ProfileError), str(path))
    if profile.name != path.stem:
        raise ProfileError(f"{path}: field 'name' is {profile.name!r} but the file is named {path.stem!r}")
    return profile


def profile_names() -> list[str]:
    """Names of the bundled profiles plus the live `host` profile."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml")) + ["host"]


def list_profiles(include_host: bool = False) -> list[DeviceProfile]:
    """The bundled profiles (and the probed host when `include_host`, which may run the probe)."""
    profiles = [load_profile_file(p) for p in sorted(PROFILES_DIR.glob("*.toml"))]
    if include_host:
        profiles.append(load_profile("host"))
    return profiles


def load_profile(name: str | DeviceProfile) -> DeviceProfile:
    """A bundled profile by name, `host` (probed live, cached), or a path to a .toml profile file."""
    if isinstance(name, DeviceProfile):
        return name
    if name == "host":
        from devices.probe import probe_host

        return probe_host()
    path = PROFILES_DIR / f"{name}.toml"
    if path.is_file():
        return load_profile_file(path)
    if name.endswith(".toml") and Path(name).is_file():
        return load_profile_file(name)
    raise ProfileError(f"unknown device {name!r}; known devices: {', '.join(profile_names())}")
