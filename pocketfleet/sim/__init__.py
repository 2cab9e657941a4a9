"""Fleet simulators for the demo, the tests and the benchmarks (composition root: imports everything).

    from pocketfleet.sim import Fleet, make_digits_package
    with Fleet("work/fleet", devices=4, group="lab") as fleet:   # embedded broker, cloud, 4 devices
        v1 = make_digits_package("work/v1.pfpkg", 1, fleet.key)
        v2 = make_digits_package("work/v2.pfpkg", 2, fleet.key, head_seed=1)
        fleet.install_everywhere(v1)
        out = fleet.release(v2, canary="25%", gates=["golden>=0.9", "error_rate<=0.01"])
        print(fleet.wait(out["rollout_id"])["state"], fleet.versions())
"""

from __future__ import annotations

from pocketfleet.lazy import lazy_exports

_EXPORTS = {
    "Fleet": "pocketfleet.sim.fleet",
    "make_digits_package": "pocketfleet.sim.fleet",
    "swap_under_load": "pocketfleet.sim.swap",
    "demo_rounds": "pocketfleet.sim.fl_rounds",
    "TrafficSettings": "pocketfleet.sim.traffic",
    "DeviceTraffic": "pocketfleet.sim.traffic",
    "TrafficPool": "pocketfleet.sim.traffic",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
