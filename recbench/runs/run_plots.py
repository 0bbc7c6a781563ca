"""Two figures of one run, logged as its artifacts ``plots/learning_curves.png`` and
``plots/memory.png``: what the MLflow UI's one chart per metric does not show at a glance.

- Learning curves: the training loss (every ``trainer.log_every_steps`` steps, ``CurveRecorder``)
  and the validation loss and AUC at each evaluation (the trainer's history) over training steps,
  the best validation AUC (the checkpoint the test metrics measure) and the test AUC, with the
  boundaries of a multi-stage method's stages.
- Memory breakdown: the uncompressed fp32 size of the embedding tables, the deployable (inference)
  bytes the budget solver planned, split into the method's parts (``MemoryReport.breakdown``:
  weights, remap, codebooks...), the inference bytes the evaluated model measured and the training
  state, against the budget (a line); beside it, the uncompressed size of each table (the largest).

Drawn on bare matplotlib figures written as PNG (Agg), without pyplot and without choosing a backend
(a notebook's stays as it is); matplotlib is imported on the first figure, not by ``recbench.runs.job``.
The two cost a few tenths of a second of CPU per run.

References: docs/architecture.md section 5 ("Tracking schema": artifacts of a run).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from recbench.types import FP32_BYTES, MemoryReport, TableSpec, format_bytes
from recbench.training.memory_split import PARTS as MEMORY_PARTS

#: the artifact folder of a run's figures, and their file names
PLOTS_DIR, CURVES_PNG, MEMORY_PNG = "plots", "learning_curves.png", "memory.png"
DPI = 100
#: tables drawn one by one in the memory figure (the rest share one bar)
TOP_TABLES = 8
#: axes titles at a fixed height (matplotlib's automatic placement measures every tick label: slow)
TITLE = {"fontsize": 10, "y": 1.0}


def _bytes_formatter():
    from matplotlib.ticker import EngFormatter

    return EngFormatter(unit="B", places=1)


class CurveRecorder:
    """The trainer's ``log_metrics`` callable that also keeps the training loss it passes on to
    ``log`` (the tracker's): the points of the learning-curve figure."""

    def __init__(self, log: Callable[..., None]):
        self.log = log
        self.losses: List[Tuple[int, float]] = []

    def __call__(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if "train/loss" in metrics:
            self.losses.append((int(step), float(metrics["train/loss"])))
        self.log(metrics, step)


def learning_curves(history: Sequence[Mapping[str, float]], losses: Sequence[Tuple[int, float]], path: Path,
                    title: str = "", test_auc: Optional[float] = None) -> Path:
    """Draw the learning curves of a run to the PNG ``path``. ``history``: the trainer's records (one
    per evaluation: ``step``, ``stage``, ``val/auc``, ``val/logloss``, ``train/loss``); ``losses``:
    (step, training loss) pairs (a resumed run has only those after its checkpoint: the history's
    points fill in)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 3.6), dpi=DPI)
    loss_ax, auc_ax = fig.subplots(1, 2)
    evals = [h for h in history if "val/auc" in h]
    train = dict((int(h["step"]), float(h["train/loss"])) for h in evals if "train/loss" in h)
    train.update(dict(losses))
    if train:
        steps = sorted(train)
        loss_ax.plot(steps, [train[s] for s in steps], color="tab:blue", lw=1, label="train loss")
    if evals:
        steps = [h["step"] for h in evals]
        loss_ax.plot(steps, [h["val/logloss"] for h in evals], "o-", color="tab:orange", ms=3, lw=1.2,
                     label="val log loss")
        aucs = [h["val/auc"] for h in evals]
        auc_ax.plot(steps, aucs, "o-", color="tab:green", ms=3, lw=1.2, label="val AUC")
        best = max(range(len(aucs)), key=aucs.__getitem__)
        auc_ax.plot([steps[best]], [aucs[best]], "*", color="black", ms=11,
                    label=f"best val AUC {aucs[best]:.4f} (kept)")
    if test_auc is not None:
        auc_ax.axhline(test_auc, color="tab:red", ls=":", lw=1.2, label=f"test AUC {test_auc:.4f}")
    stages = {}
    for h in evals:
        stages.setdefault(int(h.get("stage", 0)), h["step"])
    for stage, start in sorted(stages.items())[1:]:  # where each later stage starts
        for ax in (loss_ax, auc_ax):
            ax.axvline(start, color="grey", lw=0.8, ls="--")
        auc_ax.annotate(f" stage {stage}", (start, 0.02), xycoords=("data", "axes fraction"), fontsize=7,
                        color="grey", ha="left", va="bottom")
    for ax, label in ((loss_ax, "loss"), (auc_ax, "AUC")):
        ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="best")
    loss_ax.set_title("loss", **TITLE)
    auc_ax.set_title("validation AUC", **TITLE)
    if not evals and not train:
        loss_ax.text(0.5, 0.5, "no step logged", ha="center", transform=loss_ax.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.85, wspace=0.22)
    fig.savefig(path, format="png")
    return Path(path)


def memory_breakdown(memory: MemoryReport, tables: Sequence[TableSpec], dim: int, requested_ratio: float,
                     measured: Mapping[str, float], path: Path, title: str = "") -> Path:
    """Draw the embedding memory of a run to the PNG ``path``: ``memory`` is the plan's closed form
    (``Plan.memory``), ``measured`` the run's metrics (``emb/bytes_inference``, ``emb/bytes_training``)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 3.6), dpi=DPI)
    bars, per_table = fig.subplots(1, 2, gridspec_kw={"width_ratios": [5, 3]})
    rows: List[Tuple[str, Dict[str, float]]] = [
        ("full fp32", {"": memory.full_bytes}),
        ("inference, planned", dict(memory.breakdown) if memory.breakdown else {"": memory.inference_bytes}),
    ]
    if "emb/bytes_inference" in measured:
        rows.append(("inference, measured", {"": measured["emb/bytes_inference"]}))
    rows.append(("training state, planned", {"": measured.get("emb/bytes_training", memory.training_bytes)}))
    split = {f"training {part}".replace("_", " "): measured[f"emb/bytes_training_{part}"] for part in MEMORY_PARTS
             if f"emb/bytes_training_{part}" in measured}
    if split:  # measured on the trained module (recbench.training.memory_split), as TorchRec's planner splits it
        rows.append(("training, measured", split))
    parts = [name for _, split in rows for name in split if name]
    colours = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(parts))}
    labels = [label for label, _ in rows][::-1]
    for y, (label, split) in enumerate(rows[::-1]):
        left = 0.0
        for name, value in split.items():
            colour = colours.get(name, "0.55")
            bars.barh(y, value, left=left, color=colour, label=name or None, height=0.6)
            left += value
        bars.annotate(format_bytes(left, "?"), (left, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    budget = requested_ratio * memory.full_bytes
    bars.axvline(budget, color="tab:red", ls="--", lw=1.2, label=f"budget ({requested_ratio:g} x full)")
    bars.set_yticks(range(len(labels)), labels, fontsize=8)
    bars.xaxis.set_major_formatter(_bytes_formatter())
    bars.xaxis.set_major_locator(MaxNLocator(5))
    bars.set_xlim(0, max(budget, *(sum(split.values()) for _, split in rows)) * 1.2)
    bars.set_title("embedding memory (bytes)", **TITLE)
    handles, names = bars.get_legend_handles_labels()
    unique = dict(zip(names, handles))  # one entry per planned part, and the budget
    bars.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                title="planned parts" if parts else None, title_fontsize=7)
    sizes = sorted(((t.num_embeddings * dim * FP32_BYTES, t.name) for t in tables), reverse=True)
    shown = sizes[:TOP_TABLES]
    if len(sizes) > TOP_TABLES:
        shown.append((sum(size for size, _ in sizes[TOP_TABLES:]), f"{len(sizes) - TOP_TABLES} other tables"))
    per_table.barh(range(len(shown))[::-1], [size for size, _ in shown], color="0.55", height=0.6)
    per_table.set_yticks(range(len(shown))[::-1], [name for _, name in shown], fontsize=7)
    per_table.xaxis.set_major_formatter(_bytes_formatter())
    per_table.xaxis.set_major_locator(MaxNLocator(3))
    per_table.set_title(f"uncompressed size per table (dim {dim})", **TITLE)
    for ax in (bars, per_table):
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.13, right=0.98, bottom=0.1, top=0.85, wspace=0.75)
    fig.savefig(path, format="png")
    return Path(path)
