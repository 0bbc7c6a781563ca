"""Methods that compute from "the whole batch" inside their forward or backward, under
``runtime.distributed=true``: 2 gloo processes (``multistage_ranks.py``) match one process on the
toy protocol within the tolerance of ``test_distributed.py`` (|delta| <= 1e-4 on AUC and log
loss, <= 1e-5 on logged losses), and the replicas stay identical (``check_replicas`` at every
evaluation).

* ``lpt``, ``alpt`` (per-row step sizes, sparse) and ``alpt_field`` (per-field step sizes, DDP):
  the integer rows are updated inside the backward; every rank gathers the touched row ids and
  row gradients of the whole batch and applies the same update with the same rounding noise.
* ``dpq`` (DPQ-SX) and ``mgqe`` (DPQ-VQ with its loss): the logits' batch norm uses the statistics
  of the global batch's unique rows (``sync_batch_norm``), each row counted once.
* ``cafe``: a table sharded by TorchRec; the HotSketch sees the whole batch's id gradients and
  migrations act on each rank's column shards.
* ``adaembed``: a sharded row pool; importance from the whole batch's id gradients (identical on
  every rank), re-initialised rows written in each rank's column shards.

One 2-process job for all scenarios: ~20 s on 2 cores (plus ~10 s of single-process references).
"""
from __future__ import annotations

import pytest

import multistage_ranks

SCENARIOS = ("lpt", "alpt", "alpt_field", "dpq", "mgqe", "cafe", "adaembed")


@pytest.fixture(scope="module")
def two_ranks(toy_dataset, tmp_path_factory):
    return multistage_ranks.run_ranks(multistage_ranks.data_root(toy_dataset), tmp_path_factory.mktemp("ranks"),
                                      SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_ranks_match_one_process(two_ranks, toy_dataset, scenario):
    _, single = multistage_ranks.train(scenario, toy_dataset)
    multistage_ranks.assert_matches_one_process([r[scenario] for r in two_ranks], single, scenario)
