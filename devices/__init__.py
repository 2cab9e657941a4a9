"""devices: target profiles as data, a static cost model, and a live probe of the host (torch-free).

    from devices import load_profile, estimate, analyze_model
    estimate("digits-cnn.pfpkg", "raspberry-pi-4").estimated_ms
    analyze_model("model.onnx").macs

onnx and LiteRT are imported only when a model of that format is analysed.
"""

from __future__ import annotations

from devices.analysis import ModelAnalysis, OpCost, analyze_model, count_macs
from devices.cost import CostEstimate, estimate_cost
from devices.estimate import Estimate, Measurement, estimate, measure_model
from devices.graph import ModelReadError
from devices.probe import probe_host
from devices.profile import DeviceProfile, ProfileError, list_profiles, load_profile, profile_names

__all__ = [
    "CostEstimate",
    "DeviceProfile",
    "Estimate",
    "Measurement",
    "ModelAnalysis",
    "ModelReadError",
    "OpCost",
    "ProfileError",
    "analyze_model",
    "count_macs",
    "estimate",
    "estimate_cost",
    "list_profiles",
    "load_profile",
    "measure_model",
    "probe_host",
    "profile_names",
]
