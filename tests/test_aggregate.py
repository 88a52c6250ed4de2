import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tamperbench import aggregate


def _point(root, name, values, status="done", auroc_shift=0.0):
    d = root / name
    (d / "04_detection").mkdir(parents=True)
    (d / "05_tampered_datasets").mkdir()
    (d / "07_adaptive").mkdir()
    seed = values["seed"]
    pd.DataFrame({"detector": ["particul", "msp"], "attack": ["pgd", "pgd"],
                  "auroc": [0.9 + auroc_shift, 0.7 + auroc_shift], "profile": "ci", "seed": seed}
                 ).to_csv(d / "04_detection" / "detection.csv", index=False)
    rows = [{"test": "tail_count", "detector": "particul", "attack": "pgd", "n": n, "p": p, "power": 0.1 * seed + p,
             "profile": "ci", "seed": seed} for n in (100, 1000) for p in (0.0, 0.005, 0.02, 0.5)]
    pd.DataFrame(rows).to_csv(d / "05_tampered_datasets" / "batch_power.csv", index=False)
    pd.DataFrame({"detector": ["particul"], "final": [0.01 * seed], "profile": "ci", "seed": seed}
                 ).to_csv(d / "07_adaptive" / "robust_at_headline.csv", index=False)
    (d / aggregate.POINT_FILE).write_text(json.dumps({"point": name, "values": values, "status": status}))


def test_collect_adds_grid_columns_and_skips_incomplete_points(tmp_path):
    for seed, shift in ((0, 0.0), (1, 0.02), (2, 0.04)):
        _point(tmp_path, f"seed-{seed}", {"seed": seed, "attack_suite.pgd.eps": 0.1}, auroc_shift=shift)
    _point(tmp_path, "seed-9", {"seed": 9, "attack_suite.pgd.eps": 0.1}, status="failed")
    (tmp_path / "seed-10").mkdir()  # never finished: no point.json
    tables = aggregate.collect(tmp_path)
    det = tables["04_detection/detection.csv"]
    assert sorted(det.point.unique()) == ["seed-0", "seed-1", "seed-2"]
    assert (det["attack_suite.pgd.eps"] == 0.1).all() and len(det) == 6


def test_headline_intervals_are_student_t_over_seeds(tmp_path):
    for seed, shift in ((0, 0.0), (1, 0.02), (2, 0.04)):
        _point(tmp_path, f"seed-{seed}", {"seed": seed}, auroc_shift=shift)
    tables, heads = aggregate.write(tmp_path, ["seed"])
    assert (tmp_path / "aggregate" / "04_detection" / "detection.csv").exists()
    assert (tmp_path / aggregate.HEADLINES_FILE).exists()
    row = heads[(heads.metric == "auroc") & (heads.detector == "particul")].iloc[0]
    x = np.array([0.9, 0.92, 0.94])
    half = stats.t.ppf(0.975, 2) * x.std(ddof=1) / np.sqrt(3)
    assert row.n_seeds == 3 and row["mean"] == pytest.approx(x.mean())
    assert row.low == pytest.approx(x.mean() - half) and row.high == pytest.approx(x.mean() + half)
    power = heads[heads.metric == "batch_power"]
    # the headline point: the largest batch and the smallest fraction at or above 1 %
    assert set(power.headline_point) == {"n=1000, p=0.02"}
    assert power.iloc[0]["mean"] == pytest.approx(np.mean([0.02, 0.12, 0.22]))
    robust = heads[heads.metric == "robust_accuracy"].iloc[0]
    assert robust["min"] == 0.0 and robust["max"] == pytest.approx(0.02)


def test_other_grid_keys_group_the_intervals(tmp_path):
    for eps in (0.05, 0.1):
        for seed in (0, 1):
            _point(tmp_path, f"eps-{eps}__seed-{seed}", {"seed": seed, "eps": eps}, auroc_shift=eps)
    _point(tmp_path, "eps-0.2__seed-0", {"seed": 0, "eps": 0.2}, auroc_shift=0.01)  # one seed at this ε
    heads = aggregate.headlines(aggregate.collect(tmp_path), ["eps", "seed"])
    auroc = heads[(heads.metric == "auroc") & (heads.detector == "particul")].set_index("eps")
    assert sorted(auroc.index) == [0.05, 0.1, 0.2]
    assert auroc.n_seeds.to_dict() == {0.05: 2, 0.1: 2, 0.2: 1}
    assert auroc.sweep_seeds.to_dict() == {0.05: 2, 0.1: 2, 0.2: 1}  # the seeds run at that ε, not in the whole sweep


def test_one_seed_gives_no_interval(tmp_path):
    _point(tmp_path, "seed-0", {"seed": 0})
    heads = aggregate.headlines(aggregate.collect(tmp_path), ["seed"])
    assert heads.low.isna().all() and (heads.n_seeds == 1).all()


def test_no_sweep_reads_as_none(tmp_path, monkeypatch):
    monkeypatch.setenv("TAMPERBENCH_DATA", str(tmp_path))
    assert aggregate.load_headlines("ci", "seeds") is None


