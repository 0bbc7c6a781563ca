"""Headline claims of the seed papers checked against recbench's measured runs: ``reports/claims.md``.

    python -m recbench.reporting.claims --records reports/reference/movielens100k/runs.json \\
        reports/reference/synthetic/runs.json --out reports/claims.md
    python -m recbench.reporting.claims --tracking-uri sqlite:///mlflow.db --out reports/claims.md

One job: from run records (``reporting.runs``: exported JSON or an MLflow store) to one table row per
(claim, dataset). A claim is data (``CLAIMS``): the paper's own words and number with its dataset and
setting, the source it was read from, the methods and budgets it maps to on recbench's grid, and the
name of its verdict rule (``RULES``, each a fixed function stated in the output). Nothing is fitted to
the runs: a rule reads the leaderboard rows (``reporting.leaderboard.aggregate``: mean ± std over seeds
per protocol, method and budget) and the project's test (``leaderboard.welch_p``: two-sided Welch t-test
across seeds at ``ALPHA`` = 0.05).

Verdicts: ``holds``, ``does not hold``, ``not testable here`` (with the reason: a method infeasible at
the budget, with the budget solver's ``status_reason``; records missing; a number the stored sources
do not give). A claim checked at several budgets holds when it holds at every budget that could be
tested, and does not hold when it fails at any of them.

References: docs/architecture.md section 5 (tracking schema, reports); ``reporting.leaderboard``.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from recbench.reporting.leaderboard import (ALPHA, REFERENCE_METHOD, Row, aggregate, fmt_auc, fmt_budget,
                                            md, protocols, reference, welch_p)
from recbench.reporting.runs import load_mlflow_runs, load_records

HOLDS, FAILS, UNTESTABLE = "holds", "does not hold", "not testable here"
GRID_BUDGETS = (0.5, 0.2, 0.1, 0.05, 0.01, 0.001)  # the reference grids' requested ratios (below full's 1)


@dataclass(frozen=True)
class Claim:
    key: str
    claim: str  # the claim as recbench tests it
    paper: str  # authors, title, venue
    quote: str  # the paper's own words and number (from ``source``)
    setting: str  # the paper's dataset and setting for that number
    source: str  # where the quote was read
    rule: str  # a key of ``RULES``
    method: str
    baselines: Tuple[str, ...] = ()
    budgets: Tuple[float, ...] = GRID_BUDGETS  # requested ratios the claim is checked at
    tolerance: Optional[float] = None  # relative AUC tolerance the rule uses (the paper's own); None: none
    mapping: str = ""  # how the claim maps onto recbench's grid (which budget, which baseline, why)
    retest: str = ""  # the run that tests the claim where the records lack it


@dataclass
class Check:
    """One test of a claim at one budget (``ratio`` None: a claim over the whole grid)."""
    ratio: Optional[float]
    verdict: str
    measured: str
    reason: str = ""


@dataclass
class Grid:
    """One dataset's records and its leaderboard rows (main protocol: the one with most finished runs)."""
    dataset: str
    protocol: str
    rows: List[Row]
    records: List[Dict[str, Any]]

    def row(self, method: str, ratio: float) -> Optional[Row]:
        """The method's row at a requested ratio (several configurations: the one with most seeds)."""
        here = [r for r in self.rows if r.method == method and r.ratio == ratio and r.label.split(" ")[0] == method]
        return max(here, key=lambda r: (r.finished, r.seeds), default=None)

    @property
    def full(self) -> Optional[Row]:
        return reference(self.rows, self.protocol)


# --- text of one row --------------------------------------------------------------------------

def seeds_text(row: Row) -> str:
    return f"n={row.seeds}"


def measured(row: Row) -> str:
    """``0.7694 ± 0.0013 (n=3)``, with the achieved ratio when the row ran under budget."""
    under = f", under budget: achieved ratio {row.mean.get('emb/compression_ratio', float('nan')):.4g}" \
        if row.under_budget else ""
    return f"{fmt_auc(row)} ({seeds_text(row)}{under})"


def missing(grid: Grid, method: str, ratio: float) -> Optional[str]:
    """Why ``method`` has no finished row at ``ratio`` (None: it has one)."""
    row = grid.row(method, ratio)
    if row is None:
        return f"no `{method}` run at {fmt_budget(ratio)} in the records"
    if not row.finished:
        return f"`{method}` {row.status} at {fmt_budget(ratio)}: {row.reason}"
    return None


