"""The benchmark harness: interleaving, medians, ratio directions, targets, the JSON record and
the generated README table."""
from __future__ import annotations

import json

import pytest

from recbench.bench import harness
from recbench.bench.harness import BenchResult, Figure, Side


class FakeClock:
    """Each workload call advances time by its own fixed cost, so sample values are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaved_counts_calls_rotates_order_and_averages_repeats():
    clock, order = FakeClock(), []

    def workload(name, cost):
        def run():
            order.append(name)
            clock.now += cost
        return run

    samples = harness.interleaved({"a": workload("a", 1.0), "b": workload("b", 3.0)}, rounds=3, warmup=2,
                                  repeat=2, clock=clock)
    assert samples == {"a": [1.0, 1.0, 1.0], "b": [3.0, 3.0, 3.0]}  # mean seconds per call in each round
    assert order[:4] == ["a", "a", "b", "b"]  # warm-up: 2 untimed calls each
    timed = order[4:]
    assert len(timed) == 12 and timed[:4] == ["a", "a", "b", "b"] and timed[4:8] == ["b", "b", "a", "a"]
    with pytest.raises(ValueError):
        harness.interleaved({"a": lambda: None}, rounds=0)


def test_median_and_ratio_directions():
    assert harness.median([3.0, 1.0, 2.0]) == 2.0 and harness.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    cand, ref = Side("c", [1.0, 2.0, 3.0], "s"), Side("r", [4.0, 4.0, 8.0], "s")
    speedup = Figure("f", "d", cand, ref, ratio_of="reference/candidate", target=">= 1.8")
    assert speedup.ratio == 2.0 and speedup.met is True
    assert speedup.round_ratios == [4.0, 2.0, 8.0 / 3.0]
    relative = Figure("g", "d", cand, ref, ratio_of="candidate/reference", target="<= 0.4")
    assert relative.ratio == 0.5 and relative.met is False
    assert Figure("h", "d", cand, ref).met is None  # no target: reported, no claim
    unpaired = Figure("u", "d", Side("c", [1.0], "s"), ref)
    assert unpaired.round_ratios == [] and unpaired.to_dict()["round_ratio_range"] is None


@pytest.mark.parametrize("target, ratio, met", [(">= 1.8", 1.8, True), (">= 1.8", 1.79, False), ("<= 1.15", 1.15, True),
                                                ("<= 1.15", 1.2, False), (">=0.8", float("nan"), False), (None, 5.0, None)])
def test_target_met(target, ratio, met):
    assert harness.target_met(ratio, target) is met


@pytest.mark.parametrize("bad", ["> 1", "1.8", ">= fast", "=="])
def test_bad_targets_and_ratio_kinds_are_rejected(bad):
    with pytest.raises(ValueError, match="target"):
        harness.parse_target(bad)
    with pytest.raises(ValueError, match="ratio_of"):
        Figure("f", "d", Side("c", [1.0], "s"), Side("r", [1.0], "s"), ratio_of="candidate-reference")


def _result(tmp_path, name="demo"):
    result = BenchResult(name, f"python benchmarks/{name}.py --rounds 3", settings={"rows": 10})
    result.add(Figure("x_vs_y", "speed-up of x", Side("x", [1.0, 1.1, 0.9], "s"), Side("y", [2.0, 2.2, 1.8], "s"),
                      target=">= 1.8"))
    result.add(Figure("z_vs_x", "relative time", Side("z", [1.3, 1.2, 1.4], "s"), Side("x", [1.0, 1.1, 0.9], "s"),
                      ratio_of="candidate/reference", target="<= 1.15"))
    result.tables["per model"] = [{"model": "x", "ms": 1.0}, {"model": "y", "ms": 2.0, "extra": True}]
    result.notes.append("a note")
    return result.write(tmp_path)


def test_json_record_schema_and_markdown(tmp_path):
    path = _result(tmp_path)
    record = json.loads(path.read_text())
    harness.validate_record(record)
    assert record["benchmark"] == "demo" and record["schema_version"] == harness.SCHEMA_VERSION
    assert "load average" in record["uptime_start"] and record["machine"]["cpus"] >= 1
    first, second = record["figures"]
    assert first["ratio"] == pytest.approx(2.0) and first["met"] is True
    assert first["candidate"]["median"] == pytest.approx(1.0) and first["round_ratio_range"] == pytest.approx([2.0, 2.0])
    assert second["ratio"] == pytest.approx(1.3) and second["met"] is False
    markdown = (tmp_path / "demo.md").read_text()
    assert "**2.00x**" in markdown and "NOT met" in markdown and "| model | ms | extra |" in markdown
    broken = dict(record, figures=[dict(first, met=False)])
    with pytest.raises(ValueError, match="disagrees"):
        harness.validate_record(broken)
    with pytest.raises(ValueError, match="lacks 'command'"):
        harness.validate_record({k: v for k, v in record.items() if k != "command"})


def test_readme_table_is_regenerated_between_markers(tmp_path):
    results = tmp_path / "results"
    _result(results, "alpha")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\nintro\n\n{harness.BEGIN}\nold table\n{harness.END}\n\nafter\n")
    assert harness.update_readme(readme, results)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# Benchmarks\n\nintro") and text.endswith("after\n")
    assert "| `alpha` | x_vs_y |" in text and "| `alpha` | z_vs_x |" in text and "NOT met" in text
    assert "python benchmarks/alpha.py --rounds 3" in text and "load average" in text
    once = readme.read_text()
    harness.update_readme(readme, results)
    assert readme.read_text() == once  # idempotent
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert harness.update_readme(plain, results) is False and plain.read_text() == "no markers\n"
