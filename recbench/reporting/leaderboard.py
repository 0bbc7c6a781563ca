"""Leaderboard scoring: mean +- std over seeds per (protocol, method, budget), ranks with ties,
delta AUC vs ``full``, the Pareto front of AUC vs inference bytes and a budget -> method
recommendation.

Pure functions over run records (``reporting.runs``: MLflow or exported JSON), so they are tested
on fixtures; loading, plotting and rendering live elsewhere (scoring separate from loading).

Rules (stated in every report):
- A row is one (protocol, method, requested compression ratio, config group) where the config
  group is the run's config hash without the seed (``group_hash`` tag): seeds of the same
  configuration are averaged, different configurations never are. Only runs that FINISHED with
  ``status=finished`` count; of several finished runs of one seed the latest counts once.
- mean +- std over seeds (sample std, ddof=1; no std for a single seed).
- Rank: within one budget, by mean test AUC (1 = the highest; equal means share a rank), so a
  lower mean is never ranked above a higher one.
- Not distinguishable from the best (``≈``): a two-sided Welch t-test across seeds between a row
  and the best row (the highest mean) at 95% (p >= 0.05), checked down the ranking: the first row
  that is distinguishable ends the run, and no row below it is marked, so noise is never rewarded
  with a mark a better row lacks. A row, or a best row, with one seed has no std and is not tested
  (flagged ``1 seed``; it neither gets the mark nor ends the run).
- Recommendation per budget: among the best row and the rows ``≈`` it, the lowest inference
  latency, then the fewest inference bytes (rows without a latency come last).
- Delta AUC is against the ``full`` reference (ratio 1.0) of the same protocol.
- Pareto front (AUC up, inference bytes down): rows that no other row beats on both, i.e. no
  row has bytes <= and AUC >= with one of them strict.
- Caveats (``†``): a row whose runs logged ``stage/<name>/target_reached = 0`` (a search or
  pruning stage that ended at its epoch cap before reaching its target) carries a note saying so
  and in how many of its seeds; its numbers are reported as measured.
- Under budget (``↓``): a row whose runs are tagged ``under_budget=true`` (the method's best
  configuration under the budget lands below (1 - tolerance) x the requested ratio) ran at its
  achieved ratio; it is ranked with its budget like any other row and marked, with a legend line
  under the table (column ``under_budget`` in the CSV).

References: docs/architecture.md sections 4 (seeds, mean +- std) and 5 (tags, metric keys).
"""
from __future__ import annotations

import math
import re
import shlex
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy.stats import t as student_t

from recbench.tracking.base import with_thread_count
from recbench.types import format_bytes
from recbench.training.evaluation import normalized_entropy
from recbench.tracking.schema import parse_ratio

AUC, LOGLOSS, BYTES, RATIO = "test/auc", "test/logloss", "emb/bytes_inference", "emb/compression_ratio"
SPEED, LATENCY, BAYES, NE = "train/samples_per_s", "infer/latency_ms", "bayes/test_auc", "test/ne"
TRAIN_BYTES = "emb/bytes_training"  # the method's closed-form training state (weights, optimizer state, buffers)
COLUMNS = (AUC, LOGLOSS, NE, RATIO, BYTES, TRAIN_BYTES, SPEED, LATENCY, BAYES, "val/auc")
REFERENCE_METHOD = "full"
ALPHA = 0.05  # the Welch test's level: "not distinguishable from the best" at 95%
RULES = ("mean ± std over seeds (sample std); rank by mean test AUC (1 = highest); ≈ best: not distinguishable "
         "from the highest mean by a two-sided Welch t-test across seeds at 95% (p ≥ 0.05), checked down the "
         "ranking until the first row that is distinguishable (no row below it is marked); a row with 1 seed "
         "(or a best row with 1 seed) is not tested and says so; recommended: among the best and the rows ≈ "
         "best, the lowest inference latency, then the fewest inference bytes; "
         f"Δ AUC vs `{REFERENCE_METHOD}` at ratio 1; NE: normalised entropy, the test log loss over the entropy "
         "of the test positive rate (lower is better; 1 = a constant prediction); Pareto front: "
         "no other row has fewer or equal inference bytes and higher or equal AUC; † a caveat noted under "
         "the table (e.g. a search stage that ended at its epoch cap before reaching its target).")