def p_text(p: float) -> str:
    if math.isnan(p):
        return "Welch p: not tested (1 seed)"
    return f"Welch p {p:.2g}" if p >= 0.001 else "Welch p < 0.001"


def compare(a: Row, b: Row) -> Tuple[float, float, str]:
    """Δ mean AUC (a - b), Welch p, and their text."""
    delta, p = a.auc - b.auc, welch_p(a, b)
    return delta, p, f"Δ {delta:+.4f}, {p_text(p)}"


def beats(a: Row, b: Row) -> bool:
    """The project's rule: a higher mean and distinguishable by Welch's test at ``ALPHA``."""
    p = welch_p(a, b)
    return a.auc > b.auc and not math.isnan(p) and p < ALPHA


# --- the rules ----------------------------------------------------------------------------------

def against_full(claim: Claim, grid: Grid, judge: Callable[[Row, Row], Check]) -> List[Check]:
    """Per budget of the claim: ``judge(row, full)`` on the method's row and the ``full`` reference, or why
    that budget cannot be tested."""
    out = []
    for ratio in claim.budgets:
        full, why = grid.full, missing(grid, claim.method, ratio)
        if full is None:
            why = f"no finished `{REFERENCE_METHOD}` row in the records"
        out.append(Check(ratio, UNTESTABLE, "—", why) if why else judge(grid.row(claim.method, ratio), full))
    return out


def rule_same_as_full(claim: Claim, grid: Grid) -> List[Check]:
    def judge(row: Row, full: Row) -> Check:
        delta, p, text = compare(row, full)
        within = claim.tolerance is None or abs(delta) <= claim.tolerance * full.auc
        same = not math.isnan(p) and p >= ALPHA and within
        tol = "" if claim.tolerance is None else f", |Δ| {abs(delta) / full.auc:.2%} of full (tolerance {claim.tolerance:.1%})"
        return Check(row.ratio, HOLDS if same else FAILS,
                     f"`{claim.method}` {measured(row)} vs `full` {measured(full)}: {text}{tol}")
    return against_full(claim, grid, judge)


def rule_loss_within(claim: Claim, grid: Grid) -> List[Check]:
    def judge(row: Row, full: Row) -> Check:
        delta, p, text = compare(row, full)
        loss = -delta / full.auc
        text = f"`{claim.method}` {measured(row)} vs `full` {measured(full)}: {text}, loss {loss:.2%}"
        if loss <= claim.tolerance:
            return Check(row.ratio, HOLDS, text)
        if not math.isnan(p) and p < ALPHA:
            return Check(row.ratio, FAILS, text)
        return Check(row.ratio, UNTESTABLE, text, f"the mean loss exceeds {claim.tolerance:.1%} but is not "
                     f"distinguishable from `full` across the seeds (Welch p ≥ {ALPHA:g})")
    return against_full(claim, grid, judge)


def versus(grid: Grid, method: str, base: str, ratio: float) -> Check:
    """Whether ``method`` beats ``base`` at ``ratio`` (``beats``), or why that cannot be tested."""
    why = missing(grid, method, ratio) or missing(grid, base, ratio)
    if why:
        return Check(ratio, UNTESTABLE, "—", why)
    a, b = grid.row(method, ratio), grid.row(base, ratio)
    _, _, text = compare(a, b)
    return Check(ratio, HOLDS if beats(a, b) else FAILS, f"`{method}` {measured(a)} vs `{base}` {measured(b)}: {text}")


def rule_beats(claim: Claim, grid: Grid) -> List[Check]:
    return [versus(grid, claim.method, base, ratio) for ratio in claim.budgets for base in claim.baselines]


def rule_best_or_tied(claim: Claim, grid: Grid) -> List[Check]:
    out = []
    for ratio in claim.budgets:
        why = missing(grid, claim.method, ratio)
        if why:
            out.append(Check(ratio, UNTESTABLE, "—", why))
            continue
        row = grid.row(claim.method, ratio)
        best = next(r for r in grid.rows if r.ratio == ratio and r.best)
        standing = "the best mean" if row.best else f"rank {row.rank}, vs best `{best.label}` {measured(best)}: " \
                                                     f"{p_text(row.p_best)}"
        out.append(Check(ratio, HOLDS if row.best or row.near_best else FAILS,
                         f"`{claim.method}` {measured(row)}: {standing}"))
    return out


