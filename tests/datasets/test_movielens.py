"""Tests of the movielens100k protocols (recbench.datasets.movielens).

The real data (MovieLens-100K inside the recbole==1.2.1 wheel) is fetched once into the
git-ignored ``datasets/movielens100k/raw/`` of the repository (pip download, a few seconds);
every prepared protocol is built in a per-session temporary data root.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recbench.datasets import movielens_fetch, movielens_parsing
from recbench.datasets.errors import DatasetError
from recbench.datasets.movielens import FIELDS, MovieLens100K, fetch, raw_dir_of, split_rows
from recbench.datasets.movielens_fetch import RECBOLE_FILES, fetch_recbole
from recbench.datasets.movielens_parsing import GENRES

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "recbench" / "conf" / "dataset"
DATA_ROOT = REPO / os.environ.get("RECBENCH_DATA_ROOT", "datasets")  # an absolute value wins


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def recbole_raw() -> Path:
    """The real RecBole files, fetched once into the repository's git-ignored data root."""
    return fetch(DATA_ROOT)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory, recbole_raw) -> Path:
    root = tmp_path_factory.mktemp("data_root")
    shutil.copytree(recbole_raw, raw_dir_of(root))
    return root


@pytest.fixture(scope="session")
def prepared(data_root):
    return MovieLens100K().prepare(data_root)


@pytest.fixture(scope="session")
def prepared_temporal(data_root):
    return MovieLens100K(split="temporal").prepare(data_root)


@pytest.fixture(scope="session")
def raw_interactions(recbole_raw) -> pd.DataFrame:
    frame = pd.read_csv(recbole_raw / "ml-100k.inter", sep="\t")
    frame.columns = ["user", "item", "rating", "timestamp"]
    return frame