#: the recommendation table's rule, stated above it
RECOMMENDATION_RULE = ("Recommended: among the highest mean test AUC and the rows not distinguishable from it "
                       f"(Welch t-test across seeds, p ≥ {ALPHA:g}), the lowest inference latency, then the fewest "
                       "inference bytes.")
#: added to the rules of a report that has an under-budget row
UNDER_BUDGET_RULE = ("↓ under budget: the method's best configuration under the budget lands below "
                     "(1 - tolerance) x the requested ratio; the row ran at its achieved ratio (a budget is "
                     "infeasible only when nothing the method can build fits under it).")


@dataclass
class Row:
    protocol: str
    method: str
    ratio: float  # requested compression ratio
    status: str  # finished | infeasible | failed
    seeds: int
    mean: Dict[str, float] = field(default_factory=dict)
    std: Dict[str, float] = field(default_factory=dict)
    run_ids: List[str] = field(default_factory=list)
    reason: str = ""
    dataset: str = ""
    group: str = ""
    label: str = ""  # method, or method [group] when one method has several configurations at a budget
    seed_list: List[str] = field(default_factory=list)
    experiment_ids: List[str] = field(default_factory=list)
    overrides: str = ""
    num_threads: str = ""  # the torch thread count every seed ran with ("" if unrecorded or mixed)
    git_commits: List[str] = field(default_factory=list)
    rank: int = 0  # by mean test AUC within its budget (1 = highest)
    best: bool = False  # the highest mean of its budget (the row the others are tested against)
    near_best: bool = False  # not distinguishable from the best (Welch, see the rules); False for the best itself
    p_best: float = float("nan")  # the Welch test's p-value against the best (nan: not tested)
    pareto: bool = False
    delta_auc: float = float("nan")
    notes: List[str] = field(default_factory=list)  # caveats of the measured numbers (``stage_notes``)
    under_budget: bool = False  # its runs are tagged under_budget=true (solved below (1 - tolerance) x the ratio)

    @property
    def auc(self) -> float:
        return self.mean.get(AUC, float("nan"))

    @property
    def auc_std(self) -> float:
        value = self.std.get(AUC, float("nan"))
        return 0.0 if math.isnan(value) else value

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def single_seed(self) -> bool:
        return self.finished and self.seeds < 2


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _key(value: float) -> float:
    return -1.0 if math.isnan(value) else value