def rule_pareto_better(claim: Claim, grid: Grid) -> List[Check]:
    (base,) = claim.baselines
    points, skipped = [], []
    for ratio in claim.budgets:
        why = missing(grid, claim.method, ratio) or missing(grid, base, ratio)
        if why:
            skipped.append(f"{fmt_budget(ratio)}: {why}")
        else:
            points.append((ratio, grid.row(claim.method, ratio), grid.row(base, ratio)))
    if not points:
        return [Check(None, UNTESTABLE, "—", "; ".join(skipped))]
    worse = [r for r, a, b in points if beats(b, a)]
    better = [r for r, a, b in points if beats(a, b)]
    text = "; ".join(f"{fmt_budget(r)}: {a.auc:.4f} vs {b.auc:.4f} ({p_text(welch_p(a, b))})" for r, a, b in points)
    verdict = HOLDS if better and not worse else FAILS
    summary = (f"`{claim.method}` beats `{base}` at {len(better)} of {len(points)} budgets, `{base}` beats it at "
               f"{len(worse)}: {text}")
    return [Check(None, verdict, summary, "; ".join(skipped))]


def smallest_feasible(grid: Grid, method: str) -> Optional[float]:
    ratios = [r.ratio for r in grid.rows if r.method == method and r.finished]
    return min(ratios) if ratios else None


def rule_reaches_below(claim: Claim, grid: Grid) -> List[Check]:
    """``method`` finishes at a grid budget below the smallest budget each of ``baselines[:-1]`` finishes at
    (its reach), and beats ``baselines[-1]`` (the AUC baseline) at every such budget."""
    *limited, auc_base = claim.baselines
    reach = {m: smallest_feasible(grid, m) for m in (claim.method, *limited)}
    reach_text = "finishes down to " + ", ".join(
        f"`{m}` {fmt_budget(v) if v else 'no budget (infeasible at every one)'}" for m, v in reach.items())
    limits = [reach[m] for m in limited if reach[m] is not None]
    below = [r for r in claim.budgets if not limits or r < min(limits)]
    if not below:
        return [Check(None, UNTESTABLE, reach_text, "no grid budget lies below the baselines' reach")]
    reached = reach[claim.method] is not None and reach[claim.method] in below
    return [Check(None, HOLDS if reached else FAILS, reach_text),
            *(versus(grid, claim.method, auc_base, ratio) for ratio in below)]


def gate_rows(records: Sequence[Dict[str, Any]], local_search: bool) -> Dict[str, Row]:
    """Per MoE gate (param ``gate.name``): its row over the records of ``method=full`` runs with local search
    ``local_search`` (several configurations of one gate: the one with most seeds)."""
    picked = []
    for r in records:
        params = r.get("params") or {}
        enabled = str(params.get("gate.local_search.enabled", "false")).lower() == "true"
        if params.get("gate.name") and r.get("method") == REFERENCE_METHOD and enabled == local_search:
            picked.append({**r, "method": params["gate.name"], "protocol": f"{r.get('dataset_protocol_id', '')}/moe"})
    best: Dict[str, Row] = {}
    for row in aggregate(picked):
        if row.finished and (row.method not in best or row.seeds > best[row.method].seeds):
            best[row.method] = row
    return best


def rule_gate_beats(claim: Claim, grid: Grid) -> List[Check]:
    rows = gate_rows(grid.records, local_search=claim.method.endswith("+ls"))
    gate = claim.method.removesuffix("+ls")
    out = []
    for base in claim.baselines:
        if gate not in rows or base not in rows:
            absent = [g for g in (gate, base) if g not in rows]
            out.append(Check(None, UNTESTABLE, "—", f"no finished MoE run of gate(s) {', '.join(absent)} "
                                                    "(records with param `gate.name`, method full) in the records"))
            continue
        a, b = rows[gate], rows[base]
        _, _, text = compare(a, b)
        out.append(Check(None, HOLDS if beats(a, b) else FAILS,
                         f"`{gate}` {measured(a)} vs `{base}` {measured(b)}: {text}, "
                         f"{(a.auc - b.auc) / b.auc:+.2%} relative"))
    return out


def rule_not_testable(claim: Claim, grid: Grid) -> List[Check]:
    """A claim no record here can test (``claim.mapping`` says why)."""
    return [Check(None, UNTESTABLE, "—", claim.mapping)]