def _to_grouplens(recbole_dir: Path, out: Path) -> Path:
    """Rewrite the RecBole atomic files in the original GroupLens format (u.data, u.user, u.item)."""
    out.mkdir(parents=True, exist_ok=True)
    inter = pd.read_csv(recbole_dir / "ml-100k.inter", sep="\t", dtype=str)
    inter.to_csv(out / "u.data", sep="\t", header=False, index=False)
    users = pd.read_csv(recbole_dir / "ml-100k.user", sep="\t", dtype=str, keep_default_na=False)
    (out / "u.user").write_text("".join("|".join(row) + "\n" for row in users.itertuples(index=False)))
    items = pd.read_csv(recbole_dir / "ml-100k.item", sep="\t", dtype=str, keep_default_na=False)
    items.columns = ["item", "title", "year", "genres"]
    four_digits = items["year"].str.fullmatch(r"\d{4}")
    # GroupLens titles end in "(yyyy)"; RecBole split that year off (its two odd rows keep their titles)
    title = items["title"].where(~four_digits, items["title"] + " (" + items["year"] + ")")
    date = ("01-Jan-" + items["year"]).where(four_digits, "")
    flags = [items["genres"].str.split(" ").apply(lambda g, name=name: str(int(name in g))) for name in GENRES]
    url = "http://us.imdb.com/M/title-exact?" + items["item"]
    columns = [items["item"], title, date, pd.Series("", index=items.index), url] + flags
    lines = pd.concat(columns, axis=1).astype(str).agg("|".join, axis=1)
    (out / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1", errors="replace"))
    return out


def _tiny_grouplens(directory: Path) -> Path:
    """A small valid GroupLens-format dataset: 4 users, 5 items, 20 ratings."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "u.user").write_text(
        "1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n4|33|F|other|T8H1N\n"
    )
    flags = ["0"] * len(GENRES)
    def item(i, title, date, genres):
        row = list(flags)
        for g in genres:
            row[GENRES.index(g)] = "1"
        return "|".join([str(i), title, date, "", "http://x"] + row)
    (directory / "u.item").write_bytes(
        "\n".join(
            [
                item(1, "Toy Story (1995)", "01-Jan-1995", ["Animation", "Children's", "Comedy"]),
                item(2, "GoldenEye (1995)", "01-Jan-1995", ["Action", "Thriller"]),
                item(3, "unknown", "", ["unknown"]),
                item(4, "Café au lait (1993)", "01-Jan-1993", ["Drama"]),
                item(5, "No Genre (1990)", "01-Jan-1990", []),
            ]
        ).encode("latin-1")
        + b"\n"
    )
    rng = np.random.default_rng(1)
    rows = [f"{u}\t{i}\t{r}\t{880000000 + k}" for k, (u, i, r) in enumerate(
        zip(rng.integers(1, 5, 20), rng.integers(1, 6, 20), rng.integers(1, 6, 20)))]
    (directory / "u.data").write_text("\n".join(rows) + "\n")
    return directory


def _replace_line(path: Path, line: int, text: str) -> None:
    lines = path.read_bytes().decode("latin-1").split("\n")
    lines[line - 1] = text
    path.write_bytes("\n".join(lines).encode("latin-1"))


# ------------------------------------------------------------------------------------------------
# the real data
# ------------------------------------------------------------------------------------------------


def test_fields_shapes_and_sizes(prepared):
    spec = prepared.spec
    assert spec.name == "movielens100k" and spec.protocol_id.startswith("movielens100k-")
    assert spec.feature_names == list(FIELDS)
    assert [t.multi_hot for t in spec.tables] == [False] * 7 + [True]
    assert spec.tables[-1].pooling == "mean"
    assert spec.num_dense == 2 and tuple(spec.extra_targets) == ("rating",)
    assert dict(spec.split_sizes) == {"train": 80000, "val": 10000, "test": 10000}
    for name, size in spec.split_sizes.items():
        split = prepared.split(name)
        assert split.sparse.shape == (size, 7) and split.sparse.dtype == np.int32
        assert split.dense.shape == (size, 2) and split.dense.dtype == np.float32
        assert np.isfinite(split.dense).all()
        assert split.labels.shape == (size,) and split.targets["rating"].shape == (size,)
        for column, table in enumerate(spec.tables[:7]):
            assert 0 <= split.sparse[:, column].min() and split.sparse[:, column].max() < table.num_embeddings
    rows = {t.name: t.num_embeddings for t in spec.tables}
    assert rows["gender"] == 3 and rows["occupation"] == 22 and rows["genres"] == 20
    assert rows["user"] == 944  # every user has training ratings under the random split


def test_label_rule_and_positive_rate(prepared, raw_interactions):
    labels, ratings = [], []
    for name in ("train", "val", "test"):
        split = prepared.split(name)
        rating = np.asarray(split.targets["rating"])
        assert set(np.unique(rating)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
        np.testing.assert_array_equal(split.labels, (rating >= 4).astype(np.float32))
        source_rows = np.load(prepared.directory / name / "source_rows.npy")
        np.testing.assert_array_equal(rating, raw_interactions["rating"].to_numpy()[source_rows])
        labels.append(np.asarray(split.labels))
    rate = np.concatenate(labels).mean()
    assert rate == pytest.approx(0.55375, abs=1e-6)  # 55,375 of the 100,000 ratings are >= 4
    assert prepared.spec.extras["positive_rate"]["train"] == pytest.approx(0.5534, abs=1e-3)


def test_random_split_disjoint_cover_and_seeded(prepared):
    rows = [np.load(prepared.directory / name / "source_rows.npy") for name in ("train", "val", "test")]
    every = np.concatenate(rows)
    assert len(every) == 100000 and len(np.unique(every)) == 100000 and every.min() == 0 and every.max() == 99999
    again = split_rows(100000, "random", 0, (0.8, 0.1, 0.1))
    np.testing.assert_array_equal(again["val"], rows[1])
    assert not np.array_equal(split_rows(100000, "random", 1, (0.8, 0.1, 0.1))["val"], rows[1])


def test_temporal_split_ordering(prepared_temporal, raw_interactions):
    spec = prepared_temporal.spec
    assert spec.name == "movielens100k_temporal"
    assert dict(spec.split_sizes) == {"train": 80000, "val": 10000, "test": 10000}
    timestamps = raw_interactions["timestamp"].to_numpy()
    parts = {n: np.load(prepared_temporal.directory / n / "source_rows.npy") for n in ("train", "val", "test")}
    assert len(np.unique(np.concatenate(list(parts.values())))) == 100000
    assert timestamps[parts["train"]].max() <= timestamps[parts["val"]].min()
    assert timestamps[parts["val"]].max() <= timestamps[parts["test"]].min()
    # ties keep file order: within a split, equal timestamps appear by increasing source row
    ordered = np.concatenate([parts["train"], parts["val"], parts["test"]])
    np.testing.assert_array_equal(ordered, np.argsort(timestamps, kind="stable"))


@pytest.mark.parametrize("field, column", [("user", 0), ("item", 1)])
def test_vocabulary_and_counts_from_train_only(prepared, raw_interactions, field, column):
    table = prepared.spec.tables[column]
    vocabulary = json.loads((prepared.directory / "vocab" / f"{field}.json").read_text())
    train_rows = np.load(prepared.directory / "train" / "source_rows.npy")
    raw_train = raw_interactions[field].to_numpy()[train_rows]
    assert vocabulary == sorted(np.unique(raw_train).tolist())
    assert table.num_embeddings == len(vocabulary) + 1
    expected_counts = np.concatenate([[0], pd.Series(raw_train).value_counts().sort_index().to_numpy()])
    np.testing.assert_array_equal(table.counts, expected_counts)
    lookup = {value: index + 1 for index, value in enumerate(vocabulary)}
    for name in ("train", "val", "test"):
        rows = np.load(prepared.directory / name / "source_rows.npy")
        expected = np.array([lookup.get(v, 0) for v in raw_interactions[field].to_numpy()[rows]])
        np.testing.assert_array_equal(prepared.split(name).sparse[:, column], expected)


def test_unseen_ids_map_to_oov(prepared, prepared_temporal):
    # the random split leaves some items out of training; the temporal split also new users
    for spec_prepared, fields in ((prepared, ("item",)), (prepared_temporal, ("user", "item"))):
        for field in fields:
            column = FIELDS.index(field)
            oov = sum(int((spec_prepared.split(n).sparse[:, column] == 0).sum()) for n in ("val", "test"))
            assert oov > 0, field
            assert (spec_prepared.split("train").sparse[:, column] > 0).all()
            assert spec_prepared.spec.tables[column].counts[0] == 0


def test_release_year_missing_is_oov_and_dense_has_no_leak(prepared):
    column = FIELDS.index("release_year")
    train = prepared.split("train")
    missing = np.asarray(train.sparse[:, column]) == 0
    assert missing.sum() == prepared.spec.tables[column].counts[0] > 0  # item 267 "unknown" has no year
    assert np.all(np.asarray(train.dense[missing, 1]) == 0.0)
    dense = np.asarray(train.dense)
    assert abs(dense[:, 0].mean()) < 1e-3 and dense[:, 0].std() == pytest.approx(1.0, abs=1e-3)
    for j in range(2):
        assert abs(np.corrcoef(dense[:, j], train.labels)[0, 1]) < 0.2


def test_genre_bags(prepared):
    vocabulary = json.loads((prepared.directory / "vocab" / "genres.json").read_text())
    assert vocabulary == list(GENRES)
    total = 0
    for name in ("train", "val", "test"):
        split = prepared.split(name)
        offsets, values = np.asarray(split.multi_offsets["genres"]), np.asarray(split.multi_values["genres"])
        assert offsets.dtype == np.int64 and values.dtype == np.int32
        assert offsets[0] == 0 and offsets[-1] == len(values) and len(offsets) == len(split) + 1
        lengths = np.diff(offsets)
        assert lengths.min() >= 1 and lengths.max() <= 6
        assert values.min() >= 1 and values.max() < 20  # every genre was seen in training
        if name == "train":
            total = len(values)
    counts = prepared.spec.tables[-1].counts
    assert counts.sum() == total and counts[0] == 0
    # Toy Story (item 1): Animation, Children's, Comedy
    train = prepared.split("train")
    item_vocab = json.loads((prepared.directory / "vocab" / "item.json").read_text())
    row = int(np.flatnonzero(np.asarray(train.sparse[:, 1]) == item_vocab.index(1) + 1)[0])
    offsets = train.multi_offsets["genres"]
    bag = [vocabulary[v - 1] for v in train.multi_values["genres"][offsets[row] : offsets[row + 1]]]
    assert bag == ["Animation", "Children's", "Comedy"]


def test_batch_iterator_yields_genre_bags(prepared):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recbench.datasets.batching import BatchIterator

    split = prepared.split("val")
    iterator = BatchIterator(prepared.spec, split, batch_size=64, shuffle=True, seed=3)
    batch = next(iter(iterator))
    kjt = batch.sparse_features
    assert isinstance(kjt, KeyedJaggedTensor) and kjt.keys() == list(FIELDS)
    assert batch.dense_features.shape == (64, 2) and batch.labels.shape == (64,)
    assert batch.targets["rating"].shape == (64,)
    genres = kjt["genres"]
    rows = np.sort(np.random.default_rng([3, 0]).permutation(len(split))[:64])
    offsets = np.asarray(split.multi_offsets["genres"])
    np.testing.assert_array_equal(genres.lengths().numpy(), offsets[rows + 1] - offsets[rows])
    expected = np.concatenate([split.multi_values["genres"][offsets[r] : offsets[r + 1]] for r in rows])
    np.testing.assert_array_equal(genres.values().numpy(), expected)
    np.testing.assert_array_equal(kjt["user"].values().numpy(), np.asarray(split.sparse)[rows, 0])


def test_one_hot_logistic_regression_reference_auc(prepared):
    """DESIGN 4a: a one-hot logistic regression reaches ~0.77 test AUC on the random split."""
    import scipy.sparse as sparse
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    tables = prepared.spec.tables
    starts = np.concatenate([[0], np.cumsum([t.num_embeddings for t in tables])])

    def design(name):
        split = prepared.split(name)
        n, offsets = len(split), np.asarray(split.multi_offsets["genres"])
        rows = np.concatenate([np.repeat(np.arange(n), 7), np.repeat(np.arange(n), np.diff(offsets))])
        cols = np.concatenate([(np.asarray(split.sparse) + starts[:7]).ravel(), np.asarray(split.multi_values["genres"]) + starts[7]])
        return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, starts[-1])), np.asarray(split.labels)

    model = LogisticRegression(C=1.0, max_iter=1000).fit(*design("train"))
    features, labels = design("test")
    auc = roc_auc_score(labels, model.decision_function(features))
    assert 0.75 < auc < 0.79, auc


# ------------------------------------------------------------------------------------------------
# sources, checksums, fetching
# ------------------------------------------------------------------------------------------------


def test_grouplens_source_gives_identical_arrays(tmp_path, recbole_raw, prepared):
    grouplens = _to_grouplens(recbole_raw, tmp_path / "ml-100k")
    other = MovieLens100K(source="grouplens", grouplens_dir=str(grouplens)).prepare(tmp_path / "root")
    assert other.spec.protocol_id != prepared.spec.protocol_id  # the source checksum differs
    assert other.spec.name == prepared.spec.name
    settings, reference = other.manifest["settings"], prepared.manifest["settings"]
    assert settings["source"]["kind"] == "grouplens" and set(settings["source"]["sha256"]) == {"u.data", "u.user", "u.item"}
    assert {k: v for k, v in settings.items() if k != "source"} == {k: v for k, v in reference.items() if k != "source"}
    assert [(t.name, t.num_embeddings) for t in other.spec.tables] == [(t.name, t.num_embeddings) for t in prepared.spec.tables]
    for mine, theirs in zip(other.spec.tables, prepared.spec.tables):
        np.testing.assert_array_equal(mine.counts, theirs.counts)
    files = sorted(p.relative_to(prepared.directory) for p in prepared.directory.rglob("*.npy"))
    assert files == sorted(p.relative_to(other.directory) for p in other.directory.rglob("*.npy"))
    for rel in files:
        np.testing.assert_array_equal(np.load(other.directory / rel), np.load(prepared.directory / rel), err_msg=str(rel))
    for field in FIELDS:
        assert (other.directory / "vocab" / f"{field}.json").read_text() == (prepared.directory / "vocab" / f"{field}.json").read_text()


def test_tampered_raw_file_is_a_clear_error(tmp_path, recbole_raw):
    raw = raw_dir_of(tmp_path)
    shutil.copytree(recbole_raw, raw)
    with open(raw / "ml-100k.user", "ab") as handle:
        handle.write(b"944\t30\tM\tother\t12345\n")
    with pytest.raises(DatasetError, match=r"ml-100k\.user: sha256 mismatch .*recbench-data fetch movielens100k"):
        MovieLens100K().prepare(tmp_path)
    with pytest.raises(DatasetError, match="sha256 mismatch"):
        fetch(tmp_path)
    assert not list((tmp_path / "movielens100k" / "processed").glob("movielens100k-*"))  # nothing published


def _fake_pip(recbole_raw: Path, calls: list, tamper: bool = False):
    """A stand-in for `pip download`: writes a wheel holding the real files (no network)."""

    def run(command, capture_output, text):
        assert isinstance(command, list)  # an argument list, never a shell string
        calls.append(command)
        target = Path(command[command.index("-d") + 1])
        target.mkdir(parents=True)
        with zipfile.ZipFile(target / "recbole-1.2.1-py3-none-any.whl", "w") as wheel:
            for name in RECBOLE_FILES:
                data = (recbole_raw / name).read_bytes()
                wheel.writestr(f"recbole/dataset_example/ml-100k/{name}", data + (b"x" if tamper else b""))
            wheel.writestr("recbole/__init__.py", "")
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_fetch_extracts_verifies_and_is_idempotent(tmp_path, recbole_raw, monkeypatch):
    calls: list = []
    monkeypatch.setattr(movielens_fetch.subprocess, "run", _fake_pip(recbole_raw, calls))
    raw = fetch(tmp_path)
    assert raw == tmp_path / "movielens100k" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(RECBOLE_FILES)  # only the data files
    command = calls[0]
    assert command[1:4] == ["-m", "pip", "download"] and "recbole==1.2.1" in command
    assert "--no-deps" in command and "--only-binary=:all:" in command
    fetch(tmp_path)
    assert len(calls) == 1  # present and verified: nothing to do
    # a tampered file is replaced only when forced
    (raw / "ml-100k.item").write_text("broken")
    with pytest.raises(DatasetError, match="ml-100k.item: sha256 mismatch"):
        fetch(tmp_path)
    fetch(tmp_path, force=True)
    assert len(calls) == 2 and movielens_fetch.verify_recbole_files(raw)
    assert not [p for p in (tmp_path / "movielens100k").iterdir() if p.name != "raw"]  # no temp dirs left


def test_fetch_rejects_a_wrong_wheel_and_publishes_nothing(tmp_path, recbole_raw, monkeypatch):
    monkeypatch.setattr(movielens_fetch.subprocess, "run", _fake_pip(recbole_raw, [], tamper=True))
    with pytest.raises(DatasetError, match="sha256 mismatch"):
        fetch_recbole(tmp_path / "raw")
    assert not list((tmp_path / "raw").iterdir())


def test_fetch_reports_a_failed_pip(tmp_path, monkeypatch):
    def run(command, capture_output, text):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for recbole==1.2.1")

    monkeypatch.setattr(movielens_fetch.subprocess, "run", run)
    with pytest.raises(DatasetError, match=r"(?s)exit code 1.*No matching distribution.*source=grouplens"):
        fetch(tmp_path)


def test_build_fetches_missing_raw_files(tmp_path, recbole_raw, monkeypatch, caplog):
    calls: list = []
    monkeypatch.setattr(movielens_fetch.subprocess, "run", _fake_pip(recbole_raw, calls))
    with caplog.at_level("INFO", logger="recbench.datasets.movielens"):
        prepared = MovieLens100K(split="temporal").prepare(tmp_path)
    assert len(calls) == 1 and "fetching them from PyPI" in caplog.text
    assert prepared.spec.split_sizes["train"] == 80000


# ------------------------------------------------------------------------------------------------
# settings, configs, malformed input (small synthetic files)
# ------------------------------------------------------------------------------------------------


def test_protocol_id_tracks_every_setting():
    base = MovieLens100K()
    assert base.protocol_id() == MovieLens100K().protocol_id()
    assert base.protocol_id() != MovieLens100K(split_seed=1).protocol_id()
    assert base.protocol_id() != MovieLens100K(label_threshold=5).protocol_id()
    assert base.protocol_id() != MovieLens100K(zip_prefix_length=5).protocol_id()
    temporal = MovieLens100K(split="temporal")
    assert temporal.protocol_id().startswith("movielens100k_temporal-")
    assert temporal.protocol_id() == MovieLens100K(split="temporal", split_seed=7).protocol_id()
    settings = base.settings()
    assert settings["source"]["sha256"] == RECBOLE_FILES and settings["label"]["threshold"] == 4.0
    assert settings["split"] == {"rule": "random", "fractions": [0.8, 0.1, 0.1], "seed": 0}
    assert "protocol_format_version" in settings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "leave_one_out"}, "split must be one of random, temporal"),
        ({"source": "kaggle"}, "source must be one of recbole, grouplens"),
        ({"source": "grouplens"}, "needs grouplens_dir"),
        ({"label_threshold": 1}, r"label_threshold must be in \(1, 5\]"),
        ({"split_fractions": [0.8, 0.2]}, "split_fractions"),
        ({"zip_prefix_length": 0}, "zip_prefix_length"),
    ],
)
def test_constructor_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MovieLens100K(**kwargs)


@pytest.mark.parametrize("name, split", [("movielens100k", "random"), ("movielens100k_temporal", "temporal")])
def test_configs_instantiate(name, split):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config = OmegaConf.load(CONF / f"{name}.yaml")
    protocol = config.pop("protocol")
    assert set(protocol) == {
        "batch_size", "embedding_dim", "bottom_mlp", "top_mlp", "dense_learning_rate",
        "embedding_learning_rate", "max_epochs", "evals_per_epoch", "patience",
    }
    dataset = instantiate(config)
    assert isinstance(dataset, MovieLens100K) and dataset.split == split and dataset.name == name
    assert dataset.protocol_id() == MovieLens100K(split=split).protocol_id()


def test_tiny_grouplens_dataset_builds(tmp_path):
    source = _tiny_grouplens(tmp_path / "gl")
    prepared = MovieLens100K(source="grouplens", grouplens_dir=str(source)).prepare(tmp_path / "root")
    assert dict(prepared.spec.split_sizes) == {"train": 16, "val": 2, "test": 2}
    genres = json.loads((prepared.directory / "vocab" / "genres.json").read_text())
    assert genres == [g for g in GENRES if g in genres]  # canonical u.genre order
    zips = json.loads((prepared.directory / "vocab" / "zip.json").read_text())
    assert all(len(z) == 3 for z in zips)
    item_vocab = json.loads((prepared.directory / "vocab" / "item.json").read_text())
    train = prepared.split("train")
    offsets = np.asarray(train.multi_offsets["genres"])
    if 5 in item_vocab:  # the genre-less item gets the bag [0]
        row = int(np.flatnonzero(np.asarray(train.sparse[:, 1]) == item_vocab.index(5) + 1)[0])
        assert list(train.multi_values["genres"][offsets[row] : offsets[row + 1]]) == [0]


@pytest.mark.parametrize(
    "file, line, text, message",
    [
        ("u.data", 3, "1\t1\t6\t880000002", r"u\.data:3: field 'rating' has value '6'; allowed: integers in \[1, 5\]"),
        ("u.data", 2, "1\t1\t4.5\t880000001", r"u\.data:2: field 'rating' has value '4.5'"),
        ("u.data", 4, "1\t1\t3", r"u\.data:4: expected 4 '\\t'-separated columns, found 3"),
        ("u.data", 5, "9\t1\t3\t880000004", r"u\.data:5: user 9 is not in .*u\.user"),
        ("u.data", 6, "1\t42\t3\t880000005", r"u\.data:6: item 42 is not in .*u\.item"),
        ("u.user", 2, "2|53|X|other|94043", r"u\.user:2: field 'gender' has value 'X'; allowed: F, M"),
        ("u.user", 3, "3|23|M|astronaut|32067", r"u\.user:3: field 'occupation' has value 'astronaut'; allowed: administrator"),
        ("u.user", 4, "1|33|F|other|T8H1N", r"u\.user:4: field 'user' has value '1'; allowed: each id once"),
        ("u.user", 1, "1|24|M|technician", r"u\.user:1: expected 5 '\|'-separated columns, found 4"),
        ("u.item", 2, "2|GoldenEye (1995)|01-Jan-1995||http://x|" + "|".join(["2"] + ["0"] * 18), r"u\.item:2: field \"genres flag 'unknown'\" has value '2'"),
    ],
)
def test_malformed_grouplens_input_names_file_line_and_field(tmp_path, file, line, text, message):
    source = _tiny_grouplens(tmp_path / "gl")
    _replace_line(source / file, line, text)
    with pytest.raises(DatasetError, match=message):
        MovieLens100K(source="grouplens", grouplens_dir=str(source)).prepare(tmp_path / "root")


def test_malformed_recbole_input_names_file_line_and_field(tmp_path, recbole_raw):
    raw = tmp_path / "raw"
    shutil.copytree(recbole_raw, raw)
    lines = (raw / "ml-100k.item").read_text().split("\n")
    lines[1] = lines[1].replace("Comedy", "Comedie")  # Toy Story
    (raw / "ml-100k.item").write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=r"ml-100k\.item:2: field 'genres' has value 'Comedie'; allowed: unknown, Action"):
        movielens_parsing.load_recbole(raw)


def test_missing_grouplens_file(tmp_path):
    source = _tiny_grouplens(tmp_path / "gl")
    (source / "u.item").unlink()
    with pytest.raises(DatasetError, match=r"missing u\.item"):
        MovieLens100K(source="grouplens", grouplens_dir=str(source)).protocol_id()
