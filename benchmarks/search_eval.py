"""Search-stage evaluation with and without the evaluation cache (``recbench.training.search_cache``).

OptEmbed's evolutionary search scores up to 600 candidates (30 iterations x 20), each a whole
validation evaluation with every parameter frozen; only the per-field dims (and the rows the budget
affords at them) change between candidates. The cache computes what no candidate changes once: the
batches (BatchIterator, KJT construction), the dense arch output of every batch and the embedding
rows at the full dim; each candidate then runs the masks, the interaction and the over-arch.
Side by side in one process, on the same supernet state and the same candidates:

- ``<dataset>_candidate``: one candidate's evaluation, ``SearchEvaluation.evaluate`` (cached)
  vs ``Trainer.evaluate`` (what every candidate ran before); each round scores a new random
  candidate on both sides, and their AUCs are compared (table ``scores``: equal to 1e-6 or the
  run fails). The first cached call (which builds the memos) is the warm-up and is reported
  separately (``notes``).
- ``<stage dataset>_search_stage``: OptEmbed's whole search stage (``run_search``, paper settings
  except ``--stage-iterations``) with ``trainer.search_cache_mb`` at its default vs 0 (uncached),
  memo building included; both must return the same dims and kept rows.
- table ``fit_rows``: choosing the kept rows for a new candidate with the ranking cached per
  supernet state vs the argsort over all R rows at every candidate (the code before).

The supernet is untrained (its state is built from the seed and perturbed so rows and thresholds
spread out): the cost of an evaluation does not depend on the weights' values.

    python benchmarks/search_eval.py                    # synthetic (val: 10^5 rows), stage on movielens100k
    python benchmarks/search_eval.py --quick            # movielens100k only, 2 rounds

References: recbench.training.search_cache, recbench.methods.optembed; Lyu et al., CIKM 2022.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from recbench.runs.config import compose

from recbench.bench import harness
from recbench.runs.settings import instantiate_without, settings_of
from recbench.methods.blocks import row_subset
from recbench.training.trainer import TrainContext, Trainer


def optembed_trainer(data_root: Path, dataset: str, ratio: float, overrides=(), **method_settings):
    """A Trainer over a fresh OptEmbed supernet in the protocol's model (DCNv2 by default)."""
    cfg = compose(["method=optembed", f"dataset={dataset}", "tracking=memory",
                   f"budget.compression_ratio={ratio}", *overrides])
    prepared = instantiate_without(cfg.dataset).prepare(Path(data_root))
    budget, embedding_optimizer, dense_optimizer, trainer_config, _ = settings_of(cfg)
    method = instantiate_without(cfg.method, drop=(), **method_settings)
    torch.manual_seed(0)
    tables = list(prepared.spec.tables)
    dim = int(cfg.model.embedding_dim)
    embedding = method.build(tables, dim, method.solve(tables, dim, budget, embedding_optimizer), embedding_optimizer)
    model = instantiate_without(cfg.model, embedding=embedding, num_dense=prepared.spec.num_dense,
                                num_sparse=len(tables))
    with torch.no_grad():  # spread rows and thresholds out, as after training
        embedding.weight.mul_(1 + torch.rand_like(embedding.weight))
        embedding.thresholds.add_(torch.rand_like(embedding.thresholds) * embedding.row_scores().mean())
    return Trainer(trainer_config, model, method, prepared, dense_optimizer, embedding_optimizer), method


def random_candidates(module, count: int, seed: int):
    rng = np.random.default_rng(seed)
    return [tuple(int(d) for d in rng.integers(1, module.dim_cap + 1, len(module.compressed_sizes)))
            for _ in range(count)]


