"""``dgmr demo``: the whole method end to end on real bundled data, offline, on a CPU.

Data: the UCI handwritten digits scikit-learn ships (1,797 real 8x8 images, 10 classes),
upsampled to 16x16, a fixed stratified train/test split. A small ViT (timm's real
``VisionTransformer``) is trained from scratch on the train split with labels; then for
every criterion x mlp ratio x seed, the teacher is pruned with ``dgmr.prune``, distilled on
the *unlabeled* train images with ``dgmr.distill.distill`` (its defaults: a held-out slice,
val_loss from step 0, the lr fitted to the start, the best weights exported; early stopping
on), and teacher / pruned / distilled models are scored with the evaluation code (kNN on
pooled features, the classifier head), plus params, FLOPs and measured CPU throughput.
Outputs: a terminal table, ``report.md``, ``results.json`` and PNG plots.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .core.errors import DgmrError, Preempted, Terminated
from .io.output import atomic_path, check_path_length, write_text
from .models.artifact import load, read_config, save, write_json
from .models.families import family_of
from .models.sources import Source, build_model, is_dgmr_dir
from .prune import prune
from .report.demo import cut_kind, cut_of, on_frontier, render_markdown
from .report.plots import plot_demo_accuracy_vs_flops, plot_frontier, plot_student_recovery

KNN_K = 20  # fixed k for the kNN score (not picked on the test set)
IMAGE_SIZE = 16


def teacher_source() -> Source:
    """The demo teacher: timm VisionTransformer, width 96, depth 6, mlp ratio 4, 16 px input, patch 4,
    average-pooled patch tokens (it learns much faster from 1,347 images than the CLS token)."""
    return Source("timm", "vit_tiny_patch16_224", kwargs=dict(
        img_size=IMAGE_SIZE, patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0, num_classes=10,
        global_pool="avg"))


@dataclass
class DemoSettings:
    out: str = "runs/demo"
    seed: int = 0
    quick: bool = False
    criteria: tuple[str, ...] = ("diversity", "l2", "random")
    ratios: tuple[float, ...] = (1.0, 0.5)
    # weights-only students: 2 seeds (each distills all its steps, most of the demo's time);
    # calibrated ones stop after 10-35 steps, so 3 seeds cost little
    seeds: int = 2
    calibrated_seeds: int = 3
    teacher_epochs: int = 20
    teacher_lr: float = 1e-3
    teacher_batch: int = 32
    distill_steps: int = 80
    distill_batch: int = 64
    # the paper's rule gives base_lr x 64 / 256 = 1e-3, the lr this tiny model recovers with from a
    # weights-only prune; the fit rule scales it down for students that start near the teacher
    distill_base_lr: float = 4e-3
    distill_lr: float | None = None  # an explicit peak lr (the rule is then not used)
    lr_rule: str = "fit"
    eval_every: int = 5  # val_loss every 5 steps
    # stop after 2 evaluations (10 steps) that together gained less than 10% of val_loss: a
    # calibrated student after 10-35 steps, a weights-only one in the cosine's tail
    early_stop: int | None = 2
    min_delta: float = 0.1
    export: str = "best"
    # kNN every 20 steps until the student is within 0.5 point of the teacher (the report's "kNN ≈
    # teacher at step"), then at the exported step only: a kNN score costs about 5 training steps
    knn_every: int = 20
    speed_batch: int = 256
    # calibrated students (docs/calibration.md): diversity + compensation at these (ratio, allocation)
    calibrated: tuple[tuple[float, str], ...] = ((1.0, "uniform"), (0.5, "uniform"), (0.5, "global"))
    # calibrated students cut with heads too (docs/heads.md), at most 35% of the teacher's params:
    # (mlp ratio, heads per layer, params_fraction with global allocation). r=0.5 with 2 of 3 heads
    # in every layer is on the frontier only: its val_loss rises in the warmup (relative step-0
    # loss 0.08 gets the paper's lr), so early stopping keeps its step 0 (docs/heads.md)
    head_students: tuple[tuple[float | None, int | None, float | None], ...] = ((None, None, 0.32),)
    # the frontier's extra calibrated cuts, scored before distillation only (docs/heads.md)
    frontier_ratios: tuple[float, ...] = (0.25, 0.125)
    frontier_heads: tuple[tuple[float, int], ...] = ((0.5, 2),)
    frontier_fractions: tuple[float, ...] = (0.28,)
    calibration_images: int = 256
    threads: int = 1  # intra-op threads (see _threads)

    @classmethod
    def make(cls, out: str | os.PathLike = "runs/demo", seed: int = 0, quick: bool = False) -> "DemoSettings":
        if quick:  # the test suite runs this end to end: every criterion and ratio, one seed, short runs
            return cls(out=str(out), seed=seed, quick=True, seeds=1, calibrated_seeds=1, teacher_epochs=10,
                       distill_steps=20, eval_every=2, knn_every=10, speed_batch=128, frontier_ratios=(),
                       frontier_fractions=())  # the frontier keeps r=0.5 with 2 heads: one calibrated prune
        return cls(out=str(out), seed=seed)


# ---------------------------------------------------------------------------------------------
# data
def digits_split(seed: int = 0, size: int = IMAGE_SIZE) -> dict[str, torch.Tensor]:
    """scikit-learn's digits as (N, 3, size, size) floats in [0, 1], stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.25, stratify=y.numpy(), random_state=seed)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


