"""`distill(student, teacher, DistillConfig(...), train_data, eval_data=..., metric=...)`: train a student on
a teacher's outputs (and hidden states), or fine-tune it on labels alone when teacher is None.

train_data / eval_data: `(inputs, labels)` (inputs an array / tensor, a tuple of them or a dict by input
name; labels may be None) or any iterable / DataLoader of such batches. With eval_data the student is
scored after every epoch with `metric` ("top1", "cosine", "mse", "module:function" or a callable
(outputs, labels) -> float; default top1 for integer labels) — or, without labels, by its fidelity to the
teacher's outputs — and keep_best keeps the best epoch.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from compress.zoo.digits_train import random_shift, torch_threads
from export.source import first_tensor

from .config import DistillConfig, DistillError

Data = tuple[Any, Any]


def as_tensors(data: Data) -> tuple[list[str] | None, list[torch.Tensor], torch.Tensor | None]:
    """(input names or None, input tensors, labels or None) from (inputs, labels): inputs a dict of
    arrays by input name (a workload's `data(split)`), an array / tensor, or a sequence of them."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
            raise DistillError(
                "data must be (inputs, labels) or an iterable / DataLoader of such batches; labels may be None"
            )
        data = _collect(data, "train_data")
    inputs, labels = data
    names = list(inputs) if isinstance(inputs, dict) else None
    items = list(inputs.values()) if isinstance(inputs, dict) else inputs
    items = list(items) if isinstance(items, (tuple, list)) else [items]
    tensors = [x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x)) for x in items]
    sizes = {len(t) for t in tensors}
    y = (
        None
        if labels is None
        else (labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels)))
    )
    if y is not None:
        sizes.add(len(y))
    if len(sizes) != 1:
        raise DistillError(f"inputs and labels disagree on the number of rows: {sorted(sizes)}")
    return names, tensors, y