def test_a_pair_only_some_seeds_produced_keeps_its_seeds_and_says_so(tmp_path):
    """A tiny profile can leave one seed without enough examples of an attack for a detector:
    the pair then has fewer seeds than the sweep, named, and no interval from one seed."""
    for seed in (0, 1):
        _point(tmp_path, f"seed-{seed}", {"seed": seed}, auroc_shift=0.01 * seed)
    extra = tmp_path / "seed-0" / "04_detection" / "detection.csv"
    det = pd.read_csv(extra)
    pd.concat([det, det.assign(detector="lid", auroc=0.8).iloc[:1]]).to_csv(extra, index=False)
    heads = aggregate.headlines(aggregate.collect(tmp_path), ["seed"]).set_index(["metric", "detector", "attack"],
                                                                               drop=False)
    lid = heads.loc[("auroc", "lid", "pgd")]
    assert lid.n_seeds == 1 and lid.sweep_seeds == 2 and lid.seeds == "0" and np.isnan(lid.low) and np.isnan(lid.high)
    both = heads.loc[("auroc", "particul", "pgd")]
    assert both.n_seeds == 2 and both.sweep_seeds == 2 and both.seeds == "0 1" and both.low < both["mean"] < both.high


def test_summaries_leave_out_what_only_some_seeds_produced(tmp_path):
    for seed in (0, 1):
        _point(tmp_path, f"seed-{seed}", {"seed": seed}, auroc_shift=0.05 * seed)
    det = pd.read_csv(tmp_path / "seed-1" / "04_detection" / "detection.csv")
    det.iloc[:1].to_csv(tmp_path / "seed-1" / "04_detection" / "detection.csv", index=False)  # seed 1 lacks msp
    heads = aggregate.headlines(aggregate.collect(tmp_path), ["seed"])
    complete, partial = aggregate.split_partial(heads[heads.metric == "auroc"])
    assert list(complete.detector) == ["particul"] and list(partial.detector) == ["msp"]
    assert (complete["max"] - complete["min"]).iloc[0] == pytest.approx(0.05)  # the one-seed 0 spread is not in it
    old = heads.drop(columns=["sweep_seeds", "seeds"])  # a table written before those columns
    assert list(aggregate.split_partial(old[old.metric == "auroc"])[1].detector) == ["msp"]


def test_a_seed_that_wrote_no_row_of_a_metric_still_counts(tmp_path):
    for seed in (0, 1):
        _point(tmp_path, f"seed-{seed}", {"seed": seed})
    (tmp_path / "seed-1" / "07_adaptive" / "robust_at_headline.csv").unlink()  # seed 1 never reached chapter 7's table
    _, heads = aggregate.write(tmp_path, ["seed"])
    robust = heads[heads.metric == "robust_accuracy"].iloc[0]
    assert (robust.n_seeds, robust.sweep_seeds) == (1, 2)  # the completed points say two seeds ran
    assert aggregate.headlines(aggregate.collect(tmp_path), ["seed"]).query("metric == 'robust_accuracy'").sweep_seeds.iloc[0] == 1


def _summary_of(tmp_path, drop_seed1_rows=0):
    for seed in (0, 1):
        _point(tmp_path, f"seed-{seed}", {"seed": seed}, auroc_shift=0.05 * seed)
    path = tmp_path / "seed-1" / "04_detection" / "detection.csv"
    pd.read_csv(path).iloc[drop_seed1_rows:].to_csv(path, index=False)
    return aggregate.seed_summary(aggregate.write(tmp_path, ["seed"])[1])


def test_the_seed_summary_splits_off_partial_pairs(tmp_path):
    s = _summary_of(tmp_path, drop_seed1_rows=1)  # seed 1 lacks particul × pgd
    assert s.n_seeds == 2 and list(s.auroc.detector) == ["msp"] and list(s.partial.detector) == ["particul"]
    assert list(s.per_detector.detector) == ["msp"] and s.auroc.spread.iloc[0] == pytest.approx(0.05)
    assert s.robust_spread == pytest.approx(0.01) and len(s.power)


def test_the_seed_summary_when_no_pair_has_every_seed(tmp_path):
    s = _summary_of(tmp_path, drop_seed1_rows=2)  # seed 1 wrote no AUROC at all
    assert s.n_seeds == 2 and s.auroc.empty and s.per_detector.empty and len(s.partial) == 2


def test_no_sweep_or_one_seed_gives_no_summary(tmp_path):
    assert aggregate.seed_summary(None) is None and aggregate.seed_summary(pd.DataFrame()) is None
    _point(tmp_path, "seed-0", {"seed": 0})
    assert aggregate.seed_summary(aggregate.write(tmp_path, ["seed"])[1]) is None
    old = aggregate.write(tmp_path, ["seed"])[1].assign(n_seeds=2).drop(columns=["sweep_seeds", "seeds"])
    assert aggregate.seed_summary(old).n_seeds == 2  # a table written before sweep_seeds existed