class _Images(torch.utils.data.Dataset):
    """Unlabeled images for distillation: (3, H, W) tensors in [0, 1]."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def _normalizer(model: nn.Module):
    cfg = family_of(model).data_config(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return lambda x: (x - mean) / std


def _shift(x: torch.Tensor, g: torch.Generator, pad: int = 1) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels, per image."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    return torch.stack([xp[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(n)])


# ---------------------------------------------------------------------------------------------
# teacher
def train_teacher(data: dict[str, torch.Tensor], s: DemoSettings, progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Train the demo ViT from scratch on the labeled train split (AdamW, cosine, shifts)."""
    torch.manual_seed(s.seed)
    src = teacher_source()
    model = build_model(src, pretrained=False).train()
    norm = _normalizer(model)
    g = torch.Generator().manual_seed(s.seed)
    x, y = data["x_train"], data["y_train"]
    batch = s.teacher_batch
    steps_per_epoch = math.ceil(len(x) / batch)
    total = s.teacher_epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=s.teacher_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.teacher_lr, total_steps=total, pct_start=0.1)
    t0 = time.perf_counter()
    bar = tqdm(range(s.teacher_epochs), desc="train teacher", unit="epoch", disable=not progress, leave=False)
    for _ in bar:
        perm = torch.randperm(len(x), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(norm(_shift(x[idx], g))), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    info = {"epochs": s.teacher_epochs, "seconds": round(time.perf_counter() - t0, 1), "train_loss": float(loss.detach())}
    return model, info


def cached_teacher(data: dict[str, torch.Tensor], s: DemoSettings, progress: bool) -> tuple[nn.Module, Source, dict]:
    """The trained teacher from ``OUT/teacher`` when it was trained with the same settings."""
    tdir = Path(s.out) / "teacher"
    recipe = {"seed": s.seed, "epochs": s.teacher_epochs, "lr": s.teacher_lr, "batch": s.teacher_batch,
              "arch": teacher_source().to_dict()}
    if is_dgmr_dir(tdir):
        cfg = read_config(tdir)
        if cfg.get("demo_teacher", {}).get("recipe") == recipe:
            return load(tdir), teacher_source(), {**cfg["demo_teacher"]["info"], "cached": True}
    model, info = train_teacher(data, s, progress)
    save(model, tdir, source=teacher_source(), overwrite=True, native=False,
         extra={"demo_teacher": {"recipe": recipe, "info": info}})
    return model, teacher_source(), {**info, "cached": False}


# ---------------------------------------------------------------------------------------------
# evaluation (the same code as `dgmr eval`)
@torch.no_grad()
def _pooled_and_logits(model: nn.Module, x: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    fam, norm = family_of(model), _normalizer(model)
    feats, logits = [], []
    was_training = model.training
    model.eval()
    for i in range(0, len(x), batch):
        f = fam.features(model, norm(x[i:i + batch]))["pooled"]  # timm ViT: pre-logits = input of the head
        feats.append(f)
        logits.append(model.get_classifier()(f))
    model.train(was_training)
    return torch.cat(feats), torch.cat(logits)


def head_top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    _, logits = _pooled_and_logits(model, x)
    return float((logits.argmax(1) == y).float().mean())


def score(model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """kNN top-1 (k=20, pooled features, train split as the bank) and classifier-head top-1 on test."""
    from .evaluate.knn import knn_classify

    f_tr, _ = _pooled_and_logits(model, data["x_train"])
    f_te, logits = _pooled_and_logits(model, data["x_test"])
    knn = knn_classify(f_tr, data["y_train"], f_te, data["y_test"], ks=(KNN_K,), num_classes=10)
    return {"knn_top1": float(knn["per_k"][str(KNN_K)]["top1"]),
            "head_top1": float((logits.argmax(1) == data["y_test"]).float().mean())}


KNN_CLOSE = 0.005  # "recovered": kNN top-1 within half a point of the teacher's


@dataclass
class Job:
    """One student: how it is pruned (``calibration`` None: weights only, the paper) and its seed."""

    criterion: str
    ratio: float | None  # None: params_fraction sizes the MLPs
    seed: int
    calibration: dict[str, Any] | None = None
    heads: int | None = None  # heads kept per attention layer (None: all, or params_fraction's choice)
    params_fraction: float | None = None  # one budget across MLPs and heads (docs/heads.md)

    @property
    def method(self) -> str:
        if self.calibration is None:
            return self.criterion
        return self.criterion + "+comp" * self.calibration["compensate"] + (
            "+global" if self.calibration["allocate"] == "global" else "")

    @property
    def cut(self) -> str:
        """What was cut, for tables: "r=0.5", "r=0.5, 2 heads", "32% params"."""
        if self.params_fraction is not None:
            return f"{100 * self.params_fraction:g}% params"
        return f"r={self.ratio:g}" + (f", {self.heads} heads" if self.heads is not None else "")

    @property
    def name(self) -> str:
        tag = f"p{self.params_fraction:g}" if self.params_fraction is not None else f"r{self.ratio:g}"
        return f"{self.method}-{tag}{f'-h{self.heads}' if self.heads else ''}-s{self.seed}"

    @property
    def arch(self) -> str:
        """Students of one arch share a throughput measurement."""
        tag = f"p{self.params_fraction:g}" if self.params_fraction is not None else f"r{self.ratio:g}"
        return tag + (f"-h{self.heads}" if self.heads else "") + (
            "-global" if self.calibration and self.calibration["allocate"] == "global" else "")


def calibrated_job(s: DemoSettings, ratio: float | None, seed: int, *, heads: int | None = None,
                   params_fraction: float | None = None, allocate: str = "uniform") -> Job:
    """A diversity + compensation student on ``calibration_images`` (global allocation with a
    ``params_fraction``, which needs it)."""
    cal = {"images": s.calibration_images, "compensate": True,
           "allocate": "global" if params_fraction else allocate, "criterion": "diversity"}
    return Job("diversity", ratio, seed, cal, heads, params_fraction)


def demo_jobs(s: DemoSettings) -> list[Job]:
    jobs = [Job(c, r, s.seed + k) for r in s.ratios for c in s.criteria for k in range(s.seeds)]
    jobs += [calibrated_job(s, r, s.seed + k, allocate=alloc) for r, alloc in s.calibrated
             for k in range(s.calibrated_seeds)]
    jobs += [calibrated_job(s, r, s.seed + k, heads=heads, params_fraction=fraction)
             for r, heads, fraction in s.head_students for k in range(s.calibrated_seeds)]
    return jobs


def prune_student(teacher: nn.Module, job: Job, data: dict[str, torch.Tensor], src: Source) -> nn.Module:
    """A pruned copy of the teacher; calibrated on the unlabeled train images (normalised like the
    model's input; the split is shuffled, so the first N are a random sample)."""
    student = copy.deepcopy(teacher)
    if job.calibration is None:
        return prune(student, mlp_ratio=job.ratio, criterion=job.criterion, seed=job.seed, progress=False, source=src)[0]
    cal = job.calibration
    return prune(student, mlp_ratio=job.ratio, criterion=cal["criterion"], seed=job.seed, progress=False, source=src,
                 heads=job.heads, params_fraction=job.params_fraction,
                 calibration=_normalizer(teacher)(data["x_train"]), calibration_images=cal["images"],
                 compensation=cal["compensate"], allocate=cal["allocate"])[0]


def first_close_step(curve: list[dict[str, Any]], teacher_knn: float) -> int | None:
    """The first evaluated distillation step (0: before distillation) with kNN within KNN_CLOSE of the teacher."""
    return next((c["step"] for c in curve if "knn_top1" in c and c["knn_top1"] >= teacher_knn - KNN_CLOSE - 1e-9),
                None)


def _cost(model: nn.Module) -> dict[str, int]:
    from .models.cost import count_flops, mlp_params

    fam = family_of(model)
    return {"params": fam.vision_params(model), "flops": count_flops(model, fam, IMAGE_SIZE),
            "mlp_params": mlp_params(fam, model), "heads": sum(s.heads for s in fam.attention(model))}


# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Tiny models gain nothing from a second intra-op thread, and on a busy machine the
    extra thread's spinning makes every op several times slower (measured 5-8x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(out: str | os.PathLike = "runs/demo", *, seed: int = 0, quick: bool = False,
             progress: bool = True, settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the demo into ``out``; returns the results dict also written to ``out/results.json``."""
    s = settings or DemoSettings.make(out, seed, quick)
    outp = Path(s.out)
    check_path_length(outp)
    if outp.exists() and not outp.is_dir():
        raise DgmrError(f"output {outp} exists and is not a directory")
    try:
        outp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DgmrError(f"cannot create {outp}: {e.strerror or e}") from None
    with _threads(s.threads):
        return _run(s, outp, progress)


def distill_settings(s: DemoSettings, seed: int) -> dict[str, Any]:
    """The ``distill`` settings of every demo student."""
    return dict(steps=s.distill_steps, batch_size=s.distill_batch, base_lr=s.distill_base_lr, lr=s.distill_lr,
                lr_rule=s.lr_rule, eval_every=s.eval_every, early_stop=s.early_stop, min_delta=s.min_delta,
                export=s.export, seed=seed, log_every=1, save_every=0, workers=0, tensorboard=False, device="cpu")


def _distilled_student(job: Job, student: nn.Module, teacher: nn.Module, src: Source, data: dict[str, torch.Tensor],
                       s: DemoSettings, outp: Path, teacher_knn: float, before: dict[str, float]
                       ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Distill one pruned ``student`` (in place; it ends holding the exported weights), scoring
    it every ``knn_every`` steps: its results row and curve (training loss, val_loss, kNN)."""
    from .distill import distill
    from .distill.rundir import METRICS, read_metrics

    curve = [{"step": 0, **before}]

    def on_step(info: dict[str, Any]) -> None:
        if info["step"] % s.knn_every == 0 and first_close_step(curve, teacher_knn) is None:
            curve.append({"step": info["step"], **score(student, data)})

    run_dir = outp / "students" / job.name
    try:
        summary = distill(teacher, student, _Images(data["x_train"]), run_dir, overwrite=True, progress=False,
                          on_step=on_step, student_source=src, **distill_settings(s, job.seed))
    except Preempted as e:  # its models are in memory: no --resume to offer; stopped like any other command
        raise Terminated(e.signum or signal.SIGTERM) from None
    exported = summary["exported"]["step"]
    after = next((c for c in curve if c["step"] == exported), None)
    if after is None:  # a step kNN was not scored at: the exported weights count as scored there too
        after = {"step": exported, **score(student, data)}
        curve = sorted(curve + [after], key=lambda c: c["step"])
    rows = [row for _, row in read_metrics(run_dir / METRICS)]
    losses = [r for r in rows if "loss" in r]
    vals = [r for r in rows if "val_loss" in r]
    close = first_close_step(curve, teacher_knn)
    row = {
        "criterion": job.criterion, "method": job.method, "mlp_ratio": job.ratio, "seed": job.seed,
        "name": job.name, "cut": job.cut, "params_fraction": job.params_fraction,
        "calibration": job.calibration, "arch": job.arch, **_cost(student),
        "knn_top1_before": before["knn_top1"], "head_top1_before": before["head_top1"],
        "knn_top1_after": after["knn_top1"], "head_top1_after": after["head_top1"],
        "knn_close_step": close, "knn_close_images": None if close is None else close * summary["global_batch"],
        "loss_first": losses[0]["loss"], "loss_last": losses[-1]["loss"],
        "val_loss_start": summary["step0_val_loss"], "val_loss_best": summary["best_val_loss"],
        "val_loss_max_ratio": max(r["val_loss"] for r in vals) / vals[0]["val_loss"],
        "val_loss_step0_logged": vals[0]["step"] == 0, "best_step": summary["best_step"],
        "exported_step": exported, "stopped": summary["stopped"], "peak_lr": summary["peak_lr"],
        "lr_factor": summary["lr"].get("factor"), "relative_loss": summary["lr"].get("relative_loss"),
        "distill_steps": summary["steps"], "distill_seconds": summary.get("seconds"),
    }
    curve_out = ([{"step": m["step"], "loss": m["loss"]} for m in losses]
                 + [{"step": m["step"], "val_loss": m["val_loss"]} for m in vals]
                 + [{**c, "acc": True} for c in curve] + [{**after, "acc": True, "exported": True}])
    return row, curve_out


def _run(s: DemoSettings, outp: Path, progress: bool) -> dict[str, Any]:
    from .evaluate.speed import measure_speed

    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    data = digits_split(s.seed)
    teacher, src, tinfo = cached_teacher(data, s, progress)
    teacher_scores = score(teacher, data)
    teacher_row = {**_cost(teacher), **teacher_scores, "train": tinfo}
    students: list[dict[str, Any]] = []
    curves: dict[str, list[dict[str, Any]]] = {}
    archs: dict[str, nn.Module] = {}
    # calibrated and weights-only diversity and l2 prunes do not depend on the seed: one prune (and
    # one score before distillation) each
    pruned: dict[str, tuple[nn.Module, dict[str, float]]] = {}
    bar = tqdm(demo_jobs(s), desc="prune + distill students", unit="student", disable=not progress)
    for job in bar:
        bar.set_postfix_str(job.name)
        key = job.arch + job.method + (f"-s{job.seed}" if job.criterion == "random" else "")
        if key not in pruned:
            student = prune_student(teacher, job, data, src)
            pruned[key] = (student, score(student, data))
        student, before = copy.deepcopy(pruned[key][0]), pruned[key][1]
        row, curves[job.name] = _distilled_student(job, student, teacher, src, data, s, outp, teacher_scores["knn_top1"],
                                                   before)
        students.append(row)
        archs.setdefault(job.arch, student)
    speed = measure_speed({"teacher": teacher, **archs},
                          batch_size=s.speed_batch, image_size=IMAGE_SIZE, device="cpu", warmup=2, repeats=5)
    teacher_row["images_per_s"] = speed["models"]["teacher"]["throughput"]
    for row in students:
        row["images_per_s"] = speed["models"][row["arch"]]["throughput"]
        row["heads_kept_fraction"] = row["heads"] / teacher_row["heads"]
    results = {"teacher": teacher_row, "students": students, "wall_seconds": round(time.perf_counter() - t0, 1),
               "settings": asdict(s), "knn_k": KNN_K,
               "data": {"name": "sklearn digits (UCI)", "train": len(data["y_train"]), "test": len(data["y_test"]),
                        "image_size": IMAGE_SIZE}}
    results["summary"] = summarize(results)
    results["frontier"] = frontier(teacher, src, data, s, results)
    results["checks"] = demo_checks(results)
    write_json(outp / "results.json", results)
    write_json(outp / "curves.json", curves)
    with atomic_path(outp / "recovery.png", "a plot") as tmp:  # the temporary name keeps .png: matplotlib's format
        plot_student_recovery(curves, tmp, teacher_scores["knn_top1"], KNN_CLOSE, KNN_K)
    with atomic_path(outp / "accuracy_vs_flops.png", "a plot") as tmp:
        plot_demo_accuracy_vs_flops(results, tmp)
    with atomic_path(outp / "accuracy_vs_params.png", "a plot") as tmp:
        plot_frontier(results, tmp)
    write_text(outp / "report.md", render_markdown(results))
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(outp / "results.json", results)
    return results


def frontier(teacher: nn.Module, src: Source, data: dict[str, torch.Tensor], s: DemoSettings,
             results: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy against parameters before distillation, every cut calibrated: "MLP only" (the
    calibrated uniform students, and ``frontier_ratios``) against "MLP + heads" (the head
    students, and ``frontier_fractions``): docs/heads.md. One point per cut."""
    total, heads = results["teacher"]["params"], results["teacher"]["heads"]
    points = {a["cut"]: {"params": a["params"], "heads_kept_fraction": a["heads_kept_fraction"],
                         "params_fraction": a.get("params_fraction"), "knn_top1": a["knn_top1_before"],
                         "head_top1": a["head_top1_before"]} for a in results["summary"] if on_frontier(a)}
    extra = [calibrated_job(s, r, s.seed) for r in s.frontier_ratios]
    extra += [calibrated_job(s, r, s.seed, heads=h) for r, h in s.frontier_heads]
    extra += [calibrated_job(s, None, s.seed, params_fraction=f) for f in s.frontier_fractions]
    for job in extra:
        student = prune_student(teacher, job, data, src)
        cost = _cost(student)
        points[job.cut] = {"params": cost["params"], "heads_kept_fraction": cost["heads"] / heads,
                           "params_fraction": job.params_fraction, **score(student, data)}
    rows = [{"kind": cut_kind(p), "cut": cut, "params": p["params"], "params_fraction": p["params"] / total,
             "heads_kept_fraction": p["heads_kept_fraction"], "knn_top1": p["knn_top1"], "head_top1": p["head_top1"]}
            for cut, p in points.items()]
    return sorted(rows, key=lambda r: (r["kind"], -r["params"]))


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (method, cut): mean and spread (min..max, stdev) over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in results["students"]:
        groups.setdefault((row.get("method", row["criterion"]), row.get("cut") or f"r={row['mlp_ratio']:g}"),
                          []).append(row)
    out = []
    t = results["teacher"]
    for (method, cut), rows in groups.items():
        agg: dict[str, Any] = {"criterion": rows[0]["criterion"], "method": method, "cut": cut,
                               "mlp_ratio": rows[0]["mlp_ratio"], "params_fraction": rows[0].get("params_fraction"),
                               "heads_kept_fraction": rows[0].get("heads_kept_fraction", 1.0),
                               "calibration": rows[0].get("calibration"), "seeds": len(rows),
                               "params": rows[0]["params"], "flops": rows[0]["flops"],
                               "mlp_params": rows[0]["mlp_params"], "images_per_s": rows[0]["images_per_s"]}
        for key, per_seed in (("knn_close_steps", "knn_close_step"), ("knn_close_images", "knn_close_images"),
                              ("steps_run", "distill_steps"), ("best_steps", "best_step"), ("stopped", "stopped"),
                              ("lr_factors", "lr_factor")):
            agg[key] = [row.get(per_seed) for row in rows]
        agg["val_loss_max_ratio"] = max(row["val_loss_max_ratio"] for row in rows)
        for key in ("knn_top1_before", "head_top1_before", "knn_top1_after", "head_top1_after"):
            vals = [row[key] for row in rows]
            agg[key] = statistics.fmean(vals)
            agg[key + "_min"], agg[key + "_max"] = min(vals), max(vals)
            agg[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        agg["knn_delta_vs_teacher"] = agg["knn_top1_after"] - t["knn_top1"]
        agg["head_delta_vs_teacher"] = agg["head_top1_after"] - t["head_top1"]
        agg["mlp_param_reduction"] = 1 - agg["mlp_params"] / t["mlp_params"]
        out.append(agg)
    return out


VAL_RISE = 1.1  # a calibrated student's val_loss stays within this factor of its step-0 value
KNN_DROP = 0.002  # ... and it ends at most this far (0.2 point) below its kNN before distillation
HEADS_SIZE, HEADS_GAP = 0.35, 0.01  # a heads student of at most 35% of the params ends within 1 point kNN


def demo_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """What the demo promises of distillation, checked on its own students: each check's
    name, whether it held, and the figure behind it."""
    cal = [r for r in results["students"] if r["calibration"] is not None]
    plain = [r for r in results["students"] if r["calibration"] is None]
    teacher = results.get("teacher")
    checks = []
    if cal:
        worst = max(cal, key=lambda r: r["val_loss_max_ratio"])
        checks.append({"check": f"every calibrated student logs val_loss from step 0 and stays within "
                                f"{VAL_RISE:g}x of it", "ok": all(r["val_loss_step0_logged"] for r in cal)
                       and worst["val_loss_max_ratio"] <= VAL_RISE,
                       "figure": f"highest val_loss / step-0 val_loss: {worst['val_loss_max_ratio']:.3f} "
                                 f"({worst['method']} {cut_of(worst)} seed {worst['seed']})"})
        # a student that starts above its teacher is distilled towards the teacher, not past it
        ceiling = teacher["knn_top1"] if teacher else 1.0
        drop = max(cal, key=lambda r: min(r["knn_top1_before"], ceiling) - r["knn_top1_after"])
        d = min(drop["knn_top1_before"], ceiling) - drop["knn_top1_after"]
        # two decimals: one test image is 0.22 point, which one decimal shows as the limit itself
        checks.append({"check": f"no calibrated student ends more than {100 * KNN_DROP:g} point kNN below its start "
                                "(or the teacher's, where it starts above it)",
                       "ok": d <= KNN_DROP + 1e-9,
                       "figure": f"worst kNN change: {0.0 - 100 * d:+.2f} point ({drop['method']} {cut_of(drop)} "
                                 f"seed {drop['seed']})"})
    small = [r for r in cal if teacher and r.get("heads_kept_fraction", 1.0) < 1
             and r["params"] <= HEADS_SIZE * teacher["params"]]
    if small:
        worst = min(small, key=lambda r: r["knn_top1_after"])
        gap = results["teacher"]["knn_top1"] - worst["knn_top1_after"]
        checks.append({"check": f"every calibrated student cut with heads to at most {100 * HEADS_SIZE:g}% of the "
                                f"teacher's parameters ends within {100 * HEADS_GAP:g} point kNN of the teacher",
                       "ok": gap <= HEADS_GAP + 1e-9,
                       "figure": f"largest gap: {100 * gap:.1f} point ({worst['method']} {cut_of(worst)}, "
                                 f"{100 * worst['params'] / results['teacher']['params']:.1f}% params, seed "
                                 f"{worst['seed']})"})
    if plain:
        gain = min(plain, key=lambda r: r["knn_top1_after"] - r["knn_top1_before"])
        checks.append({"check": "every weights-only student improves with distillation",
                       "ok": all(r["knn_top1_after"] > r["knn_top1_before"] for r in plain),
                       "figure": f"smallest kNN gain: {100 * (gain['knn_top1_after'] - gain['knn_top1_before']):+.1f} "
                                 f"point ({gain['method']} {cut_of(gain)} seed {gain['seed']})"})
    return checks
