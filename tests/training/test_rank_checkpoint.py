"""``distributed.rank_checkpoint`` in a real 2-process gloo group (no torchrun): ranks resume only
from checkpoints of the same step. A kill between two ranks' writes (different steps), a missing or
an unreadable rank checkpoint make every rank delete its own, so the run restarts on all ranks
instead of resuming from different points (checked by hand only before session 7)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SCENARIOS = {  # what each rank finds on disk -> whether the checkpoints are kept
    "same step": ((20, 20), True),
    "different steps": ((20, 40), False),
    "one missing": ((20, None), False),
    "one unreadable": ((20, "garbage"), False),
}


def _rank(rank: int, world: int, init_file: str, root: str) -> None:
    from recbench.training import distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        distributed._ACTIVE = distributed.ProcessGroupParallel()
        for index, (found, _) in enumerate(SCENARIOS[name] for name in sorted(SCENARIOS)):
            folder = Path(root) / str(index)
            base = folder / "checkpoint.pt"
            mine = base.with_name(f"checkpoint.rank{rank}-of-{world}.pt")
            if found[rank] == "garbage":
                mine.write_bytes(b"not a checkpoint")
            elif found[rank] is not None:
                torch.save({"progress": {"global_step": found[rank]}}, mine)
            dist.barrier()  # both ranks' files are on disk before either looks
            path = distributed.rank_checkpoint(base)
            (folder / f"result{rank}.json").write_text(json.dumps({"path": path.name, "kept": path.is_file()}))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_resume_only_from_checkpoints_of_one_step(tmp_path):
    """One 2-process group runs every scenario in turn (one spawn: ~10 s of imports)."""
    for index in range(len(SCENARIOS)):
        (tmp_path / str(index)).mkdir()
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for index, name in enumerate(sorted(SCENARIOS)):
        results = [json.loads((tmp_path / str(index) / f"result{r}.json").read_text()) for r in range(2)]
        assert [r["path"] for r in results] == ["checkpoint.rank0-of-2.pt", "checkpoint.rank1-of-2.pt"], name
        assert [r["kept"] for r in results] == [SCENARIOS[name][1]] * 2, name


def test_a_checkpoint_that_cannot_be_written_is_one_clear_error(tmp_path, monkeypatch):
    """torch reports a full disk or EFBIG as "inline_container.cc: unexpected pos"; recbench names
    the file and what to check, and leaves no temporary file."""
    import pytest
    import torch

    from recbench.training import checkpoint

    def full_disk(payload, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"could not write the checkpoint .*checkpoint.pt "
                       r"\(RuntimeError: .*unexpected pos.*\); check the free space of its disk and the file size limit"):
        checkpoint.save_checkpoint(tmp_path / "checkpoint.pt", {"progress": {}})
    assert list(tmp_path.iterdir()) == []