def _collect(data: Any, what: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    from compress.quantize.data import collect_eval
    from pocketfleet import PocketfleetError

    try:
        return collect_eval(data)
    except PocketfleetError as exc:
        raise DistillError(f"{what}: {str(exc).replace('eval_data', what)}") from None


def make_evaluate(
    eval_data: Any, metric: Any = None, teacher: nn.Module | None = None, batch_size: int = 64
) -> Callable[[nn.Module], float]:
    """`evaluate(module) -> float` (higher is better) on `eval_data` with `metric`; a lower-is-better metric
    (mse) is negated. Without labels the module's outputs are compared with the teacher's (fidelity)."""
    from export.metrics import fidelity, resolve_metric
    from pocketfleet import PocketfleetError

    _, tensors, labels = as_tensors(eval_data if isinstance(eval_data, (tuple, list)) and len(eval_data) == 2
                                    else _collect(eval_data, "eval_data"))  # fmt: skip
    y = labels.numpy() if labels is not None else None
    if y is None and teacher is None:
        raise DistillError("eval_data has no labels and there is no teacher to compare with: give (inputs, labels)")
    try:
        chosen = resolve_metric(metric) if metric is not None else None
    except PocketfleetError as exc:
        raise DistillError(str(exc)) from None
    if chosen is None and y is not None:
        chosen = resolve_metric("top1" if y.dtype.kind in "iub" else "cosine")

    def run(module: nn.Module) -> np.ndarray:
        was = module.training
        module.eval()
        outs = []
        with torch.no_grad():
            for start in range(0, len(tensors[0]), batch_size):
                out = module(*(t[start : start + batch_size] for t in tensors))
                outs.append(_first_tensor(out).detach().cpu().numpy())
        module.train(was)
        return np.concatenate(outs)

    reference = run(teacher) if y is None and teacher is not None else None

    def evaluate(module: nn.Module) -> float:
        out = run(module)
        if y is None:
            assert reference is not None
            return float(fidelity(out, reference)["value"]) if chosen is None else _signed(chosen, out, reference)
        return _signed(chosen, out, y)

    return evaluate


def _signed(metric: Any, outputs: np.ndarray, targets: np.ndarray) -> float:
    value = float(metric.score(outputs, targets)["value"])
    return value if metric.higher_is_better else -value


def _first_tensor(out: Any) -> torch.Tensor:
    tensor = first_tensor(out)
    if tensor is None:
        raise DistillError(f"the model returns a {type(out).__name__}, not a tensor (or a tuple / dict of tensors)")
    return tensor


class _Capture:
    """Forward hooks keeping the latest output of named modules."""

    def __init__(self, model: nn.Module, names: Sequence[str], what: str) -> None:
        self.values: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise DistillError(f"DistillConfig.features: the {what} has no module {missing[0]!r}")
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self.values[name] = out[0] if isinstance(out, (tuple, list)) else out

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _projection(student: torch.Tensor, teacher: torch.Tensor) -> nn.Module:
    """A learned map from a student hidden state to the teacher's width (identity when widths match)."""
    if student.dim() == 4:
        cs, ct = student.shape[1], teacher.shape[1]
        proj: nn.Module = nn.Conv2d(cs, ct, 1, bias=False)
    else:
        cs, ct = student.shape[-1], teacher.shape[-1]
        proj = nn.Linear(cs, ct, bias=False)
    if cs == ct:
        with torch.no_grad():
            proj.weight.copy_(torch.eye(ct).reshape(proj.weight.shape))
    return proj


class Distiller:
    """Holds the student, teacher, projections and schedule; `fit` trains and returns a report."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module | None, config: DistillConfig | dict[str, Any]
    ) -> None:
        self.cfg = DistillConfig.from_dict(config) if isinstance(config, dict) else config.validate()
        if teacher is None and self.cfg.features:
            raise DistillError("DistillConfig.features needs a teacher")
        self.student, self.teacher = student, teacher
        self.projections = nn.ModuleDict()

    def _batch(
        self,
        tensors: list[torch.Tensor],
        idx: torch.Tensor,
        mask_pos: int | None,
        gen: torch.Generator | None,
    ) -> list[torch.Tensor]:
        xs = [t[idx] for t in tensors]
        if mask_pos is not None:  # drop columns that are padding in every row
            length = max(1, int(xs[mask_pos].sum(1).max()))
            xs = [
                x[:, :length] if x.dim() == 2 and x.shape[1] == tensors[mask_pos].shape[1] else x for x in xs
            ]
        if self.cfg.shift and gen is not None:
            xs = [
                random_shift(x, self.cfg.shift, gen) if x.dim() == 4 and x.is_floating_point() else x
                for x in xs
            ]
        return xs

    def _output_loss(self, s: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "kl":
            temp = self.cfg.temperature
            return (
                F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="batchmean") * temp**2
            )
        if kind == "cosine":
            return (1.0 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)).mean()
        return F.mse_loss(s, t)

    def _feature_loss(
        self, s_feats: dict[str, torch.Tensor], t_feats: dict[str, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        total = torch.zeros(())
        for i, (sname, tname) in enumerate(self.cfg.features.items()):
            s, t = self.projections[str(i)](s_feats[sname]), t_feats[tname].detach()
            if s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
                s = F.adaptive_avg_pool2d(s, t.shape[-2:])
            if s.dim() == 3 and mask is not None and mask.shape == s.shape[:2]:
                m = mask.to(s.dtype)[:, :, None]
                total = total + ((s - t) ** 2 * m).sum() / (m.sum() * s.shape[-1]).clamp(min=1.0)
            else:
                total = total + F.mse_loss(s, t)
        return total

    def fit(
        self,
        data: Data,
        evaluate: Callable[[nn.Module], float] | None = None,
        step_hooks: Sequence[Callable[[], None]] = (),
        progress: bool = True,
    ) -> dict[str, Any]:
        """Train for cfg.epochs; `evaluate(student) -> float` (higher is better) after every epoch picks
        the kept weights when keep_best; `step_hooks` run after every optimizer step (e.g. Sparsifier.step)."""
        cfg, student, teacher = self.cfg, self.student, self.teacher
        names, tensors, labels = as_tensors(data)
        mask_pos = names.index(cfg.mask_input) if names and cfg.mask_input in names else None
        kind = cfg.output_loss
        if kind == "auto":
            kind = "kl" if labels is not None and not labels.is_floating_point() else "cosine"
        if teacher is None and labels is None:
            raise DistillError("without a teacher, distill needs labels to train on")
        if cfg.cache_teacher and cfg.shift:
            raise DistillError(
                "DistillConfig.cache_teacher needs shift=0 (augmented inputs change the teacher's outputs)"
            )
        run = _Run(
            tensors=tensors,
            labels=labels,
            mask_pos=mask_pos,
            kind=kind,
            alpha=cfg.alpha if labels is not None else 1.0,
            gen=torch.Generator().manual_seed(cfg.seed),
            lengths=tensors[mask_pos].sum(1) if mask_pos is not None else None,
        )
        started = time.perf_counter()
        with torch_threads(cfg.threads):
            torch.manual_seed(cfg.seed)
            run.s_cap = _Capture(student, list(cfg.features), "student")
            run.t_cap = (
                _Capture(teacher, list(cfg.features.values()), "teacher") if teacher is not None else None
            )
            try:
                if teacher is not None:
                    teacher.eval()  # its forward runs under no_grad; its parameters are left as they are
                if cfg.features:
                    self._build_projections(run)
                report = self._loop(run, evaluate, step_hooks, progress)
            finally:
                run.s_cap.close()
                if run.t_cap is not None:
                    run.t_cap.close()
        student.eval()
        report["seconds"] = round(time.perf_counter() - started, 2)
        report["config"] = cfg.to_dict()
        report["output_loss"] = kind if teacher is not None else "ce"
        return report

    def _build_projections(self, run: _Run) -> None:
        assert self.teacher is not None and run.t_cap is not None and run.s_cap is not None
        xs = self._batch(run.tensors, torch.arange(min(2, len(run.tensors[0]))), run.mask_pos, None)
        was = self.student.training
        self.student.eval()
        with torch.no_grad():
            self.student(*xs)
            self.teacher(*xs)
        self.student.train(was)
        for i, (sname, tname) in enumerate(self.cfg.features.items()):
            self.projections[str(i)] = _projection(run.s_cap.values[sname], run.t_cap.values[tname])

    def _epoch_batches(self, run: _Run) -> list[torch.Tensor]:
        """Row indices of every batch of one epoch. With a mask input, rows of similar length share a
        batch (sorted within windows of 16 batches) so that trimming the padding saves most of it. With
        cache_teacher the batches are fixed (the teacher's outputs are cached per batch); only their order
        changes between epochs."""
        cfg, n = self.cfg, len(run.tensors[0])
        if cfg.cache_teacher and run.fixed is not None:
            return [run.fixed[i] for i in torch.randperm(len(run.fixed), generator=run.gen)]
        order = torch.randperm(n, generator=run.gen)
        if run.lengths is not None and cfg.bucket:
            window = cfg.batch_size * (n if cfg.cache_teacher else 16)
            chunks = [order[i : i + window] for i in range(0, n, window)]
            order = torch.cat([c[run.lengths[c].argsort(stable=True)] for c in chunks])
        batches = [order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        if cfg.cache_teacher:
            run.fixed = batches
        return [batches[i] for i in torch.randperm(len(batches), generator=run.gen)]

    def _teacher(
        self, run: _Run, key: int, xs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher output and captured hidden states for a batch (cached per fixed batch when asked)."""
        assert self.teacher is not None
        if self.cfg.cache_teacher and key in run.cache:
            return run.cache[key]
        with torch.no_grad():
            out = _first_tensor(self.teacher(*xs))
        feats = dict(run.t_cap.values) if run.t_cap is not None else {}
        if self.cfg.cache_teacher:
            run.cache[key] = (out, feats)
        return out, feats

    def _loop(
        self,
        run: _Run,
        evaluate: Callable[[nn.Module], float] | None,
        step_hooks: Sequence[Callable[[], None]],
        progress: bool,
    ) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg, student, teacher = self.cfg, self.student, self.teacher
        n = len(run.tensors[0])
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
        frozen = [n for n, _ in student.named_parameters() if any(fnmatchcase(n, f) for f in cfg.freeze)]
        if cfg.freeze and not frozen:
            raise DistillError(f"DistillConfig.freeze {cfg.freeze} matches no parameter of the student")
        trainable = [p for n, p in student.named_parameters() if p.requires_grad and n not in frozen]
        params = trainable + list(self.projections.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (
                (s + 1) / warmup
                if s < warmup
                else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
            ),
        )
        history: list[dict[str, Any]] = []
        best = (-math.inf, -1)
        best_state = copy.deepcopy(student.state_dict())
        desc = "distill" if teacher is not None else "finetune"
        bar = tqdm(range(cfg.epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
        for epoch in bar:
            student.train()
            running, count = 0.0, 0
            for idx in self._epoch_batches(run):
                xs = self._batch(run.tensors, idx, run.mask_pos, run.gen)
                out = _first_tensor(student(*xs))
                loss = torch.zeros(())
                if teacher is not None:
                    t_out, t_feats = self._teacher(run, int(idx[0]) * n + len(idx), xs)
                    loss = loss + run.alpha * self._output_loss(out, t_out, run.kind)
                    if cfg.features and run.s_cap is not None:
                        mask = xs[run.mask_pos] if run.mask_pos is not None else None
                        loss = loss + cfg.feature_weight * self._feature_loss(run.s_cap.values, t_feats, mask)
                if run.labels is not None and (teacher is None or run.alpha < 1.0):
                    ce = F.cross_entropy(out, run.labels[idx], label_smoothing=cfg.label_smoothing)
                    loss = loss + (1.0 - run.alpha if teacher is not None else 1.0) * ce
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                for hook in step_hooks:
                    hook()
                running, count = running + float(loss.detach()) * len(idx), count + len(idx)
            row: dict[str, Any] = {"epoch": epoch, "loss": round(running / count, 6)}
            if evaluate is not None:
                student.eval()
                with torch.no_grad():
                    row["metric"] = float(evaluate(student))
                if row["metric"] >= best[0]:  # ties: the later, lower learning-rate epoch
                    best = (row["metric"], epoch)
                    best_state = copy.deepcopy(student.state_dict())
                bar.set_postfix(metric=f"{row['metric']:.4f}")
            history.append(row)
        if evaluate is not None and cfg.keep_best:
            student.load_state_dict(best_state)
        return {
            "epochs": cfg.epochs,
            "steps": total,
            "history": history,
            "best_epoch": best[1] if evaluate is not None else None,
            "best_metric": best[0] if evaluate is not None else None,
        }


@dataclass
class _Run:
    """The state of one `fit` call."""

    tensors: list[torch.Tensor]
    labels: torch.Tensor | None
    mask_pos: int | None
    kind: str
    alpha: float
    gen: torch.Generator
    lengths: torch.Tensor | None
    s_cap: _Capture | None = None
    t_cap: _Capture | None = None
    fixed: list[torch.Tensor] | None = None
    cache: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = field(default_factory=dict)


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    config: DistillConfig | dict[str, Any],
    train_data: Any,
    evaluate: Callable[[nn.Module], float] | None = None,
    step_hooks: Sequence[Callable[[], None]] = (),
    progress: bool = True,
    *,
    eval_data: Any = None,
    metric: Any = None,
) -> nn.Module:
    """Train `student` (in place) from `teacher` on `train_data` ((inputs, labels or None), or an iterable /
    DataLoader of batches); returns it in eval mode. `eval_data` + `metric` (or an `evaluate(module) ->
    float` of your own) score every epoch for keep_best. Use `Distiller(...).fit(...)` for the report."""
    if evaluate is None and eval_data is not None:
        evaluate = make_evaluate(eval_data, metric, teacher)
    Distiller(student, teacher, config).fit(train_data, evaluate, step_hooks, progress)
    return student