def dedupe_seeds(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One run per seed: the latest finished one (a re-run must not count twice)."""
    latest: Dict[str, Dict[str, Any]] = {}
    for run in runs:
        seed = str(run.get("seed", ""))
        if seed not in latest or (run.get("end_time") or 0) > (latest[seed].get("end_time") or 0):
            latest[seed] = run
    return [latest[s] for s in sorted(latest, key=lambda s: (len(s), s))]


_TARGET_REACHED = re.compile(r"^stage/(?P<stage>.+)/target_reached$")


def stage_notes(runs: Sequence[Dict[str, Any]]) -> List[str]:
    """Caveats of a row's finished runs: every stage that logged ``target_reached = 0`` in some seed."""
    missed: Dict[str, int] = defaultdict(int)
    for run in runs:
        for key, value in run.get("metrics", {}).items():
            match = _TARGET_REACHED.match(key)
            if match and float(value) == 0.0:
                missed[match["stage"]] += 1
    return [f"stage `{stage}` ended at its epoch cap before reaching its target in {count} of {len(runs)} seed(s)"
            for stage, count in sorted(missed.items())]


UNDER_BUDGET_MARK = "↓"


def is_under_budget(record: Dict[str, Any]) -> bool:
    """Whether a run record is tagged ``under_budget=true`` (the job's flag)."""
    return str(record.get("under_budget", "")).strip().lower() == "true"


def flagged(row: "Row") -> str:
    """The row's label, with ``↓`` when it ran under budget."""
    return f"{row.label} {UNDER_BUDGET_MARK}" if row.under_budget else row.label


def marked(row: "Row") -> str:
    """The row's label, with ``↓`` when it ran under budget and ``†`` when it carries notes."""
    return f"{flagged(row)} †" if row.notes else flagged(row)


def under_budget_legend(row: "Row") -> str:
    """The legend line of an under-budget row: what it reached against what was requested."""
    return (f"{UNDER_BUDGET_MARK} {row.label}: under budget: the method's best configuration under ratio "
            f"{row.ratio:g} reaches {row.mean.get(RATIO, float('nan')):.4g}, below (1 - tolerance) x {row.ratio:g}; "
            "it ran at that ratio.")


def metrics_of(record: Dict[str, Any]) -> Dict[str, float]:
    """A record's final metrics, with ``test/ne`` derived from its test log loss and positive rate
    when the run predates logging it (the same formula the trainer logs)."""
    metrics = dict(record.get("metrics", {}))
    if NE not in metrics and LOGLOSS in metrics and "test/positive_rate" in metrics:
        metrics[NE] = normalized_entropy(float(metrics[LOGLOSS]), float(metrics["test/positive_rate"]))
    return metrics


def composed_suffix(record: Dict[str, Any]) -> str:
    """``+int8`` for a run of a method composed with quantized tables (``method.quantize``), else ""."""
    quantize = (record.get("params") or {}).get("method.quantize", "none")
    return f"+{quantize}" if quantize not in ("none", None, "") else ""


def _is_finished(record: Dict[str, Any]) -> bool:
    return record.get("status") == "finished" and record.get("run_status", "FINISHED") == "FINISHED"


def aggregate(records: Iterable[Dict[str, Any]]) -> List[Row]:
    """Rows of every (protocol, method, ratio, config group), scored: ranks, ties, delta vs full, Pareto."""
    groups: Dict[Tuple[str, str, float, str], List[Dict[str, Any]]] = defaultdict(list)
    for record in records:
        key = (record.get("protocol", ""), record.get("method", ""), parse_ratio(record.get("compression_ratio")),
               record.get("group_hash", "") or "")
        groups[key].append(record)
    rows = []
    for (protocol, method, ratio, group), runs in groups.items():
        finished = dedupe_seeds([r for r in runs if _is_finished(r)])
        common = dict(dataset=runs[0].get("dataset", ""), group=group, label=method + composed_suffix(runs[0]))
        if finished:
            row = Row(protocol, method, ratio, "finished", len(finished), **common)
            metrics = [metrics_of(r) for r in finished]
            for key in COLUMNS:
                values = [float(m[key]) for m in metrics if key in m]
                if values:
                    row.mean[key] = float(np.mean(values))
                    row.std[key] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
            row.run_ids = [r["run_id"] for r in finished]
            row.seed_list = [str(r.get("seed", "")) for r in finished]
            row.experiment_ids = [str(r.get("experiment_id", "")) for r in finished]
            row.overrides = next((r.get("overrides", "") for r in finished if r.get("overrides")), "")
            threads = {r.get("num_threads", "") for r in finished}
            row.num_threads = threads.pop() if len(threads) == 1 else ""
            row.git_commits = sorted({r.get("git_commit", "") for r in finished if r.get("git_commit")})
            row.notes = stage_notes(finished)
            row.under_budget = any(is_under_budget(r) for r in finished)
        else:
            statuses = {r.get("status") or r.get("run_status", "").lower() for r in runs}
            status = "infeasible" if "infeasible" in statuses else "failed"
            reason = next((r.get("status_reason", "") for r in runs if r.get("status_reason")), "")
            if status == "failed" and not reason:
                reason = f"no finished run (MLflow status: {', '.join(sorted({r.get('run_status', '?') for r in runs}))})"
            runs = dedupe_seeds(runs)
            row = Row(protocol, method, ratio, status, 0, reason=reason, run_ids=[r["run_id"] for r in runs],
                      experiment_ids=[str(r.get("experiment_id", "")) for r in runs],
                      seed_list=[str(r.get("seed", "")) for r in runs],
                      overrides=next((r.get("overrides", "") for r in runs if r.get("overrides")), ""), **common)
        rows.append(row)
    _label_variants(rows)
    score(rows)
    rows.sort(key=lambda r: (r.protocol, -_key(r.ratio), not r.finished, r.rank or 10**6, -_key(r.auc), r.label))
    return rows


def _label_variants(rows: List[Row]) -> None:
    by_key: Dict[Tuple[str, str, float], List[Row]] = defaultdict(list)
    for row in rows:
        by_key[(row.protocol, row.label, row.ratio)].append(row)
    for variants in by_key.values():
        if len(variants) > 1:
            for row in variants:
                row.label = f"{row.label} [{row.group[:6] or '?'}]"


def welch_p(a: "Row", b: "Row") -> float:
    """Two-sided p-value of Welch's t-test on the test AUCs of two rows' seeds (from their means, sample
    stds and seed counts); nan when either row has fewer than 2 seeds. Both stds 0: 1 if the means are
    equal, else 0."""
    if a.seeds < 2 or b.seeds < 2:
        return float("nan")
    va, vb = a.auc_std ** 2 / a.seeds, b.auc_std ** 2 / b.seeds
    if va + vb == 0.0:
        return 1.0 if a.auc == b.auc else 0.0
    t = (a.auc - b.auc) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a.seeds - 1) + vb ** 2 / (b.seeds - 1))
    return float(2.0 * student_t.sf(abs(t), df))