def rule_winners(claim: Claim, grid: Grid) -> List[Check]:
    """A claim about which method wins where, whose paper findings the stored sources lack (``claim.mapping``):
    not testable, with the grid's best mean per budget shown for the re-check."""
    winners = [f"{fmt_budget(r.ratio)}: `{r.label}` {fmt_auc(r)}" for r in grid.rows if r.best and r.ratio < 1]
    return [Check(None, UNTESTABLE, "best mean per budget: " + "; ".join(winners), claim.mapping)]


#: rule name -> (function, the rule as printed in claims.md)
RULES: Dict[str, Tuple[Callable[[Claim, Grid], List[Check]], str]] = {
    "same_as_full": (rule_same_as_full,
                     f"the method's row is not distinguishable from `full` (ratio 1) by the Welch test (p ≥ {ALPHA:g}) "
                     "AND |Δ mean AUC| ≤ the tolerance x full's AUC; else does not hold"),
    "loss_within": (rule_loss_within,
                    "holds if the mean AUC loss against `full` is at most the tolerance (relative); does not hold "
                    f"if it is larger and the Welch test distinguishes the two (p < {ALPHA:g}); else not testable "
                    "(seed noise larger than the tolerance)"),
    "beats": (rule_beats, f"holds if the method's mean AUC is higher than the baseline's at the same budget AND the "
                          f"Welch test distinguishes them (p < {ALPHA:g}); else does not hold"),
    "best_or_tied": (rule_best_or_tied,
                     "holds if the method has the budget's best mean AUC or is not distinguishable from it (the "
                     f"leaderboard's ≈ best: Welch p ≥ {ALPHA:g}, checked down the ranking); else does not hold"),
    "pareto_better": (rule_pareto_better,
                      "at the same requested budgets (both at most the budget's bytes), the method beats the baseline "
                      "(rule `beats`) at one budget or more and the baseline beats it at none; else does not hold"),
    "reaches_below": (rule_reaches_below,
                      "below the smallest grid budget each limited baseline finishes at (its reach), the method "
                      "finishes at some budget, and beats the AUC baseline (rule `beats`) at every such budget; not "
                      "testable at a budget where it or the AUC baseline is infeasible"),
    "gate_beats": (rule_gate_beats,
                   "MoE runs (param `gate.name`, `method=full`): the gate's row beats each baseline gate's (rule "
                   "`beats`)"),
    "not_testable": (rule_not_testable, "not testable with these records (the claim's note says why)"),
    "winners": (rule_winners, "not testable while the paper's per-budget findings are not in the stored sources; the "
                              "grid's best mean per budget is shown"),
}


def overall(checks: Sequence[Check]) -> str:
    tested = [c for c in checks if c.verdict != UNTESTABLE]
    if not tested:
        return UNTESTABLE
    return FAILS if any(c.verdict == FAILS for c in tested) else HOLDS


# --- the claims -----------------------------------------------------------------------------------

_MDE = "https://paperswithcode.com/paper/mixed-dimension-embeddings-with-application"
_QR = "https://ar5iv.labs.arxiv.org/html/1909.02107"
_UE = "http://papers.nips.cc/paper_files/paper/2023/hash/afcac2e300bc243d15c25cd4f4040f0d-Abstract-Conference.html"
_CAFE = "https://www.researchtrend.ai/papers/2312.03256"
_TT = "https://proceedings.mlsys.org/paper/2021/hash/979d472a84804b9f647bc185a877a8b5-Abstract.html"
_ROBE = "https://paperswithcode.com/paper/random-offset-block-embedding-array-robe-for"
_OPT = "https://ar5iv.labs.arxiv.org/html/2208.04482"
_DSL = "https://d6108366.hf-mirror.com/papers/2402.02855.md"
_COMET = "https://latex-in-arxiv.com/print?f=513e8f284413c47a.tex&q=convergence+%28r%3Aabstract+or+r%3Amath%29&r=abstract"
_LERS = "https://zhuanzhi.ai/paper/600d3203dd65a241c00efed046e981be"
_VLDB = "https://paperswithcode.com/paper/experimental-analysis-of-large-scale"

