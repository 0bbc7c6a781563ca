"""The dataset a run reads, as MLflow records it (a run's dataset input, ``MlflowClient.log_inputs``).

``dataset_record`` describes a prepared dataset protocol from what its manifest already holds, with no
pass over the data: the name is the dataset's, the digest its protocol id (the dataset, split, label
rule and preprocessing, hashed), the source the protocol's cache folder the run read, the schema its
fields (dense features, one sparse id field per embedding table, multi-hot fields as arrays, the label
and extra targets) and the profile its rows per split, field counts and where the raw data came from
(the protocol's ``source``/``sources``/``generator`` settings: file names and sha256, the package, or
the generator's parameters). Runs of one protocol share one dataset entry in the experiment, and
``search_runs(filter_string="dataset.name = 'movielens100k'")`` finds them.

References: docs/architecture.md section 5 ("Tracking schema"); MLflow ``mlflow.entities.Dataset``,
``DatasetInput`` and the ``mlflow.data.context`` input tag.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

#: MLflow's limit on a dataset digest (the ``datasets.digest`` column)
MAX_DIGEST = 36
#: the settings of a protocol that say where its raw data came from (copied into the profile)
ORIGIN_KEYS = ("source", "sources", "generator")


@dataclass(frozen=True)
class DatasetRecord:
    """One dataset input of a run: MLflow's ``Dataset`` fields (``source``, ``schema`` and ``profile``
    are JSON text) and the input's context (``mlflow.data.context``: what the run used it for)."""

    name: str
    digest: str
    source_type: str
    source: str
    schema: str
    profile: str
    context: str = "train"


def digest_of(protocol_id: str) -> str:
    """The protocol id when it fits MLflow's digest column (every built-in protocol's does), else its
    hash (the part after the last ``-``; the dataset's name is the record's name)."""
    return protocol_id if len(protocol_id) <= MAX_DIGEST else protocol_id.rsplit("-", 1)[-1][:MAX_DIGEST]


def dataset_record(spec: Any, directory: Path, settings: Mapping[str, Any]) -> DatasetRecord:
    """The record of the prepared protocol ``spec`` (a ``recbench.types.DatasetSpec``) cached in
    ``directory``, whose manifest's settings are ``settings``."""
    dense = list(spec.extras.get("dense_features") or [f"dense_{i}" for i in range(spec.num_dense)])
    columns = [{"type": "float", "name": str(name), "required": True} for name in dense]
    for table in spec.tables:
        column = {"type": "long", "name": table.name, "required": True}
        if table.multi_hot:
            column = {"type": "array", "items": {"type": "long"}, "name": table.name, "required": True}
        columns.append(column)
    columns += [{"type": "float", "name": name, "required": True} for name in ("label", *spec.extra_targets)]
    profile = {
        "protocol_id": spec.protocol_id,
        "rows": {split: int(rows) for split, rows in spec.split_sizes.items()},
        "dense_features": len(dense), "sparse_fields": len(spec.tables),
        "multi_hot_fields": sum(1 for t in spec.tables if t.multi_hot),
        "embedding_rows": int(sum(t.num_embeddings for t in spec.tables)),
        "splits_used": "train (fit), val (early stopping), test (reported metrics)",
        **{key: settings[key] for key in ORIGIN_KEYS if key in settings},
    }
    source = {"uri": Path(directory).absolute().as_uri()}
    return DatasetRecord(spec.name, digest_of(spec.protocol_id), "local", json.dumps(source),
                         json.dumps({"mlflow_colspec": columns}), json.dumps(profile, default=str))