def rank_by_mean(rows: Sequence[Row], alpha: float = ALPHA) -> None:
    """Set ``rank``, ``best``, ``p_best`` and ``near_best`` on the finished rows of one budget (see the
    module rules)."""
    finished = sorted((r for r in rows if r.finished and not math.isnan(r.auc)), key=lambda r: (-r.auc, -r.seeds))
    for row in finished:
        row.rank = 1 + sum(1 for other in finished if other.auc > row.auc)
    if not finished:
        return
    top, open_run = finished[0], True
    top.best = True
    for row in finished[1:]:
        row.p_best = welch_p(top, row)
        if math.isnan(row.p_best):
            continue  # not tested: neither marked nor ending the run
        open_run = open_run and row.p_best >= alpha
        row.near_best = open_run


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[bool]:
    """Non-dominated flags for (bytes, auc) points: fewer bytes and higher AUC are better."""
    flags = []
    for i, (b_i, a_i) in enumerate(points):
        dominated = any(b_j <= b_i and a_j >= a_i and (b_j < b_i or a_j > a_i)
                        for j, (b_j, a_j) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def reference(rows: Sequence[Row], protocol: str) -> Optional[Row]:
    """The ``full`` row (ratio 1.0) of ``protocol`` (never ``full`` composed with quantized tables)."""
    candidates = [r for r in rows if r.protocol == protocol and r.method == REFERENCE_METHOD and r.finished
                  and not r.label.startswith(f"{REFERENCE_METHOD}+")]
    candidates.sort(key=lambda r: (abs(r.ratio - 1.0), -r.seeds))
    return candidates[0] if candidates else None


def score(rows: List[Row]) -> None:
    """Ranks and ties per budget, delta AUC vs full, Pareto membership per protocol."""
    for protocol in {r.protocol for r in rows}:
        mine = [r for r in rows if r.protocol == protocol]
        for ratio in {r.ratio for r in mine}:
            rank_by_mean([r for r in mine if r.ratio == ratio])
        ref = reference(rows, protocol)
        for row in mine:
            if ref is not None and row.finished:
                row.delta_auc = row.auc - ref.auc
        candidates = [r for r in mine if r.finished and BYTES in r.mean and not math.isnan(r.auc)]
        for row, flag in zip(candidates, pareto_front([(r.mean[BYTES], r.auc) for r in candidates])):
            row.pareto = flag


def protocols(rows: Sequence[Row]) -> List[str]:
    """Protocols, the one with most finished runs first."""
    counts: Dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row.protocol] += row.seeds
    return sorted(counts, key=lambda p: (-counts[p], p))


def budgets(rows: Sequence[Row], protocol: str) -> List[float]:
    return sorted({r.ratio for r in rows if r.protocol == protocol}, key=lambda x: -_key(x))