CLAIMS: Tuple[Claim, ...] = (
    Claim("mde", "MDE (`mixed_dim`) keeps full's AUC with 16x fewer parameters",
          "Ginart et al., Mixed Dimension Embeddings with Application to Memory-Efficient Recommendation Systems, ISIT 2021",
          "\"improve accuracy by 0.1% using half as many parameters or maintain it using 16X fewer parameters\"",
          "Criteo Kaggle, click-through rate prediction (DLRM)", _MDE, "same_as_full", "mixed_dim",
          budgets=(0.05,), tolerance=0.001,
          mapping="16x is ratio 0.0625; the grid's nearest budget (in log ratio) is 0.05 (20x). Tolerance 0.1%: the "
                  "smallest accuracy change the abstract reports (its own resolution); \"maintain\" = within it."),
    Claim("qr", "QR (`qr`) beats hashing (`hashing`) at equal memory",
          "Shi et al., Compositional Embeddings Using Complementary Partitions for Memory-Efficient Recommendation Systems, KDD 2020",
          "\"Our experimental results demonstrate the effectiveness of our approach over the hashing trick for reducing "
          "the size of the embedding tables in terms of model loss and accuracy, while retaining a similar reduction in "
          "the number of parameters\" (number not found in the stored sources)",
          "Criteo Kaggle, DLRM and DCN", _QR, "beats", "qr", baselines=("hashing",),
          mapping="checked at every grid budget (equal requested memory)."),
    Claim("unified", "Unified Embedding (`unified`) is Pareto-better than per-field hashing (`hashing`)",
          "Coleman et al., Unified Embedding: Battle-Tested Feature Representations for Web-Scale ML Systems, NeurIPS 2023",
          "\"multiplexed representations give Pareto-optimal space-accuracy tradeoffs for three public benchmark "
          "datasets\" (number not found in the stored sources)",
          "three public benchmark datasets (the abstract does not name them)", _UE, "pareto_better", "unified",
          baselines=("hashing",),
          mapping="one check over every grid budget both methods finish at (AUC vs bytes at equal requested budget)."),
    Claim("cafe", "CAFE (`cafe`) reaches budgets QR and MDE cannot, with better AUC than hashing there",
          "Zhang et al., CAFE: Towards Compact, Adaptive, and Fast Embedding for Large-scale Recommendation Models, SIGMOD 2024",
          "\"3.92% and 3.68% superior testing AUC on Criteo Kaggle dataset and CriteoTB dataset at a compression ratio "
          "of 10000x\"; where QR and MDE stop (the issue's 200x and 10x): number not found in the stored sources",
          "Criteo Kaggle and CriteoTB, DLRM, 10000x", _CAFE, "reaches_below", "cafe",
          baselines=("qr", "mixed_dim", "hashing"),
          mapping="the limited baselines are `qr` and `mixed_dim` (the budget solver's reach on each dataset); the "
                  "AUC baseline is `hashing`. The grid's smallest budget is 1000x, not the paper's 10000x."),
    Claim("tt_rec", "TT-Rec (`tt_rec`) within 0.3% AUC of `full` at large compression",
          "Yin et al., TT-Rec: Tensor Train Compression for Deep Learning Recommendation Models, MLSys 2021",
          "\"TT-Rec compresses the model size by 4x to 221x for Kaggle, with 0.03% to 0.3% loss of accuracy "
          "correspondingly\"",
          "Criteo Kaggle (and Terabyte), MLPerf-DLRM, accuracy", _TT, "loss_within", "tt_rec",
          budgets=(0.2, 0.1, 0.05, 0.01), tolerance=0.003,
          mapping="the grid's budgets inside the paper's 4x-221x range (5x, 10x, 20x, 100x); the paper's accuracy "
                  "loss bound (0.3%) applied to test AUC, relative to `full`."),
    Claim("robe", "ROBE (`robe`) keeps full's AUC at 1000x",
          "Desai, Chou, Shrivastava, Random Offset Block Embedding Array (ROBE) for CriteoTB Benchmark MLPerf DLRM "
          "Model: 1000x Compression and 3.1x Faster Inference, MLSys 2022",
          "\"we can successfully train DLRM models with same accuracy while using 1000x less memory ... ROBE array of "
          "size 100MB ... AUC of 0.8025 or higher as required by official MLPerf CriteoTB benchmark DLRM model of 100GB\"",
          "CriteoTB, MLPerf DLRM (100 GB of embeddings -> 100 MB)", _ROBE, "same_as_full", "robe", budgets=(0.001,),
          mapping="ratio 0.001. The paper gives no tolerance beyond the MLPerf target, so the rule is the Welch test "
                  "alone. Its compressed array is 100 MB; at 1000x the grid's arrays are 200 B (MovieLens-100K) and "
                  "14.5 kB (synthetic)."),
    Claim("optembed", "OptEmbed's row pruning + dimension search (`optembed`) beats plain pruning (`pep`)",
          "Lyu et al., OptEmbed: Learning Optimal Embedding Table for Click-through Rate Prediction, CIKM 2022",
          "\"pruning embedding parameters will lead to a sparse embedding table, which is hard to be deployed ... "
          "OptEmbed can learn a compact embedding table which can further improve the model performance\" (number not "
          "found in the stored sources)",
          "public CTR datasets (Criteo, Avazu, KDD12 in the paper)", _OPT, "beats", "optembed", baselines=("pep",),
          mapping="`pep` is the fair plain pruning: like OptEmbed's first stage it learns its pruning thresholds "
                  "during training (`recbench/cards/pep.md`), and it is the element-wise parameter pruning the "
                  "abstract argues against; OptEmbed adds the dimension search and retrains on a dense row subset "
                  "(`recbench/cards/optembed.md`). `magnitude` (post-hoc) and `freq_prune` (rows by count, not "
                  "learned) are not in these records; the v2 grid adds them."),
    Claim("dsl", "DSL (`dsl`) at fixed density beats post-hoc pruning (`magnitude`)",
          "Wang et al., Dynamic Sparse Learning: A Novel Paradigm for Efficient Recommendation, WSDM 2024",
          "\"DSL innovatively trains a lightweight sparse model from scratch ... ensures a consistent and minimal "
          "parameter budget throughout the full learning lifecycle\"; \"significantly reducing training and inference "
          "costs while delivering comparable recommendation performance\" (number not found in the stored sources)",
          "MultVAE, NeuMF, LightGCN on public recommendation datasets", _DSL, "beats", "dsl", baselines=("magnitude",),
          mapping="`magnitude` (one-shot pruning of the trained table, then fine-tuning) is the post-hoc pruning.",
          retest="the v2 reference grids (`make sweep-movielens100k`, `make sweep-synthetic`), which include `magnitude`"),
    Claim("comet", "COMET (`comet` gate) beats Hash and Top-k gates (up to +13% AUC)",
          "Ibrahim et al., COMET: Learning Cardinality Constrained Mixture of Experts with Trees and Local Search, KDD 2023",
          "\"COMET+ (COMET with local search) achieves up to 13% improvement in ROC AUC over popular gates, e.g., Hash "
          "routing and Top-k, and up to 9% over prior differentiable gates e.g., DSelect-k\"",
          "standard vision and recommender-system benchmarks (MovieLens among them), sparse MoE", _COMET,
          "gate_beats", "comet", baselines=("hash", "topk"),
          mapping="MoE runs (`model=dcn_moe`, `method=full`), local search off; the relative AUC gain is shown beside "
                  "the paper's \"up to 13%\".",
          retest="`recbench-sweep moe_gates_movielens100k` and `recbench-sweep moe_gates_synthetic` with `--export` "
                 "into committed records (the gate tables of `recbench/gates/README.md` came from stores that were "
                 "not exported)"),
    Claim("comet_ls", "Local search cuts the tuning budget of Top-k and Hash gates",
          "Ibrahim et al., COMET, KDD 2023",
          "\"When Top-k and Hash gates are combined with local search, we see up to 100x reduction in the budget "
          "needed for hyperparameter tuning\"",
          "standard vision and recommender-system benchmarks, sparse MoE", _COMET, "not_testable", "topk",
          mapping="a tuning-cost claim: it needs the random-search tuning runs of each gate with and without local "
                  "search (`recbench-sweep moe_gates_tuning_movielens100k`, 15 trials per gate, run once with "
                  "`gate.local_search.enabled=true`) and the trials-to-best-validation-AUC curve of each; the "
                  "leaderboard grids hold no MoE run."),
    Claim("lers", "LERS: magnitude pruning (`magnitude`) beats the complex methods",
          "Tran et al., A Thorough Performance Benchmarking on Lightweight Embedding-based Recommender Systems, ACM TOIS",
          "\"we propose an efficient embedding compression method using magnitude pruning, which is an easy-to-deploy "
          "yet highly competitive baseline that outperforms various complex LERSs\" (number not found in the stored "
          "sources)",
          "collaborative filtering and content-based (CTR) tasks, two datasets each", _LERS, "best_or_tied", "magnitude",
          mapping="\"beats the complex methods\" = best or ≈ best of its budget on the leaderboard (every other "
                  "method of the grid).",
          retest="the v2 reference grids (`make sweep-movielens100k`, `make sweep-synthetic`), which include `magnitude`"),
    Claim("vldb2024", "VLDB 2024 benchmark: which method family wins at which ratio",
          "Zhang et al., Experimental Analysis of Large-scale Learnable Vector Storage Compression, VLDB 2024 "
          "(Hetu EmbeddingMemoryCompression artifact)",
          "\"our benchmark fairly evaluates each approach, presents their strengths and weaknesses under different "
          "memory budgets, and recommends the best method based on the use case\"; the per-ratio findings: number not "
          "found in the stored sources",
          "Avazu, Criteo, CompanyX (DLRMs) and retrieval-augmented LLMs, 14 methods", _VLDB, "winners", "",
          mapping="the stored sources hold the abstract only, not the paper's per-ratio recommendations, so there is "
                  "nothing to compare the grid's winners with; the measured winner of each budget is shown."),
)


