"""The ``synthetic`` protocol: Criteo-like click logs from a planted teacher with known probabilities.

A generator writes Criteo-Kaggle-format text (tab-separated: label, I1..I13, C1..C26) whose
labels are drawn from a known click probability, then the SAME Criteo pipeline
(``recbench.datasets.criteo``) prepares it, carrying the true probability of every line as
the row extra ``true_prob``. Because the probabilities are known, the manifest records the
Bayes-optimal test AUC and log loss (the true probabilities scored against the sampled test
labels): the ceiling no method can pass.

Field profile (what the compression methods see):

- 26 categorical fields with cardinalities ``max(2, round(c_f * cardinality_scale))``, where
  ``c_f`` are Criteo Kaggle's distinct-value counts (``criteo.KAGGLE_CARDINALITIES``); the
  default scale 0.01 makes the largest field 101,312 values. Value ``v`` of a field has
  probability proportional to ``(v + 1) ** -zipf_exponent`` (default 1.1). Values are written
  as 8-digit hex tokens (a per-field bijective scramble of ``v``), like Criteo's hashes.
- 13 integer fields ``max(0, floor(exp(mu_j + 1.2 * z) - 1))`` with ``z ~ N(0, 1)`` and
  ``mu_j = log(1 + m_j)`` for medians ``m_j`` near Criteo's; ``I2`` is negative (-1..-3) in 2% of
  the lines, as in Criteo (the pipeline clamps negatives to 0).
- Missing values with Criteo Kaggle's approximate per-field missing rates (``I12`` ~77%,
  ``C22`` ~76%, ...), multiplied by ``missing_rate_scale``.

Planted teacher (all parameters i.i.d. from ``seed``; a missing value contributes nothing)::

    logit = bias + scale * standardise( sqrt(0.2) * D + sqrt(0.5) * W + sqrt(0.3) * P )
    D = sum_j a_j * (log(max(x_j, 0) + 1) - mu_j) / 1.2        a_j ~ N(0, 1/13)
    W = sum_f w_f[v_f]                                          w_f[v] ~ N(0, 1/26)
    P = sum_{f<g} <u_f[v_f], u_g[v_g]>                          u_f[v] ~ N(0, I_k / sqrt(325 k))

with each of D, W, P standardised on the calibration sample first. By default per-value parameters
are drawn independently of frequency, so rare values carry as much signal as frequent ones and a
hash collision costs accuracy. With ``rare_signal_exponent = g > 0`` the parameters of value ``v``
(``w_f[v]`` and ``u_f[v]``) are multiplied by ``(v + 1) ** (-zipf_exponent * g / 2)``: a value's
parameter variance is proportional to its frequency to the power ``g``, relative to the most frequent
value, so rare values carry less signal, as in real logs (``g = 0``: the default, unchanged). ``bias`` and ``scale`` are calibrated deterministically on a
200,000-line calibration sample (its own random stream): ``bias`` so that the mean click
probability is ``positive_rate`` (default 0.256, Criteo's), ``scale`` so that the expected
Bayes-optimal AUC, ``sum_{i,j} p_i (1 - p_j) [t_i > t_j] / (sum p)(sum 1 - p)``, equals
``target_bayes_auc`` (default 0.80).

Generation is vectorised in fixed chunks of 2**18 lines, each with its own random stream
``(seed, 2, chunk)``, so the file depends only on the generator settings; 10**7 lines take
about a minute and bounded memory. The raw file ``<data_root>/synthetic/raw/<settings hash>.txt``
(plus ``.true_prob.npy`` and ``.json``) is written atomically and reused. The generator
settings (and ``GENERATOR_VERSION``) are part of the protocol id; the default split is
``random`` 8:1:1 (``dlrm_chunks`` is available).

References:
    G. K. Zipf. 1949. Human Behavior and the Principle of Least Effort (value frequencies).
    S. Rendle. 2010. Factorization Machines. ICDM (the pairwise latent-vector term).
    Criteo AI Lab. Kaggle Display Advertising Challenge Dataset (the field profile).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import polars as pl
from scipy.special import expit
from sklearn.metrics import log_loss, roc_auc_score
from tqdm.auto import tqdm

from recbench.datasets.base import DatasetProtocol
from recbench.datasets.criteo import CriteoProtocol, DENSE_FIELDS, KAGGLE_CARDINALITIES, SPARSE_FIELDS, criteo_config
from recbench.datasets.errors import DatasetError
from recbench.datasets.storage import CacheWriter, PreparedDataset
from recbench.datasets.text.writer import NpyStreamWriter
from recbench.types import settings_hash

log = logging.getLogger(__name__)

# Bump whenever the generator's output changes for the same settings.
GENERATOR_VERSION = 1
GENERATION_CHUNK = 1 << 18  # fixed: the file never depends on memory settings
CALIBRATION_ROWS = 200_000
TEACHER_SHARES = (0.2, 0.5, 0.3)  # variance shares of the dense, first-order and pairwise terms
DENSE_SIGMA = 1.2
# Approximate per-field statistics of Criteo Kaggle train.txt (rounded): medians of I1..I13 and
# missing rates of I1..I13 and C1..C26. They give the data Criteo's texture, not its exact numbers.
DENSE_MEDIANS = (1, 3, 7, 4, 2900, 30, 3, 8, 40, 1, 1, 0, 4)
DENSE_MISSING = (0.45, 0.0, 0.21, 0.22, 0.026, 0.22, 0.043, 0.0005, 0.043, 0.45, 0.043, 0.77, 0.22)
SPARSE_MISSING = (0.0, 0.0, 0.034, 0.034, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.034, 0.0, 0.0, 0.0, 0.034, 0.0, 0.0,
                  0.44, 0.44, 0.034, 0.76, 0.0, 0.034, 0.44, 0.44)
NEGATIVE_I2_RATE = 0.02


@dataclass(frozen=True)
class GeneratorConfig:
    """Settings of the synthetic generator (all of them are in the protocol id).

    Attributes:
        rows: lines to generate (10**4 .. 10**7 and beyond).
        seed: the only source of randomness.
        cardinality_scale: multiplier of Criteo Kaggle's per-field cardinalities (min 2 values).
        zipf_exponent: exponent of the per-field Zipf value frequencies.
        positive_rate: calibrated mean click probability.
        target_bayes_auc: calibrated expected Bayes-optimal AUC, in (0.5, 1).
        latent_dim: dimension k of the pairwise latent vectors.
        missing_rate_scale: multiplier of Criteo's missing rates (0 = no missing values).
        rare_signal_exponent: g >= 0; a value's parameter variance ~ its frequency ** g (0 = frequency-
            independent signal; a nonzero g joins the protocol id, 0 leaves the id of earlier data).
    """

    rows: int = 1_000_000
    seed: int = 0
    cardinality_scale: float = 0.01
    zipf_exponent: float = 1.1
    positive_rate: float = 0.256
    target_bayes_auc: float = 0.80
    latent_dim: int = 4
    missing_rate_scale: float = 1.0
    rare_signal_exponent: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            (self.rows >= 10, f"rows must be >= 10, got {self.rows}"),
            (self.cardinality_scale > 0, f"cardinality_scale must be > 0, got {self.cardinality_scale}"),
            (self.zipf_exponent >= 0, f"zipf_exponent must be >= 0, got {self.zipf_exponent}"),
            (0 < self.positive_rate < 1, f"positive_rate must be in (0, 1), got {self.positive_rate}"),
            (0.5 < self.target_bayes_auc < 1, f"target_bayes_auc must be in (0.5, 1), got {self.target_bayes_auc}"),
            (self.latent_dim >= 1, f"latent_dim must be >= 1, got {self.latent_dim}"),
            (0 <= self.missing_rate_scale and max(DENSE_MISSING + SPARSE_MISSING) * self.missing_rate_scale < 1,
             f"missing_rate_scale must be in [0, {1 / max(DENSE_MISSING + SPARSE_MISSING):.3f}), "
             f"got {self.missing_rate_scale}"),
            (self.rare_signal_exponent >= 0, f"rare_signal_exponent must be >= 0, got {self.rare_signal_exponent}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def settings(self) -> Dict[str, Any]:
        fields = asdict(self)
        if not self.rare_signal_exponent:  # added later: at its default, data generated before keeps its id
            fields.pop("rare_signal_exponent")
        return {"generator_version": GENERATOR_VERSION, "calibration_rows": CALIBRATION_ROWS,
                "teacher_shares": list(TEACHER_SHARES), **fields}

    def signal_multipliers(self, n: int) -> np.ndarray:
        """(n,) the std multiplier of each value's parameters, ``(v + 1) ** (-zipf * g / 2)`` (all 1 at g = 0)."""
        return np.arange(1, n + 1, dtype=np.float64) ** (-self.zipf_exponent * self.rare_signal_exponent / 2)

    def cardinalities(self) -> np.ndarray:
        """(26,) int64 values per categorical field."""
        scaled = np.rint(np.asarray(KAGGLE_CARDINALITIES, dtype=np.float64) * self.cardinality_scale)
        return np.maximum(scaled, 2).astype(np.int64)