@dataclass
class Recommendation:
    ratio: float
    pick: Optional[Row]  # the recommended row: the tie-breaker's choice among ``best`` and ``near``
    best: Optional[Row]  # the highest mean test AUC
    near: List[Row]  # the rows not distinguishable from ``best`` (by rank)
    infeasible: List[str]
    failed: List[str]

    @property
    def candidates(self) -> List[Row]:
        """The rows the recommendation chose from, in the tie-breaker's order."""
        rows = ([self.best] if self.best else []) + self.near
        return sorted(rows, key=tie_breaker)


def tie_breaker(row: Row) -> Tuple[float, float, int]:
    """Lowest inference latency, then fewest inference bytes (missing values last), then rank."""
    latency, size = row.mean.get(LATENCY, math.nan), row.mean.get(BYTES, math.nan)
    return (math.inf if math.isnan(latency) else latency, math.inf if math.isnan(size) else size, row.rank)


def recommend(rows: Sequence[Row], protocol: str) -> List[Recommendation]:
    """Per budget: the best mean, the rows not distinguishable from it, the recommended one among
    them (tie-breaker: latency, then bytes), the infeasible and failed methods."""
    out = []
    for ratio in budgets(rows, protocol):
        here = [r for r in rows if r.protocol == protocol and r.ratio == ratio]
        best = next((r for r in here if r.finished and r.best), None)
        near = sorted((r for r in here if r.finished and r.near_best), key=lambda r: (r.rank, r.label))
        rec = Recommendation(ratio, None, best, near, sorted(r.label for r in here if r.status == "infeasible"),
                             sorted(r.label for r in here if r.status == "failed"))
        rec.pick = rec.candidates[0] if rec.candidates else None
        out.append(rec)
    return out


def infeasible_from(rows: Sequence[Row], protocol: str) -> Dict[str, float]:
    """Per method: the largest requested ratio at which it is infeasible (where it becomes infeasible)."""
    out: Dict[str, float] = {}
    for row in rows:
        if row.protocol == protocol and row.status == "infeasible":
            out[row.method] = max(out.get(row.method, -1.0), row.ratio)
    return out


def bayes_ceiling(rows: Sequence[Row], protocol: str) -> Optional[float]:
    values = [r.mean[BAYES] for r in rows if r.protocol == protocol and BAYES in r.mean]
    return float(np.mean(values)) if values else None


# --- formatting helpers shared by the Markdown, CSV and HTML renderers -------------------------