# --- building the table -------------------------------------------------------------------------

def is_gate_run(record: Dict[str, Any]) -> bool:
    return bool((record.get("params") or {}).get("gate.name"))


def grids(records: Sequence[Dict[str, Any]]) -> List[Grid]:
    """Per dataset name: the leaderboard rows of its main protocol (the one with most finished runs; MoE
    runs, which carry their gate in their protocol, are kept for the gate claims only)."""
    out = []
    for dataset in sorted({r.get("dataset", "") for r in records}):
        mine = [r for r in records if r.get("dataset", "") == dataset]
        rows = aggregate([r for r in mine if not is_gate_run(r)])
        main = protocols(rows)[0] if rows else ""
        out.append(Grid(dataset, main, [r for r in rows if r.protocol == main], mine))
    return out


def evaluate(claim: Claim, grid: Grid) -> List[Check]:
    return RULES[claim.rule][0](claim, grid)


def verdict_text(checks: Sequence[Check]) -> str:
    verdict = overall(checks)
    counts = Counter(c.verdict for c in checks)
    if len(checks) > 1:
        parts = ", ".join(f"{counts[v]} {v}" for v in (HOLDS, FAILS, UNTESTABLE) if counts[v])
        return f"**{verdict}** ({parts})"
    return f"**{verdict}**"


