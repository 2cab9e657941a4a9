"""Distillation benchmarks: a narrow digits-mbnet trained with and without KD (3 seeds each, same epochs,
schedule and augmentation), and a 3-layer MiniLM student initialised from teacher layers and distilled on
real sentences (the zoo's training split of Python standard-library docstrings).

    python benchmarks/distillation.py                    # full run
    python benchmarks/distillation.py --quick            # few epochs / sentences, for a smoke test
    python benchmarks/distillation.py --only digits      # or --only minilm

The MiniLM numbers are the workload's own fidelity metric (compress.zoo.embedding_fidelity: cosine to the
teacher's fp32 embeddings and top-10 neighbour agreement) on the 600 test sentences, which the student
never sees. Wall time is measured with torch using 2 threads; the CPU seconds of the process are given too
(on a shared machine wall time depends on the other load).

Writes benchmarks/results/distillation.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from compress.distill import DistillConfig, Distiller  # noqa: E402
from compress.prune import count_macs, count_params  # noqa: E402
from compress.zoo import embedding_fidelity, get_workload, load_model_dir, make_model_dir  # noqa: E402
from pocketfleet import table  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
CACHE = Path.home() / ".cache" / "pocketfleet" / "bench"


@dataclass
class Setup:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    student_widths: list[float] = field(default_factory=lambda: [0.5, 0.25])  # narrow digits-mbnet students
    digits: dict[str, Any] = field(
        default_factory=lambda: {
            "epochs": 30, "lr": 3e-3, "weight_decay": 1e-3, "warmup_epochs": 2, "shift": 1, "batch_size": 64,
            "alpha": 0.7, "temperature": 4.0,
        }
    )  # fmt: skip
    no_kd_label_smoothing: float = 0.1  # the zoo's recipe for digits-mbnet
    minilm_layers: list[int] = field(
        default_factory=lambda: [0, 3, 5]
    )  # teacher layer behind each student layer
    minilm_features: dict[str, str] = field(
        default_factory=lambda: {"layers.0": "layers.1", "layers.1": "layers.3", "layers.2": "layers.5"}
    )
    minilm: dict[str, Any] = field(
        default_factory=lambda: {
            "epochs": 10, "lr": 2e-4, "weight_decay": 0.01, "warmup_epochs": 0.5, "batch_size": 32,
            "output_loss": "cosine", "feature_weight": 1.0, "cache_teacher": True, "threads": 2,
            "freeze": ["word_embeddings.*"],
        }
    )  # fmt: skip
    sentences: int | None = None  # train sentences used (None: all 2,000)


def _timer() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t: tuple[float, float]) -> dict[str, float]:
    return {
        "wall_seconds": round(time.perf_counter() - t[0], 1),
        "cpu_seconds": round(time.process_time() - t[1], 1),
    }


# --- narrow digits-mbnet with and without KD ------------------------------------------------------


def digits(setup: Setup, model_dir: Path, width: float) -> dict[str, Any]:
    lm = load_model_dir(model_dir)
    wl = lm.workload
    x_val, y_val = (torch.from_numpy(a) for a in (wl.data("val")[0]["image"], wl.data("val")[1]))
    train = wl.data("train")
    example = lm.example_inputs(2)
    config = {**lm.config, "width": width}

    def val_top1(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m.eval()(x_val).argmax(1) == y_val).float().mean())

    def test_top1(m: nn.Module) -> float:
        from compress.zoo import torch_predict

        return float(wl.evaluate(torch_predict(m.eval(), wl))["value"])

    runs: dict[str, list[dict[str, Any]]] = {"kd": [], "no_kd": []}
    for seed in setup.seeds:
        for mode in ("kd", "no_kd"):
            torch.manual_seed(seed)
            student = wl.build(config)
            cfg = DistillConfig(**setup.digits, seed=seed, threads=1)
            if mode == "no_kd":
                cfg.label_smoothing = setup.no_kd_label_smoothing
            t = _timer()
            report = Distiller(student, lm.module if mode == "kd" else None, cfg).fit(
                train, evaluate=val_top1, progress=sys.stderr.isatty()
            )
            runs[mode].append(
                {
                    "seed": seed,
                    "test_top1": test_top1(student),
                    "val_top1": report["best_metric"],
                    **_since(t),
                }
            )
            print(
                f"  digits {mode} seed {seed}: test top-1 {runs[mode][-1]['test_top1']:.4f}",
                file=sys.stderr,
                flush=True,
            )
    student = wl.build(config)
    summary = {
        mode: {
            "mean_test_top1": statistics.mean(r["test_top1"] for r in rows),
            "std_test_top1": statistics.pstdev(r["test_top1"] for r in rows),
            "runs": rows,
        }
        for mode, rows in runs.items()
    }
    return {
        "teacher": {
            "test_top1": test_top1(lm.module),
            "macs": count_macs(lm.module, example),
            "params": count_params(lm.module),
        },
        "student": {"config": config, "macs": count_macs(student, example), "params": count_params(student)},
        **summary,
        "kd_minus_no_kd_pt": 100 * (summary["kd"]["mean_test_top1"] - summary["no_kd"]["mean_test_top1"]),
    }


# --- MiniLM 6 -> 3 layers -------------------------------------------------------------------------


def embed(module: nn.Module, inputs: dict[str, np.ndarray], batch: int = 64, threads: int = 2) -> np.ndarray:
    """Embeddings in length-sorted batches cut to their longest sentence (the same numbers as the padded
    run: padding is masked out), in the original order."""
    order = np.argsort(inputs["attention_mask"].sum(1), kind="stable")
    out = np.zeros((len(order), 384), dtype=np.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for i in range(0, len(order), batch):
                idx = order[i : i + batch]
                length = max(1, int(inputs["attention_mask"][idx].sum(1).max()))
                ids = torch.from_numpy(inputs["input_ids"][idx, :length])
                mask = torch.from_numpy(inputs["attention_mask"][idx, :length])
                out[idx] = module.eval()(ids, mask).numpy()
    finally:
        torch.set_num_threads(before)
    return out


def minilm(setup: Setup) -> dict[str, Any]:
    wl = get_workload("minilm-l6")
    teacher = wl.build(pretrained=True)
    config = {
        **wl.default_config(),
        "num_layers": len(setup.minilm_layers),
        "layer_map": list(setup.minilm_layers),
    }
    student = wl.build(config, pretrained=True)  # layer i <- teacher layer layer_map[i]
    test_inputs = wl.data("test")[0]
    val_inputs = wl.data("val")[0]
    sentences = wl.sentences("train")[: setup.sentences]
    train = (wl.tokenize(sentences), None)
    t = _timer()
    reference = embed(teacher, test_inputs)
    val_reference = embed(teacher, val_inputs)
    reference_time = _since(t)
    initial = embedding_fidelity(embed(student, test_inputs), reference)

    def val_cosine(m: nn.Module) -> float:
        return float(embedding_fidelity(embed(m, val_inputs), val_reference)["cosine"])

    cfg = DistillConfig(**setup.minilm, features=dict(setup.minilm_features))
    t = _timer()
    report = Distiller(student, teacher, cfg).fit(train, evaluate=val_cosine, progress=sys.stderr.isatty())
    train_time = _since(t)
    final = embedding_fidelity(embed(student, test_inputs), reference)
    t = _timer()
    embed(teacher, test_inputs)
    teacher_time = _since(t)
    t = _timer()
    embed(student, test_inputs)
    student_time = _since(t)
    ids = torch.from_numpy(test_inputs["input_ids"][:1, :32])
    mask = torch.ones_like(ids)
    return {
        "student_config": {"num_layers": config["num_layers"], "layer_map": config["layer_map"]},
        "train_sentences": len(sentences),
        "threads": cfg.threads,
        "teacher": {"params": count_params(teacher), "macs_seq32": count_macs(teacher, (ids, mask))},
        "student": {"params": count_params(student), "macs_seq32": count_macs(student, (ids, mask))},
        "before_distillation": initial,
        "after_distillation": final,
        "distill_time": train_time,
        "teacher_reference_time": reference_time,
        "embed_600_test_sentences": {"teacher": teacher_time, "student": student_time},
        "history": report["history"],
        "best_epoch": report["best_epoch"],
        "config": cfg.to_dict(),
    }


def render(result: dict[str, Any]) -> str:
    lines = []
    for d in result.get("digits") or []:
        lines.append(
            f"digits-mbnet teacher: test top-1 {d['teacher']['test_top1']:.4f}, MACs {d['teacher']['macs']:.0f}, "
            f"params {d['teacher']['params']}; student width {d['student']['config']['width']}: "
            f"MACs {d['student']['macs']:.0f}, params {d['student']['params']}"
        )
        rows = [
            {
                "student": mode,
                "mean test top-1": round(d[mode]["mean_test_top1"], 4),
                "std": round(d[mode]["std_test_top1"], 4),
                "per seed": ", ".join(f"{r['test_top1']:.4f}" for r in d[mode]["runs"]),
            }
            for mode in ("kd", "no_kd")
        ]
        lines += [
            table(rows),
            f"KD - no KD: {d['kd_minus_no_kd_pt']:+.2f} pt (mean of {len(d['kd']['runs'])} seeds)",
            "",
        ]
    m = result.get("minilm")
    if m:
        rows = [
            {
                "model": name,
                "cosine": round(m[key]["cosine"], 4),
                "cosine min": round(m[key]["cosine_min"], 4),
                "top10 agreement": round(m[key]["top10_agreement"], 4),
            }
            for name, key in (
                ("3-layer student, teacher-initialised", "before_distillation"),
                ("after distillation", "after_distillation"),
            )
        ]
        lines += [
            f"minilm-l6 -> {m['student_config']['num_layers']} layers {m['student_config']['layer_map']} on {m['train_sentences']} sentences",
            table(rows),
            f"distillation: {m['distill_time']['wall_seconds']} s wall, {m['distill_time']['cpu_seconds']} s CPU "
            f"(torch threads {m['threads']}); params {m['student']['params']} vs {m['teacher']['params']}; "
            f"embedding 600 test sentences: student {m['embed_600_test_sentences']['student']['wall_seconds']} s, "
            f"teacher {m['embed_600_test_sentences']['teacher']['wall_seconds']} s",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", type=Path, help="digits-mbnet model directory (made and cached if absent)"
    )
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 seed, 200 sentences")
    parser.add_argument("--only", choices=["digits", "minilm"])
    parser.add_argument("--student-widths", type=float, nargs="+", default=None,
                        help="width multipliers of the narrow digits-mbnet students (default 0.5 0.25)")
    parser.add_argument("--out", type=Path, default=OUT / "distillation.json")
    args = parser.parse_args(argv)
    setup = Setup(**({"student_widths": args.student_widths} if args.student_widths else {}))
    if args.quick:
        setup.seeds, setup.digits["epochs"], setup.minilm["epochs"], setup.sentences = [0], 2, 1, 200
    result: dict[str, Any] = {"setup": asdict(setup)}
    started = time.perf_counter()
    if args.only in (None, "digits"):
        model_dir = args.model_dir or CACHE / "digits-mbnet"
        if not (model_dir / "model.json").exists():
            print(f"making digits-mbnet in {model_dir} ...", file=sys.stderr)
            make_model_dir("digits-mbnet", model_dir, progress=sys.stderr.isatty())
        torch.set_num_threads(1)
        result["digits"] = [digits(setup, model_dir, width) for width in setup.student_widths]
    if args.only in (None, "minilm"):
        result["minilm"] = minilm(setup)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.out.exists() and args.only:  # keep the other half of an earlier run
        previous = json.loads(args.out.read_text())
        result = {**previous, **result, "setup": asdict(setup)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(render(result))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