def speedup(name, description, seconds, labels, unit, target) -> harness.Figure:
    """uncached / cached time of ``seconds`` ({"cached": [...], "uncached": [...]})."""
    return harness.Figure(name, description, harness.Side(labels[0], seconds["cached"], unit),
                          harness.Side(labels[1], seconds["uncached"], unit), ratio_of="reference/candidate",
                          target=target)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/search_eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=harness.REPO / "datasets")
    parser.add_argument("--dataset", default="synthetic", help="protocol of the per-candidate figure")
    parser.add_argument("--stage-dataset", default="movielens100k", help="protocol of the whole-stage figure")
    parser.add_argument("--ratio", type=float, default=0.1, help="budget.compression_ratio")
    parser.add_argument("--stage-iterations", type=int, default=5, help="search_iterations of the whole-stage figure")
    parser.add_argument("--stage-rounds", type=int, default=2, help="rounds of the whole-stage figure")
    harness.add_common_arguments(parser, rounds=5, warmup=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.dataset, args.rounds, args.stage_iterations, args.stage_rounds = "movielens100k", 2, 2, 1
    clock = harness.setup(args)
    result = harness.BenchResult.start("search_eval", argv, args)

    # ---- one candidate's evaluation: cached vs Trainer.evaluate
    trainer, _ = optembed_trainer(args.data_root, args.dataset, args.ratio)
    module = trainer.model.embedding
    candidates = iter(random_candidates(module, args.rounds + args.warmup + 1, seed=1))
    scores = []
    evaluation = trainer.search_evaluation("val")
    start = clock()
    module.candidate = next(candidates)
    evaluation.evaluate()  # builds the memos
    build_seconds = clock() - start
    if not evaluation.cached:
        raise RuntimeError(f"the cache did not run: {evaluation.reason}")
    pending = {}

    def cached():
        if "uncached" not in pending:  # each round scores a new candidate on both sides
            module.candidate = pending["candidate"] = next(candidates)
        pending["cached"] = evaluation.evaluate()["auc"]
        settle()

    def uncached():
        if "cached" not in pending:
            module.candidate = pending["candidate"] = next(candidates)
        pending["uncached"] = trainer.evaluate("val")["auc"]
        settle()

    def settle():
        if "cached" in pending and "uncached" in pending:
            difference = abs(pending["cached"] - pending["uncached"])
            scores.append({"candidate": " ".join(map(str, pending["candidate"])), "cached auc": pending["cached"],
                           "uncached auc": pending["uncached"], "abs difference": difference})
            if difference > 1e-6:
                raise RuntimeError(f"cached and uncached AUC differ by {difference:.3g}: {scores[-1]}")
            pending.clear()

    seconds = harness.interleaved({"cached": cached, "uncached": uncached}, args.rounds, args.warmup, clock=clock)
    rows = len(trainer.split("val"))
    result.add(speedup(f"{args.dataset}_candidate",
                       f"one OptEmbed search candidate's validation evaluation ({rows:,} rows, {trainer.model.name}, "
                       f"ratio {args.ratio:g}, {len(module.compressed_sizes)} compressed fields, dim cap "
                       f"{module.dim_cap}): Trainer.evaluate / SearchEvaluation.evaluate (cached batches, dense "
                       "outputs and full-dim rows).", seconds, ("cached (search_evaluation)", "uncached (Trainer.evaluate)"),
                       "s per candidate", ">= 1.2"))
    result.tables["scores"] = scores
    result.notes.append(f"{args.dataset}: memos of the val split {evaluation.bytes / 2 ** 20:.1f} MB "
                        f"(cap {trainer.config.search_cache_mb:g} MB); the first cached evaluation, which builds them, "
                        f"took {build_seconds:.2f} s; max |AUC cached - uncached| over "
                        f"{len(scores)} candidates: {max(s['abs difference'] for s in scores):.2g}")

    # ---- choosing the kept rows for a new candidate: ranking cached vs argsort each time
    fit = {}
    keep_candidates = random_candidates(module, 20, seed=2)
    dims_of = [torch.tensor(c)[module.row_field] for c in keep_candidates]
    scores_now = module.row_scores()
    ranking = row_subset.rank_rows(scores_now)
    fields = len(module.compressed_sizes)
    fit = harness.interleaved({
        "ranking cached": lambda: [row_subset.fit_rows(scores_now, d, module.row_budget, fields, ranking=ranking)
                                   for d in dims_of],
        "argsort per candidate": lambda: [row_subset.fit_rows(scores_now, d, module.row_budget, fields)
                                          for d in dims_of]}, args.rounds, args.warmup, clock=clock)
    result.tables["fit_rows"] = [{"rows R": module.num_rows, "path": name,
                                  "median ms per candidate": 1000 * harness.median(s) / len(dims_of),
                                  "share of a cached evaluation": harness.median(s) / len(dims_of)
                                  / harness.median(seconds["cached"])} for name, s in fit.items()]
    evaluation.close()
    del trainer, evaluation, module

    # ---- the whole search stage, cached vs uncached (a fresh model per run, built outside the clock)
    stage_results, stage_seconds, default_cap = {}, {"cached": [], "uncached": []}, 512
    for r in range(args.stage_rounds):
        for name in (["cached", "uncached"] if r % 2 == 0 else ["uncached", "cached"]):
            cap = default_cap if name == "cached" else 0
            trainer, method = optembed_trainer(args.data_root, args.stage_dataset, args.ratio,
                                               [f"trainer.search_cache_mb={cap}"],
                                               search_iterations=args.stage_iterations)
            context = TrainContext(trainer, method.stages()[1], 1)
            start = clock()
            stage_results[cap] = method.run_search(context)
            stage_seconds[name].append(clock() - start)
    cached_stage, uncached_stage = stage_results[default_cap], stage_results[0]
    if not (cached_stage["evaluation_cached"] and not uncached_stage["evaluation_cached"]
            and torch.equal(cached_stage["dims"], uncached_stage["dims"])
            and torch.equal(cached_stage["keep"], uncached_stage["keep"])):
        raise RuntimeError("the cached and uncached search stages disagree")
    result.add(speedup(f"{args.stage_dataset}_search_stage",
                       f"OptEmbed's whole search stage on {args.stage_dataset} (10 + 10 per iteration, "
                       f"{args.stage_iterations} iterations, {cached_stage['candidates_scored']} candidates scored, a "
                       "fresh supernet per run): search_cache_mb=0 / the default cache (memo building included); same "
                       "dims and rows found.", stage_seconds, ("cached", "uncached"), "s per stage", ">= 1"))
    result.finish(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