def check_text(check: Check) -> str:
    head = f"{fmt_budget(check.ratio)}: " if check.ratio is not None else ""
    body = "" if check.measured == "—" else check.measured
    if check.verdict == UNTESTABLE:
        tail = f" *{check.verdict}*: {check.reason}"
    else:
        tail = f" *{check.verdict}*" + (f" (not tested: {check.reason})" if check.reason else "")
    return md(f"{head}{body}{' —' if body else ''}{tail}".strip(), code=True)


def source_lines(records_text: str, found: Sequence[Grid]) -> List[str]:
    lines = [f"Built from {records_text}:"]
    for grid in found:
        main = [r for r in grid.records if r.get("protocol") == grid.protocol]
        statuses = Counter(r.get("status") or r.get("run_status", "?") for r in main)
        sweeps = Counter(r.get("sweep_id") or "not recorded" for r in main)
        commits = Counter(r.get("git_commit") or "not recorded" for r in main)
        other = len(grid.records) - len(main)
        lines.append(
            f"- `{grid.dataset}`: protocol `{grid.protocol}`, {len(main)} runs "
            f"({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}); sweeps "
            f"{'; '.join(f'`{s}` ({n})' for s, n in sweeps.most_common())}; code "
            f"{'; '.join(f'`{c}` ({n})' for c, n in commits.most_common())}"
            + (f"; {other} runs of other protocols (MoE gates are read by the gate claims only)" if other else ""))
    return lines


