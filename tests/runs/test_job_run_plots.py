"""A run's figures (``recbench.runs.run_plots``): what each draws, from what the job has in memory."""
from __future__ import annotations

import time

from matplotlib.image import imread

from recbench.runs.run_plots import CurveRecorder, learning_curves, memory_breakdown
from recbench.types import MemoryReport, TableSpec

HISTORY = [{"step": s, "stage": int(s > 60), "val/auc": 0.70 + s / 1000, "val/logloss": 0.6 - s / 1000,
            "train/loss": 0.6 - s / 900} for s in range(20, 121, 20)]
TABLES = [TableSpec(f"C{i}", 10 + 1000 * i, None) for i in range(20)]


def _image(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path)


def test_the_recorder_keeps_the_training_loss_and_passes_every_metric_on():
    logged = []
    recorder = CurveRecorder(lambda metrics, step: logged.append((dict(metrics), step)))
    recorder({"train/loss": 0.5}, 50)
    recorder({"val/auc": 0.7, "train/loss": 0.4}, 100)
    assert recorder.losses == [(50, 0.5), (100, 0.4)]
    assert logged == [({"train/loss": 0.5}, 50), ({"val/auc": 0.7, "train/loss": 0.4}, 100)]


def test_learning_curves_of_a_two_stage_run_and_of_a_run_without_evaluations(tmp_path):
    start = time.perf_counter()
    drawn = learning_curves(HISTORY, [(s, 0.6 - s / 800) for s in range(10, 121, 10)], tmp_path / "a.png",
                            "qr@0.1/dcn/toy/s0", test_auc=0.8)
    blank = learning_curves([], [], tmp_path / "b.png")
    assert _image(drawn).shape[:2] == _image(blank).shape[:2] == (360, 1000)
    assert _image(drawn).std() > _image(blank).std()  # curves, legends and the stage line were drawn
    assert time.perf_counter() - start < 5  # a few tenths of a second on an idle core


def test_memory_breakdown_with_and_without_the_methods_parts(tmp_path):
    parts = MemoryReport(3_000_000, 9_000_000, 1, 30_000_000, {"weights": 2_000_000, "remap": 1_000_000})
    whole = MemoryReport(3_000_000, 9_000_000, 1, 30_000_000)
    measured = {"emb/bytes_inference": 3_000_000.0, "emb/bytes_training": 9_000_000.0}
    for name, memory in (("parts.png", parts), ("whole.png", whole)):
        path = memory_breakdown(memory, TABLES, 16, 0.1, measured, tmp_path / name, "qr@0.1/dcn/toy/s0")
        assert _image(path).shape[:2] == (360, 1000)
    # the parts are drawn in colour; a plan without parts draws its inference bar in grey like the others
    colour = lambda image: ((abs(image[..., 0] - image[..., 1]) + abs(image[..., 1] - image[..., 2])) > 0.3).sum()  # noqa: E731
    assert colour(_image(tmp_path / "parts.png")) > colour(_image(tmp_path / "whole.png"))


def test_memory_breakdown_draws_the_measured_training_split(tmp_path):
    whole = MemoryReport(3_000_000, 9_000_000, 1, 30_000_000)
    plain = {"emb/bytes_inference": 3_000_000.0, "emb/bytes_training": 9_000_000.0}
    split = {**plain, "emb/bytes_training_weights": 3e6, "emb/bytes_training_optimizer_state": 3e6,
             "emb/bytes_training_buffers": 1e6, "emb/bytes_training_runtime": 2e6}
    a = memory_breakdown(whole, TABLES, 16, 0.1, plain, tmp_path / "a.png")
    b = memory_breakdown(whole, TABLES, 16, 0.1, split, tmp_path / "b.png")
    colour = lambda image: ((abs(image[..., 0] - image[..., 1]) + abs(image[..., 1] - image[..., 2])) > 0.3).sum()  # noqa: E731
    assert colour(_image(b)) > colour(_image(a))  # the weights / optimizer / buffers / runtime parts, in colour