def _hex_tokens(values: np.ndarray) -> pl.Series:
    """8-digit lowercase hex strings of uint32 values (vectorised)."""
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    table = digits[((values.astype(np.uint64)[:, None] >> shifts) & np.uint64(15)).astype(np.intp)]
    return pl.Series(np.ascontiguousarray(table).view("S8").ravel()).cast(pl.String)


class Teacher:
    """The planted click model: field profile, per-value parameters and calibration."""

    def __init__(self, config: GeneratorConfig):
        self.config = config
        rng = np.random.default_rng([config.seed, 0])
        k = config.latent_dim
        self.cardinalities = config.cardinalities()
        self.cdfs: List[np.ndarray] = []
        self.first_order: List[np.ndarray] = []  # (n_f + 1,): last entry 0 = missing
        self.latent: List[np.ndarray] = []  # (n_f + 1, k): last row 0 = missing
        self.tokens: List[pl.Series] = []
        latent_std = 1.0 / (len(SPARSE_FIELDS) * (len(SPARSE_FIELDS) - 1) / 2 * k) ** 0.25
        for n in self.cardinalities.tolist():
            weights = np.arange(1, n + 1, dtype=np.float64) ** -config.zipf_exponent
            cdf = np.cumsum(weights)
            cdf /= cdf[-1]
            self.cdfs.append(cdf)
            signal = config.signal_multipliers(n)
            self.first_order.append(np.append(rng.normal(0, 1 / math.sqrt(len(SPARSE_FIELDS)), n) * signal, 0.0))
            self.latent.append(np.vstack([rng.normal(0, latent_std, (n, k)) * signal[:, None], np.zeros((1, k))]))
            salt = np.uint64(rng.integers(0, 2**32))
            scrambled = (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B1) ^ salt) & np.uint64(0xFFFFFFFF)
            self.tokens.append(_hex_tokens(scrambled))
        self.latent_sq = [np.einsum("ij,ij->i", u, u) for u in self.latent]
        self.dense_weight = rng.normal(0, 1 / math.sqrt(len(DENSE_FIELDS)), len(DENSE_FIELDS))
        self.dense_location = np.log1p(np.asarray(DENSE_MEDIANS, dtype=np.float64))
        self.dense_missing = np.asarray(DENSE_MISSING) * config.missing_rate_scale
        self.sparse_missing = np.asarray(SPARSE_MISSING) * config.missing_rate_scale
        # calibration (deterministic: its own random stream)
        dense, values = self.sample(np.random.default_rng([config.seed, 1]), CALIBRATION_ROWS)
        parts = self.components(dense, values)
        self.part_mean, self.part_std = parts.mean(axis=0), parts.std(axis=0) + 1e-12
        raw = self._combine(parts)
        self.raw_mean, self.raw_std = float(raw.mean()), float(raw.std() + 1e-12)
        self.bias, self.scale, self.expected_auc = calibrate((raw - self.raw_mean) / self.raw_std,
                                                             config.positive_rate, config.target_bayes_auc)

    def sample(self, rng: np.random.Generator, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """Features of ``n`` lines: dense (n, 13) int64 with missing = INT64_MIN, values (n, 26) int64
        with missing = n_f (the zero-parameter row)."""
        z = rng.standard_normal((n, len(DENSE_FIELDS)))
        dense = np.maximum(np.floor(np.expm1(self.dense_location + DENSE_SIGMA * z)), 0).astype(np.int64)
        negative = rng.random(n) < NEGATIVE_I2_RATE
        dense[negative, 1] = -rng.integers(1, 4, int(negative.sum()))
        dense[rng.random((n, len(DENSE_FIELDS))) < self.dense_missing] = np.iinfo(np.int64).min
        values = np.empty((n, len(SPARSE_FIELDS)), dtype=np.int64)
        uniform = rng.random((n, len(SPARSE_FIELDS)))
        missing = rng.random((n, len(SPARSE_FIELDS))) < self.sparse_missing
        for f, cdf in enumerate(self.cdfs):
            values[:, f] = np.minimum(np.searchsorted(cdf, uniform[:, f], side="right"), cdf.size - 1)
        return dense, np.where(missing, self.cardinalities[None, :], values)

    def components(self, dense: np.ndarray, values: np.ndarray) -> np.ndarray:
        """(n, 3) dense, first-order and pairwise terms."""
        transformed = np.where(dense == np.iinfo(np.int64).min, 0.0, np.log1p(np.maximum(dense, 0)))
        dense_term = ((transformed - self.dense_location) / DENSE_SIGMA) @ self.dense_weight
        first = np.zeros(len(values))
        total = np.zeros((len(values), self.config.latent_dim))
        squares = np.zeros(len(values))
        for f in range(len(SPARSE_FIELDS)):
            v = values[:, f]
            first += self.first_order[f][v]
            total += self.latent[f][v]
            squares += self.latent_sq[f][v]
        pairwise = 0.5 * (np.einsum("ij,ij->i", total, total) - squares)
        return np.stack([dense_term, first, pairwise], axis=1)

    def _combine(self, parts: np.ndarray) -> np.ndarray:
        return ((parts - self.part_mean) / self.part_std) @ np.sqrt(np.asarray(TEACHER_SHARES))

    def probability(self, dense: np.ndarray, values: np.ndarray) -> np.ndarray:
        """(n,) true click probabilities."""
        raw = (self._combine(self.components(dense, values)) - self.raw_mean) / self.raw_std
        return expit(self.bias + self.scale * raw)

    def frame(self, dense: np.ndarray, values: np.ndarray, labels: np.ndarray) -> pl.DataFrame:
        """The lines as a polars frame in Criteo column order (nulls = empty fields)."""
        columns = [pl.Series("label", labels.astype(np.int8))]
        for j, name in enumerate(DENSE_FIELDS):
            missing = np.flatnonzero(dense[:, j] == np.iinfo(np.int64).min)
            columns.append(pl.Series(name, dense[:, j]).scatter(missing, None))
        for f, name in enumerate(SPARSE_FIELDS):
            v = values[:, f]
            missing = np.flatnonzero(v == self.cardinalities[f])
            columns.append(self.tokens[f].gather(np.where(v == self.cardinalities[f], 0, v)).scatter(missing, None)
                           .alias(name))
        return pl.DataFrame(columns)


class _Ranking:
    """A fixed ordering of scores, for expected AUCs under many probability vectors."""

    def __init__(self, scores: np.ndarray):
        self.order = np.argsort(scores, kind="stable")
        ranked = scores[self.order]
        self.first = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # start of each group of ties
        self.group = np.repeat(np.arange(self.first.size), np.diff(np.r_[self.first, ranked.size]))

    def expected_auc(self, probabilities: np.ndarray) -> float:
        """E[pairs ranked right] / E[pairs] when labels are Bernoulli(p) (ties count half)."""
        p = probabilities[self.order]
        q = 1.0 - p
        below = (np.cumsum(q) - q)[self.first][self.group]  # negatives strictly below each group
        tied = np.add.reduceat(q, self.first)[self.group]
        pairs = np.sum(p * (below + 0.5 * tied)) - 0.5 * np.sum(p * q)  # a line never pairs with itself
        return float(pairs / (p.sum() * q.sum() - np.sum(p * q)))


def expected_auc(scores: np.ndarray, probabilities: np.ndarray) -> float:
    """Expected AUC of ``scores`` when line i is positive with probability ``probabilities[i]``."""
    return _Ranking(scores).expected_auc(probabilities)


def _solve_bias(score: np.ndarray, scale: float, rate: float) -> float:
    """The bias b with mean(sigmoid(b + scale * score)) = rate (safeguarded Newton)."""
    low, high = -60.0, 60.0
    bias = math.log(rate / (1 - rate))
    for _ in range(100):
        p = expit(bias + scale * score)
        gap = p.mean() - rate
        if abs(gap) < 1e-12:
            break
        low, high = (low, bias) if gap > 0 else (bias, high)
        step = bias - gap / max(float(np.mean(p * (1 - p))), 1e-12)
        bias = step if low < step < high else 0.5 * (low + high)
    return bias


def calibrate(score: np.ndarray, positive_rate: float, target_auc: float) -> Tuple[float, float, float]:
    """(bias, scale, achieved expected AUC) with mean sigmoid(bias + scale * score) = positive_rate
    and expected Bayes AUC = target_auc (bisection on the scale; deterministic)."""
    ranking = _Ranking(score)

    def solve(scale: float) -> Tuple[float, float]:
        bias = _solve_bias(score, scale, positive_rate)
        return bias, ranking.expected_auc(expit(bias + scale * score))

    low, high = 1e-3, 20.0
    best = solve(high)[1]
    if best < target_auc:
        raise DatasetError(f"target_bayes_auc={target_auc} is not reachable by this teacher (at most ~{best:.3f})")
    for _ in range(36):
        mid = 0.5 * (low + high)
        if solve(mid)[1] < target_auc:
            low = mid
        else:
            high = mid
    scale = 0.5 * (low + high)
    bias, auc = solve(scale)
    return bias, scale, auc


@dataclass(frozen=True)
class GeneratedFiles:
    text: Path  # Criteo-format lines
    true_prob: Path  # float32 (rows,) true click probability per line
    info: Path  # JSON: generator settings + calibration


def generated_files(config: GeneratorConfig, raw_dir: Path) -> GeneratedFiles:
    stem = settings_hash(config.settings(), 12)
    raw_dir = Path(raw_dir)
    return GeneratedFiles(raw_dir / f"{stem}.txt", raw_dir / f"{stem}.true_prob.npy", raw_dir / f"{stem}.json")


def generate(config: GeneratorConfig, raw_dir: Path) -> GeneratedFiles:
    """Write the synthetic files atomically (reused when complete); returns their paths."""
    files = generated_files(config, raw_dir)
    if files.text.is_file() and files.true_prob.is_file() and files.info.is_file():
        return files
    files.text.parent.mkdir(parents=True, exist_ok=True)
    for stale in files.text.parent.glob(f"{files.text.stem}.*.tmp-*"):  # left by a killed generation
        pid = stale.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            stale.unlink(missing_ok=True)
    suffix = f".tmp-{os.getpid()}"
    tmp = GeneratedFiles(*(p.with_name(p.name + suffix) for p in (files.text, files.true_prob, files.info)))
    try:
        teacher = Teacher(config)
        probabilities = NpyStreamWriter(tmp.true_prob, np.float32, (config.rows,))
        positives = 0
        with open(tmp.text, "wb") as handle, tqdm(total=config.rows, desc="synthetic: generating", unit="line",
                                                   unit_scale=True, disable=None) as bar:
            for chunk, start in enumerate(range(0, config.rows, GENERATION_CHUNK)):
                n = min(GENERATION_CHUNK, config.rows - start)
                rng = np.random.default_rng([config.seed, 2, chunk])
                dense, values = teacher.sample(rng, n)
                p = teacher.probability(dense, values).astype(np.float32)
                labels = rng.random(n) < p
                positives += int(labels.sum())
                teacher.frame(dense, values, labels).write_csv(handle, separator="\t", include_header=False,
                                                               null_value="", quote_style="never")
                probabilities.append(p)
                bar.update(n)
        probabilities.close()
        info = {"settings": config.settings(), "bias": teacher.bias, "logit_scale": teacher.scale,
                "expected_bayes_auc": teacher.expected_auc, "generated_positive_rate": positives / config.rows,
                "cardinalities": teacher.cardinalities.tolist()}
        tmp.info.write_text(json.dumps(info, indent=2))
        os.replace(tmp.true_prob, files.true_prob)
        os.replace(tmp.info, files.info)
        os.replace(tmp.text, files.text)  # last: its presence means complete
    finally:
        for path in (tmp.text, tmp.true_prob, tmp.info):
            path.unlink(missing_ok=True)
    return files


class SyntheticProtocol(DatasetProtocol):
    """Generated Criteo-like data with known click probabilities (see the module docstring).

    Args:
        rows, seed, cardinality_scale, zipf_exponent, positive_rate, target_bayes_auc,
        latent_dim, missing_rate_scale, rare_signal_exponent: the generator (``GeneratorConfig``).
        split: ``"random"`` (default, 8:1:1) or ``"dlrm_chunks"`` (7 chunks, as Criteo Kaggle).
        split_seed, min_count, hash_cap, malformed, chunk_rows, row_order: the Criteo pipeline settings
            (``row_order``: ``"key"``, rows by ascending key of the scrambled tokens, i.e.
            frequency-independent, or ``"frequency"``).
        raw_dir: where the generated files go (default ``<data_root>/synthetic/raw``).
        name: protocol name (default ``synthetic``).
    """

    name = "synthetic"

    def __init__(self, rows: int = 1_000_000, seed: int = 0, cardinality_scale: float = 0.01,
                 zipf_exponent: float = 1.1, positive_rate: float = 0.256, target_bayes_auc: float = 0.80,
                 latent_dim: int = 4, missing_rate_scale: float = 1.0, split: str = "random", split_seed: int = 0,
                 min_count: int = 1, hash_cap: Optional[int] = None, malformed: str = "fail",
                 chunk_rows: int = 500_000, raw_dir: Optional[str] = None, name: str = "synthetic",
                 row_order: str = "key", rare_signal_exponent: float = 0.0):
        self.generator = GeneratorConfig(int(rows), int(seed), float(cardinality_scale), float(zipf_exponent),
                                         float(positive_rate), float(target_bayes_auc), int(latent_dim),
                                         float(missing_rate_scale), float(rare_signal_exponent))
        self.pipeline_kwargs = dict(split=split, split_seed=int(split_seed), min_count=int(min_count),
                                    hash_cap=hash_cap, malformed=malformed, chunk_rows=int(chunk_rows),
                                    row_order=row_order)
        self.config = criteo_config("kaggle", **self.pipeline_kwargs)
        self.raw_dir = None if raw_dir is None else Path(raw_dir)
        self.name = name

    def settings(self) -> Dict[str, Any]:
        return {"dataset": "synthetic", "generator": self.generator.settings(), "rules": self.config.rules()}

    def prepare(self, data_root: Path, force: bool = False) -> PreparedDataset:
        if self.raw_dir is None:
            self.raw_dir = Path(data_root) / self.name / "raw"
        return super().prepare(data_root, force)

    def build(self, writer: CacheWriter) -> Dict[str, Any]:
        if self.raw_dir is None:
            raise DatasetError("synthetic: raw_dir is unknown; call prepare(data_root) or pass raw_dir")
        files = generate(self.generator, self.raw_dir)
        info = json.loads(files.info.read_text())
        criteo = CriteoProtocol(source=files.text, format="kaggle", name=self.name,
                                row_extras={"true_prob": str(files.true_prob)}, **self.pipeline_kwargs)
        manifest = criteo.pipeline().build(writer, self.name, self.protocol_id())
        labels = np.load(writer.path("test/labels.npy"))
        true_prob = np.load(writer.path("test/targets/true_prob.npy")).astype(np.float64)
        bayes = {"bayes_test_auc": None, "bayes_test_logloss": None}
        if labels.size and 0 < labels.sum() < labels.size:
            bayes = {"bayes_test_auc": float(roc_auc_score(labels, true_prob)),
                     "bayes_test_logloss": float(log_loss(labels, true_prob, labels=[0, 1]))}
        manifest["extras"].update(bayes)
        manifest["extras"]["teacher"] = {k: info[k] for k in ("bias", "logit_scale", "expected_bayes_auc",
                                                              "generated_positive_rate", "cardinalities")}
        manifest["extras"]["generator"] = self.generator.settings()
        return manifest
