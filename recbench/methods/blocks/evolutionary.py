"""Evolutionary search over per-field embedding dims (OptEmbed's stage 2), without gradients.

A candidate is one dim per field in [1, dim_cap]. The first population is ``mutation_num +
crossover_num`` uniformly random candidates; each iteration scores the population (``score``:
candidate -> validation AUC of the supernet; a candidate scored before is not scored again),
keeps the ``top_k`` best candidates seen so far, and builds the next population from them:
``mutation_num`` mutants (a uniformly chosen top candidate, each field redrawn uniformly in
[1, dim_cap] with probability ``mutation_prob``) and ``crossover_num`` children (two distinct
top candidates, each field inherited from either with probability 1/2). The result is the best
candidate ever scored, so the search never loses its best.

References: Lyu, Tang, Guo, Zhang, He, Liu, Li, "OptEmbed: Learning Optimal Embedding Table for
Click-through Rate Prediction", CIKM 2022 (Algorithm 1, section 3.4); reference code
github.com/fuyuanlyu/OptEmbed (evolution.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import numpy as np

Candidate = Tuple[int, ...]


@dataclass
class SearchResult:
    best: Candidate
    best_score: float
    scores: Dict[Candidate, float]
    #: best score after each iteration (non-decreasing)
    trajectory: List[float] = field(default_factory=list)


def _check(num_fields: int, dim_cap: int, mutation_num: int, crossover_num: int, mutation_prob: float,
           iterations: int, top_k: int) -> None:
    problems = []
    if num_fields < 1:
        problems.append(f"num_fields={num_fields} (needs >= 1)")
    if dim_cap < 1:
        problems.append(f"dim_cap={dim_cap} (needs >= 1)")
    if mutation_num < 0 or crossover_num < 0 or mutation_num + crossover_num < 1:
        problems.append(f"mutation_num={mutation_num}, crossover_num={crossover_num} (>= 0, sum >= 1)")
    if not 0.0 < mutation_prob <= 1.0:
        problems.append(f"mutation_prob={mutation_prob} (needs (0, 1])")
    if iterations < 1:
        problems.append(f"iterations={iterations} (needs >= 1)")
    if top_k < 1:
        problems.append(f"top_k={top_k} (needs >= 1)")
    if problems:
        raise ValueError("evolutionary search: " + "; ".join(problems))


def evolutionary_search(score: Callable[[Candidate], float], num_fields: int, dim_cap: int, *,
                        mutation_num: int = 10, crossover_num: int = 10, mutation_prob: float = 0.1,
                        iterations: int = 30, top_k: int = 15, seed: int = 0) -> SearchResult:
    """Maximise ``score`` over candidates in [1, dim_cap]^num_fields (see the module docstring)."""
    _check(num_fields, dim_cap, mutation_num, crossover_num, mutation_prob, iterations, top_k)
    rng = np.random.default_rng(seed)

    def random_candidate() -> Candidate:
        return tuple(int(d) for d in rng.integers(1, dim_cap + 1, num_fields))

    population = [random_candidate() for _ in range(mutation_num + crossover_num)]
    scores: Dict[Candidate, float] = {}
    trajectory: List[float] = []
    top: List[Candidate] = []
    for _ in range(iterations):
        for candidate in population:
            if candidate not in scores:
                scores[candidate] = float(score(candidate))
        # best first; ties: the candidate scored first (dict order) stays ahead
        top = sorted(scores, key=lambda c: -scores[c])[:top_k]
        trajectory.append(scores[top[0]])
        mutants = []
        for _ in range(mutation_num):
            parent = np.array(top[rng.integers(len(top))])
            redraw = rng.random(num_fields) < mutation_prob
            parent[redraw] = rng.integers(1, dim_cap + 1, int(redraw.sum()))
            mutants.append(tuple(int(d) for d in parent))
        children = []
        for _ in range(crossover_num):
            if len(top) < 2:
                children.append(random_candidate())
                continue
            a, b = rng.choice(len(top), 2, replace=False)
            pick = rng.random(num_fields) < 0.5
            children.append(tuple(int(x if p else y) for x, y, p in zip(top[a], top[b], pick)))
        population = mutants + children
    return SearchResult(top[0], scores[top[0]], scores, trajectory)