def markdown(records: Sequence[Dict[str, Any]], records_text: str, command: str) -> str:
    """The whole claims.md (``ValueError`` when there is no record)."""
    if not records:
        raise ValueError(f"no run records in {records_text}")
    found = grids(records)
    sources: Dict[str, int] = {}
    for claim in CLAIMS:
        sources.setdefault(claim.source, len(sources) + 1)
    out = ["# Paper claims against recbench's measurements", "",
           f"Generated by `{command}` (`make claims`). No timestamps: the same records give the same file.", ""]
    out += source_lines(records_text, found)
    out += ["", "**These are the v1 reference grids.** The v2 re-run of the reference grids (issue #26) will rebuild "
            "this file with `make claims` from its exported records; until then, claims about methods the v1 grids "
            "did not run (`magnitude`, `freq_prune`, the MoE gates) are not testable here.", "",
            "## Verdict rules", "",
            f"Numbers are test AUC, mean ± sample std over seeds (n = seeds), per protocol, method and requested "
            f"budget (`recbench.reporting.leaderboard`); Δ is the difference of the means; Welch p is the two-sided "
            f"Welch t-test across seeds (the leaderboard's test, α = {ALPHA:g}). Infeasible budgets carry the budget "
            "solver's reason; under-budget rows show their achieved ratio. A claim checked at several budgets holds "
            "when it holds at every budget that could be tested and does not hold when it fails at any.", ""]
    out += [f"- `{name}`: {text}" for name, (_, text) in RULES.items()]
    out += ["", "## Claims", "",
            "| claim | paper's number (setting) | dataset | recbench measured | verdict |", "|---|---|---|---|---|"]
    details = []
    for claim in CLAIMS:
        for i, grid in enumerate(found):
            checks = evaluate(claim, grid)
            cell = "<br>".join(check_text(c) for c in checks)
            paper = f"{md(claim.quote)} ({md(claim.setting)}) [{sources[claim.source]}]" if i == 0 else "(as above)"
            out.append(f"| {md(claim.claim, code=True)} | {paper} | {grid.dataset} | {cell} | {verdict_text(checks)} |")
        details.append(f"- **{md(claim.claim, code=True)}** — {md(claim.paper)}. Rule `{claim.rule}`"
                       + (f", tolerance {claim.tolerance:.1%}" if claim.tolerance is not None else "")
                       + f". {claim.mapping}" + (f" Run that tests it: {claim.retest}." if claim.retest else ""))
    out += ["", "## How each claim maps onto the grid", ""] + details
    out += ["", "## Sources", ""]
    out += [f"{n}. <{url}>" for url, n in sources.items()]
    return "\n".join(out) + "\n"


def from_records(paths: Sequence[Path], out: Path) -> str:
    """claims.md from exported record files, its header naming them and the command (``--out out``)."""
    records = []
    for path in paths:
        try:
            loaded = load_records(path)
        except OSError as exc:
            raise OSError(f"{path}: cannot read the records ({exc.strerror or exc})") from exc
        except ValueError as exc:
            raise ValueError(f"{path}: not a JSON records file ({exc}); allowed: the output of "
                             "recbench-report --export or recbench-sweep --export") from exc
        if not isinstance(loaded, list):
            raise ValueError(f"{path}: a JSON {type(loaded).__name__}, not a list of run records; allowed: the output "
                             "of recbench-report --export or recbench-sweep --export")
        records += loaded
    command = shlex.join(["python", "-m", "recbench.reporting.claims", "--records", *map(str, paths), "--out", str(out)])
    return markdown(records, ", ".join(f"`{p}`" for p in paths), command)


def from_store(tracking_uri: str, out: Path) -> str:
    """claims.md from every run of an MLflow store."""
    command = shlex.join(["python", "-m", "recbench.reporting.claims", "--tracking-uri", tracking_uri, "--out", str(out)])
    return markdown(load_mlflow_runs(tracking_uri), f"the MLflow store `{tracking_uri}`", command)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recbench.reporting.claims",
                                     description="reports/claims.md: the seed papers' headline claims against "
                                                 "recbench's runs (exported records or an MLflow store).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--records", type=Path, nargs="+", help="exported JSON records (recbench-report --export)")
    source.add_argument("--tracking-uri", help="read the runs from this MLflow store instead")
    parser.add_argument("--out", type=Path, default=Path("reports/claims.md"), help="default: reports/claims.md")
    args = parser.parse_args(argv)
    try:
        text = from_records(args.records, args.out) if args.records else from_store(args.tracking_uri, args.out)
    except (OSError, ValueError) as exc:  # a missing or unreadable records file, not JSON, no run at all
        print(f"claims: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(text)
    print(f"claims: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
