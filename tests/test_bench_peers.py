"""KARST against its peers: matched sizes, the per-family learning rate, paired effects."""

import statistics

import pytest

from bench import peer_runs as pr
from bench import peers
from bench.runs import RunCache, RunRecord
from pipeline.backbones import create_model_skeleton
from pipeline.config import BackboneConfig

TOY = pr.Settings(epochs={"digits": 1}, seeds=(0, 1), lrs=(3e-3, 1e-2), kernels=(1, 2),
                     rescales=("channel", "none"), baselines=("lokr",), train_size=64,
                     val_size=32)


@pytest.fixture(scope="module")
def skeleton():
    return create_model_skeleton(BackboneConfig())


@pytest.mark.parametrize(("counts", "rank"), [([12_288], 2), ([18_000, 18_900], 3),
                                              ([6_000, 6_100, 30_000], 1)])
def test_lora_rank_is_the_one_closest_to_the_median_karst_size(skeleton, counts, rank):
    assert pr.matched_lora_rank(skeleton, counts) == rank


def test_karst_rows_keep_kernels_times_rank_fixed():
    rows = pr.karst_methods(pr.FULL)
    assert {m.adapter["num_kernels"] * m.adapter["rank"] for m in rows} == {8}
    assert len(rows) == 12  # N in {1, 2, 4, 8} × three re-scaling modes
    bad = pr.Settings(epochs={"digits": 1}, seeds=(0,), lrs=(1e-3,), kernels=(3,))
    with pytest.raises(ValueError, match="N=3 does not divide kernel_rank=8"):
        pr.karst_methods(bad)


def test_a_reduced_task_runs_part_of_the_karst_grid_and_every_baseline():
    methods = pr.all_methods(pr.FULL)
    on_digits = [m for m in methods if pr.FULL.runs_on(m, "digits")]
    assert all(pr.FULL.runs_on(m, "mnist") for m in methods)
    assert {(m.adapter["num_kernels"], m.adapter["rescale"]) for m in on_digits
            if m.kind == "karst"} == {(1, "channel"), (1, "none"), (8, "channel"), (8, "none")}
    assert {m.kind for m in on_digits} == {"linear", "full", "lora", "lokr", "ssf", "karst"}


def test_effects_are_paired_differences_by_seed():
    def row(n, rescale, tests):
        method = pr.Method(f"KARST N {n}", "karst", {"method": "karst", "num_kernels": n,
                                                        "rescale": rescale})
        records = [RunRecord("k", {}, 100, [v], [0.0], [0.0], t, 0.0)
                   for v, t in zip((0.5, 0.6), tests, strict=True)]
        return pr.Row("digits", method, 1e-3, records)

    rows = [row(1, "channel", [0.70, 0.80]), row(1, "none", [0.60, 0.70]),
            row(2, "channel", [0.75, 0.90]), row(2, "none", [0.65, 0.70])]
    found = {e.what.split(" (")[0]: e for e in pr.effects(rows, TOY)}
    kernels = found["N 2 vs N 1"]
    assert kernels.diffs == pytest.approx([0.05, 0.05])
    rescale = found["re-scaling channel vs none"]
    assert rescale.diffs == pytest.approx([0.10, 0.15])
    assert rescale.verdict() == "helps"
    assert pr.Effect("digits", "x", [0.01, -0.02, 0.015]).verdict() == "no clear difference"


@pytest.mark.slow
def test_the_study_runs_each_config_once_and_reports(tmp_path):
    cache = RunCache(tmp_path / "peers.jsonl")
    rows = pr.run_study(TOY, cache)
    labels = [r.method.label for r in rows]
    assert len(rows) == 5 and labels[0].startswith("LoKr")
    karst_n1_none = next(r for r in rows if r.method.label.endswith("N 1, r 8, none"))
    assert [r.key for r in rows[0].records] == [r.key for r in karst_n1_none.records]  # LoKr
    # 4 distinct configs × 2 seeds, plus the other lr tried for the family on seed 0
    assert cache.trained == len(cache.records) == 9
    # the lr probe is the family's median-size member: KARST N 2, none
    probe_val = {rec.config["optim"]["lr"]: rec.val_accuracy[-1]
                 for rec in cache.records.values()
                 if rec.config["seed"] == 0 and rec.config["adapter"]["num_kernels"] == 2
                 and rec.config["adapter"]["rescale"] == "none"}
    assert len(probe_val) == 2 and rows[1].lr == max(probe_val, key=probe_val.get)
    for r in rows:
        assert [rec.config["seed"] for rec in r.records] == [0, 1]
        assert statistics.mean(r.test) == pytest.approx(
            statistics.mean(rec.test_accuracy for rec in r.records))

    peers.report(rows, TOY, tmp_path / "docs")
    text = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "<!-- peers:begin -->" in text and "N 2 vs N 1" in text and "In plain words" in text
    assert (tmp_path / "docs" / "figures" / "peers.png").stat().st_size > 0
    assert len((tmp_path / "docs" / "tables" / "peers.csv").read_text().splitlines()) == 6

    again = RunCache(tmp_path / "peers.jsonl")
    pr.run_study(TOY, again)
    assert again.trained == 0