def fmt(mean: Optional[float], std: Optional[float] = None, digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


fmt_bytes = format_bytes  # the one byte formatter (recbench.types), under the renderers' names


def fmt_rank(row: Row) -> str:
    return str(row.rank) if row.finished and row.rank else "—"


def fmt_vs_best(row: Row) -> str:
    """The row's standing against the best of its budget: ``best``, ``≈ (p 0.31)``, ``p 0.002``,
    ``1 seed: not tested``."""
    if not row.finished:
        return "—"
    if row.best:
        return "best (1 seed)" if row.single_seed else "best"
    if math.isnan(row.p_best):
        return "1 seed: not tested"
    p = f"p {row.p_best:.2g}" if row.p_best >= 0.001 else "p < 0.001"
    return f"≈ ({p})" if row.near_best else p


def fmt_auc(row: Row) -> str:
    """Mean ± std of the test AUC; a single-seed row says so instead of a std."""
    return f"{row.auc:.4f} (1 seed)" if row.single_seed else fmt(row.auc, row.std.get(AUC))


def fmt_latency(row: Row) -> str:
    value = row.mean.get(LATENCY, math.nan)
    return "—" if math.isnan(value) else f"{value:.2f}"


def fmt_budget(ratio: float) -> str:
    """``10x (ratio 0.1)``: the compression factor first, the ratio it is requested as."""
    if not ratio > 0:
        return f"ratio {ratio:g}"
    factor = 1 / ratio
    return f"{factor:,.0f}x (ratio {ratio:g})" if factor >= 100 else f"{factor:.3g}x (ratio {ratio:g})"


def fmt_delta(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:+.4f}"


def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def command(row: Row) -> str:
    """The command that reproduces the row (its seeds as one multirun), with the torch thread count
    its runs had when they recorded it: the count is left out of the config hash but changes the
    order of float reductions, so the numbers repeat bit for bit only with the same count.

    The ``overrides`` tag is split as the shell would and every word is quoted back with
    ``shlex.join``, so a tag from an imported store can never put shell syntax into the command."""
    if row.overrides:
        try:
            words = shlex.split(row.overrides)
        except ValueError:  # unbalanced quotes: not what the CLI writes; keep the words, quoted
            words = row.overrides.split()
        parts = [o for o in words if not o.startswith("seed=")]
    else:
        parts = [f"dataset={row.dataset}", f"method={row.method}", f"budget.compression_ratio={row.ratio:g}"]
    parts = with_thread_count(parts, row.num_threads)
    seeds = row.seed_list or ["0"]
    return shlex.join(["recbench", *(["-m"] if len(seeds) > 1 else []), *parts, f"seed={','.join(seeds)}"])


# what can break out of a table cell or make a link (images need "[" too); "_" and "*" only
# change emphasis, and escaping them would clutter every method name
_MARKDOWN_SPECIAL = re.compile(r"([\\`|\[\]])")
_MARKDOWN_SPECIAL_BUT_CODE = re.compile(r"([\\|\[\]])")


def md(text: str, code: bool = False) -> str:
    """``text`` as literal Markdown table-cell text: HTML escaped; backslash, backtick, ``|`` and
    brackets backslashed; newlines as spaces. ``code``: recbench's own text whose backticks mark
    code spans (the stage notes) keeps them."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    special = _MARKDOWN_SPECIAL_BUT_CODE if code else _MARKDOWN_SPECIAL
    return special.sub(r"\\\1", text).replace("\n", " ")


def md_code(text: str) -> str:
    """``text`` as a Markdown code span inside a table cell (a fence longer than any backtick run
    in it; ``|`` escaped, which GitHub's tables require even in code)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    body = text.replace("|", "\\|")
    return f"{fence} {body} {fence}" if longest else f"`{body}`"


def markdown_tables(rows: Sequence[Row], protocol: str, ui_url: str) -> str:
    """Markdown: recommendation, then one leaderboard table per budget, for one protocol."""
    out = []
    ref = reference(rows, protocol)
    bayes = bayes_ceiling(rows, protocol)
    if ref is not None:
        out.append(f"Reference `full` (ratio 1): test AUC {fmt(ref.auc, ref.std.get(AUC))}, "
                   f"{fmt_bytes(ref.mean.get(BYTES))} inference bytes, {ref.seeds} seed(s).")
    if bayes is not None:
        out.append(f"Bayes-optimal test AUC (ceiling): {bayes:.4f}.")
    out.append("\n### Which method at which budget\n")
    out.append(RECOMMENDATION_RULE + "\n")
    out.append("| budget | recommended | test AUC | latency ms (batch 4096) | inference bytes | Δ AUC vs full "
               "| best mean, if another | also ≈ best | infeasible |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for rec in recommend(rows, protocol):
        pick, best = rec.pick, rec.best
        others = [r.label for r in rec.candidates if r is not pick]
        out.append(f"| {fmt_budget(rec.ratio)} | {md(flagged(pick)) if pick else '—'} | "
                   f"{fmt_auc(pick) if pick else '—'} | {fmt_latency(pick) if pick else '—'} | "
                   f"{fmt_bytes(pick.mean.get(BYTES)) if pick else '—'} | {fmt_delta(pick.delta_auc) if pick else '—'} | "
                   f"{md(flagged(best)) + ' ' + fmt_auc(best) if best and best is not pick else '—'} | "
                   f"{md(', '.join(l for l in others if not best or l != best.label)) or '—'} | "
                   f"{md(', '.join(rec.infeasible)) or '—'} |")
    for ratio in budgets(rows, protocol):
        out.append(f"\n### Budget {fmt_budget(ratio)}\n")
        out.append("| rank | method | seeds | test AUC | vs best | Δ AUC vs full | test log loss | test NE | inference bytes "
                   "| training bytes | achieved ratio | train samples/s | latency ms (batch 4096) | Pareto | runs | command |")
        out.append("|---" * 16 + "|")
        for r in (r for r in rows if r.protocol == protocol and r.ratio == ratio):
            links = " ".join(f"[s{s}]({run_url(ui_url, e, i)})" for s, e, i in
                             zip(r.seed_list or ["?"] * len(r.run_ids), r.experiment_ids, r.run_ids))
            if not r.finished:
                out.append(f"| — | {md(r.label)} | 0 | {md(r.status)}: {md(r.reason[:160])} | — | — | — | — | — | — | — | — | — | — "
                           f"| {links} | {md_code(command(r))} |")
                continue
            out.append(
                f"| {fmt_rank(r)} | {md(marked(r))} | {r.seeds} | {fmt_auc(r)} | {fmt_vs_best(r)} | {fmt_delta(r.delta_auc)} | "
                f"{fmt(r.mean.get(LOGLOSS), r.std.get(LOGLOSS))} | {fmt(r.mean.get(NE), r.std.get(NE))} | "
                f"{fmt_bytes(r.mean.get(BYTES))} | {fmt_bytes(r.mean.get(TRAIN_BYTES))} | "
                f"{r.mean.get(RATIO, float('nan')):.4g} | {r.mean.get(SPEED, float('nan')):,.0f} | "
                f"{fmt_latency(r)} | {'yes' if r.pareto else ''} | {links} | {md_code(command(r))} |")
        noted = [r for r in rows if r.protocol == protocol and r.ratio == ratio and r.notes]
        under = [r for r in rows if r.protocol == protocol and r.ratio == ratio and r.finished and r.under_budget]
        if noted or under:
            out.append("")
            out.extend(f"† {md(r.label)}: {md('; '.join(r.notes), code=True)}." for r in noted)
            out.extend(under_budget_legend(r) for r in under)
    out.append(f"\nRules: {rules_text(rows, protocol)}")
    return "\n".join(out)


def rules_text(rows: Sequence[Row], protocol: Optional[str] = None) -> str:
    """The report's rules, with the under-budget marker's when the protocol (any, if None) has such a row."""
    if any((protocol is None or r.protocol == protocol) and r.finished and r.under_budget for r in rows):
        return f"{RULES} {UNDER_BUDGET_RULE}"
    return RULES


def markdown(rows: Sequence[Row], ui_url: str = "http://127.0.0.1:5000") -> str:
    """One section per protocol."""
    return "\n\n".join(f"## Protocol `{p}`\n\n{markdown_tables(rows, p, ui_url)}" for p in protocols(rows))


def csv_rows(rows: Sequence[Row], ui_url: str = "http://127.0.0.1:5000") -> List[Dict[str, Any]]:
    table = []
    for r in rows:
        item: Dict[str, Any] = {
            "protocol": r.protocol, "dataset": r.dataset, "method": r.label, "ratio": r.ratio, "status": r.status,
            "seeds": r.seeds, "rank": r.rank if r.finished else "", "best": int(r.best), "near_best": int(r.near_best),
            "p_vs_best": "" if math.isnan(r.p_best) else r.p_best, "single_seed": int(r.single_seed), "pareto": int(r.pareto),
            "delta_auc_vs_full": "" if math.isnan(r.delta_auc) else r.delta_auc, "reason": r.reason,
            "notes": "; ".join(r.notes), "under_budget": int(r.under_budget),
        }
        for key in COLUMNS:
            item[f"{key}_mean"] = r.mean.get(key, "")
            std = r.std.get(key, "")
            item[f"{key}_std"] = "" if isinstance(std, float) and math.isnan(std) else std
        item.update({"seed_list": " ".join(r.seed_list), "run_ids": " ".join(r.run_ids),
                     "run_urls": " ".join(run_url(ui_url, e, i) for e, i in zip(r.experiment_ids, r.run_ids)),
                     "git_commits": " ".join(r.git_commits), "command": command(r)})
        table.append(item)
    return table
