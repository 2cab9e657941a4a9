"""`quantize` step: compress.quantize on the final model, producing the int8 (or fp16) [[targets]]."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from compress.quantize.config import QuantConfig
from pocketfleet import PocketfleetError

from .base import Artifact, Failure, Step, register_step

if TYPE_CHECKING:
    from ..runner import Pipeline
    from ..schema import Recipe, Target


@register_step
class QuantizeStep(Step):
    """QuantConfig options (mode, calibration, max_drop, float_layers, ...). The formats come from the
    [[targets]] whose dtype this mode makes (int8 for static / dynamic / qat, fp16 for fp16); the
    calibration rows from [data.calibration]."""

    type = "quantize"
    kind = "export"
    config_cls = QuantConfig
    excluded = {
        "formats": "set by the [[targets]] entries (format, dtype) that this step produces",
        "calib_samples": "set by [data.calibration] samples",
    }

    @property
    def dtype(self) -> str:
        return "fp16" if self.config.mode == "fp16" else "int8"

    def claims(self, target: Target) -> bool:
        from ..schema import QUANTIZE_FORMATS

        return target.dtype == self.dtype and target.format in QUANTIZE_FORMATS

    def check_recipe(self, recipe: Recipe) -> None:
        if not any(self.claims(t) for t in recipe.targets):
            raise self.error(
                f"mode {self.config.mode!r} makes {self.dtype} artifacts, but no [[targets]] entry has "
                f'dtype = "{self.dtype}"',
                "mode",
            )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("formats", None)
        out.pop("calib_samples", None)
        return out

    def export(self, pipeline: Pipeline, targets: list[tuple[int, Target]]) -> list[Artifact | Failure]:
        """One quantize() call per package name and version over the formats it needs; packages of targets
        with a key are signed afterwards."""
        from compress.quantize import quantize
        from export.package import sign_package

        groups: dict[tuple[Any, ...], list[tuple[int, Target]]] = {}
        for index, target in targets:
            groups.setdefault((target.name, target.version), []).append((index, target))
        artifacts: list[Artifact | Failure] = []
        for (name, version), members in groups.items():
            config = dataclasses.replace(self.config, formats=[t.format for _, t in members])
            work = tempfile.mkdtemp(prefix="quantize-", dir=pipeline.work_dir)
            try:
                result = quantize(
                    pipeline.model, config, pipeline.data.calibration(), work, name=name, version=version,
                    latency_runs=pipeline.recipe.run.latency_runs, progress=pipeline.progress,
                    fp32={"onnx": pipeline.snapshot} if pipeline.snapshot is not None else None,
                )  # fmt: skip
            except PocketfleetError as exc:  # e.g. parity out of bounds: quantize writes no package
                artifacts += [Failure(index, str(exc)) for index, _ in members]
                continue
            by_format = {a.format: a for a in result.artifacts}
            dropped = {d["format"]: d["reason"] for d in result.details.get("dropped", [])}
            for index, target in members:
                if target.format in dropped:  # int8 slower than fp32 on this host: not shipped
                    artifacts.append(Failure(index, f"int8 dropped: {dropped[target.format]}"))
                    continue
                qa = by_format[target.format]
                if target.key is not None and qa.package is not None:
                    sign_package(qa.package, target.key)
                details = {"mode": qa.mode, "calibration": qa.calibration, **qa.details}
                if target.format in result.sensitivity:
                    details["sensitivity"] = result.sensitivity[target.format].to_dict()
                details["quantize_latency_ms"] = qa.latency_ms  # interleaved with fp32 inside quantize()
                artifacts.append(
                    Artifact(
                        target=index,
                        path=pipeline.keep(qa.path),
                        package=pipeline.keep(qa.package) if qa.package else None,
                        format=qa.format,
                        dtype=qa.dtype,
                        mode=qa.mode,
                        metric=qa.metric,
                        parity=qa.parity,
                        float_layers=list(qa.float_layers),
                        details=details,
                    )
                )
            shutil.rmtree(work, ignore_errors=True)
        return artifacts
