import json

import numpy as np
import pandas as pd
import pytest

from tamperbench import aggregate, config, paths, runner, sweep


# --- grid expansion, names and validation (no task starts) -------------------------------------

def test_grid_expansion_and_command_line_values():
    grid = sweep.parse_grid(["seed=0,1,2", "eps_grid=[[0.1], [0.2]]", "attack_suite.pgd.eps=0.05"])
    assert grid == {"seed": [0, 1, 2], "eps_grid": [[0.1], [0.2]], "attack_suite.pgd.eps": [0.05]}
    points = sweep.expand({"a": [1, 2], "b": ["x", "y"]})
    assert points == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    assert sweep.point_name({"seed": 1}) == "seed-1"
    assert sweep.point_name({"attack_suite.pgd.eps": 0.1, "seed": 2}) == "attack_suite_pgd_eps-0p1__seed-2"
    long = sweep.point_name({"eps_grid": [0.01 * i for i in range(30)]})
    assert len(long) <= 64 and long != sweep.point_name({"eps_grid": [0.02 * i for i in range(30)]})
    with pytest.raises(config.ConfigError, match="key=v1,v2"):
        sweep.parse_grid(["seed"])


@pytest.mark.parametrize("kwargs, message", [
    ({"grid": {"sed": [0, 1]}}, "unknown parameter 'sed'.*valid parameters: .*seed"),
    ({"grid": {"seed": ["a", 1]}}, "point seed-a: parameter 'seed' of .* must be int"),
    ({"grid": {"dataset": ["nope"]}}, "unknown dataset 'nope'; valid choices: .*fashion_mnist"),
    ({"grid": {"seed": []}}, "non-empty list"),
    ({"grid": {"seed": [1, 1]}}, "repeats a value"),
    ({"grid": {"seed": [0]}, "only": ["99_nothing"]}, "unknown notebook '99_nothing'; valid notebooks: 01_classifier"),
    ({"grid": {"seed": [0]}, "profile": "tpu"}, "unknown profile 'tpu'; valid profiles: ci, cpu, gpu"),
    ({"grid": {"seed": [0]}, "cpus_per_point": -1}, "resource num_cpus=-1"),
])
def test_bad_points_fail_before_any_task_starts(kwargs, message, tmp_path, monkeypatch):
    monkeypatch.setenv("TAMPERBENCH_DATA", str(tmp_path))
    with pytest.raises(config.ConfigError, match=message):
        sweep.plan("adhoc", **kwargs)
    assert not (tmp_path / "results").exists()  # nothing was written


def test_an_unknown_sweep_lists_the_configured_ones():
    with pytest.raises(config.ConfigError, match="unknown sweep 'nope'; valid sweeps: seeds"):
        sweep.plan("nope")


def test_the_configured_seed_sweep_and_its_resources():
    p = sweep.plan("seeds")
    assert p.profile == "cpu" and [pt.name for pt in p.points] == ["seed-0", "seed-1", "seed-2"]
    assert p.resources["num_cpus"] >= 1 and "num_gpus" not in p.resources
    assert sweep.plan("seeds", profile="gpu").resources == {"num_cpus": 1, "num_gpus": 1}
    assert p.directory == paths.data_root() / "results" / "cpu" / "sweeps" / "seeds"


def test_points_are_isolated_variants():
    point = paths.results_dir("ci", "04_detection", variant="sweeps/seeds/seed-1")
    assert point == paths.data_root() / "results" / "ci" / "sweeps" / "seeds" / "seed-1" / "04_detection"
    assert paths.results_dir("ci", variant="sweeps/seeds/seed-0") != paths.results_dir("ci", variant="sweeps/seeds/seed-1")
    assert runner._SWEEP_POINT.match("sweeps/seeds/seed-1") and not runner._SWEEP_POINT.match("sweeps/../x")


# --- running: failures, skips (local Ray, cheap stand-in tasks) ---------------------------------

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 2**20)
    yield ray
    ray.shutdown()


def _fake_plan(tmp_path, seeds):
    p = sweep.plan("adhoc", profile="ci", grid={"seed": seeds}, only=["01_classifier"], cpus_per_point=1)
    p.directory = tmp_path / "sweeps" / "adhoc"
    return p


def test_a_failing_point_is_reported_and_the_others_complete(tmp_path, local_ray):
    p = _fake_plan(tmp_path, [0, 1, 2])
    directory = p.directory

    def task(profile, name, point, notebooks, force, data_root):  # pickled by value into the worker
        import json as _json
        import time as _time
        from pathlib import Path as _Path

        if point.values["seed"] == 1:
            raise RuntimeError("boom in point 1")
        rec = {"point": point.name, "values": point.values, "status": "done", "error": "", "run_seconds": 0.01,
               "started": _time.time(), "finished": _time.time() + 0.01, "fingerprints": {}}
        (_Path(directory) / point.name).mkdir(parents=True, exist_ok=True)
        (_Path(directory) / point.name / "point.json").write_text(_json.dumps(rec))
        return rec

    messages = []
    log = sweep.run(p, task=task, log=messages.append)
    assert dict(zip(log.point, log.status)) == {"seed-0": "done", "seed-1": "failed", "seed-2": "done"}
    assert "boom in point 1" in log.set_index("point").error["seed-1"]
    assert any("[3/3]" in m for m in messages) and any("FAILED" in m and "boom" in m for m in messages)
    assert aggregate.read_point(directory / "seed-1")["status"] == "failed"
    assert (directory / "sweep_log.csv").exists() and (directory / aggregate.HEADLINES_FILE).exists()


def test_completed_points_are_skipped_unless_forced(tmp_path, local_ray):
    p = _fake_plan(tmp_path, [0, 1])
    done = p.points[0]
    (p.directory / done.name).mkdir(parents=True)
    (p.directory / done.name / aggregate.POINT_FILE).write_text(json.dumps(
        {"point": done.name, "values": done.values, "status": "done", "fingerprints": p.expected[done.name]}))
    assert sweep.completed(p, done) and not sweep.completed(p, p.points[1])
    ran = []

    def task(profile, name, point, notebooks, force, data_root):
        import time as _time

        return {"point": point.name, "values": point.values, "status": "done", "run_seconds": 0.01,
                "started": _time.time(), "finished": _time.time() + 0.01}

    log = sweep.run(p, task=task, log=ran.append)
    assert dict(zip(log.point, log.status)) == {"seed-0": "skipped", "seed-1": "done"}
    # a point that completed with other code or parameters is not skipped
    stale = json.loads((p.directory / done.name / aggregate.POINT_FILE).read_text())
    stale["fingerprints"] = {"01_classifier": "old"}
    (p.directory / done.name / aggregate.POINT_FILE).write_text(json.dumps(stale))
    assert not sweep.completed(p, done)
    forced = sweep.run(p, task=task, force=True, log=ran.append)
    assert (forced.status == "done").all()


def test_run_point_records_a_failure_without_raising(tmp_path, monkeypatch):
    monkeypatch.setenv("TAMPERBENCH_DATA", str(tmp_path))

    def failing(*args, **kwargs):
        raise runner.NotebookFailed("notebook 01_classifier.md failed (cell 3)")

    monkeypatch.setattr(runner, "run", failing)
    point = sweep.Point("seed-0", {"seed": 0}, {"seed": 0})
    rec = sweep.run_point("ci", "adhoc", point, None, data_root=str(tmp_path))
    assert rec["status"] == "failed" and "cell 3" in rec["error"]
    saved = aggregate.read_point(tmp_path / "results" / "ci" / "sweeps" / "adhoc" / "seed-0")
    assert saved["status"] == "failed"


def test_overhead_is_wall_time_less_the_points_run_time():
    log = pd.DataFrame({"status": ["done", "done"], "run_seconds": [10.0, 10.0], "started": [0.0, 11.0],
                        "finished": [10.5, 21.5], "received": [10.6, 21.6]})
    out = sweep.overhead(log, wall=21.0)
    assert out["sequential"] and out["overhead_seconds"] == pytest.approx(1.0) and out["overhead_share"] == pytest.approx(0.05)


# --- the real thing: a ci-profile sweep over two seeds under local Ray ---------------------------

def _pairs_with_auroc(detection: pd.DataFrame) -> set[tuple[str, str]]:
    finite = detection[np.isfinite(detection.auroc.astype(float))]
    return set(zip(finite.detector, finite.attack))


# chapter 4 cut to what the sweep's checks need (three attacks, one PARTICUL fit, four detectors):
# a point is a whole chapter run, and the second seed retrains and reattacks from scratch
SMALL_CHAPTER_4 = {
    "attack_suite": {"fgsm": {"n": 40, "eps": 0.1}, "bim": {"n": 40, "eps": 0.1, "eps_step": 0.02, "max_iter": 5},
                     "deepfool": {"n": 40, "max_iter": 5}},
    "particul_search": {"layers": ["block2"], "num_parts": [4], "multi_layer": False},
    "unsupervised": ["particul", "msp", "knn"], "supervised": ["lid"], "transfer_attacks": ["fgsm", "bim", "deepfool"],
    "subset_layers": ["block1"], "subset_attacks": ["fgsm"],
}


@pytest.mark.slow
def test_a_ci_seed_sweep_runs_under_local_ray_and_aggregates(ci_book):
    """Two seeds of chapter 4 in the ci profile, each a Ray task writing to its own folder; the
    aggregated AUROC table has both seeds for every (detector, attack) that both produced, with
    an interval, and says which seed produced a pair the other did not. Which pairs a tiny
    profile produces depends on attack outcomes at the margin (a machine's floats can leave an
    attack with too few examples for a detector), so the expectation is read from what each
    seed wrote, never fixed here."""
    p = sweep.plan("test_seeds", profile="ci", grid={"seed": [0, 1]}, overrides=SMALL_CHAPTER_4, only=["04_detection"])
    # after the ci book, so seed 0 reuses its cache (classifier, attacks, PARTICUL block2 P=4)
    main_log = paths.results_dir("ci") / "run_log.csv"
    before = main_log.read_text() if main_log.exists() else None
    messages = []
    log = sweep.run(p, force=True, log=messages.append)
    import ray

    ray.shutdown()
    assert (log.status == "done").all(), log.error.tolist()
    produced = {}
    for seed in (0, 1):
        point = p.directory / f"seed-{seed}"
        det = pd.read_csv(point / "04_detection" / "detection.csv")
        assert (det.seed == seed).all()  # each point wrote its own results
        assert (point / "book" / "04_detection.ipynb").exists() and (point / "run_log.csv").exists()
        produced[seed] = _pairs_with_auroc(det)
    assert (main_log.read_text() if main_log.exists() else None) == before  # the main run is untouched
    table = pd.read_csv(p.directory / "aggregate" / "04_detection" / "detection.csv")
    assert set(table.seed) == {0, 1} and set(table.point) == {"seed-0", "seed-1"}
    heads = pd.read_csv(p.directory / aggregate.HEADLINES_FILE, dtype={"seeds": str})
    auroc = heads[heads.metric == "auroc"].set_index(["detector", "attack"])
    assert set(auroc.index) == produced[0] | produced[1]
    both = produced[0] & produced[1]
    assert both, "the two seeds share no (detector, attack) pair"
    for pair, row in auroc.iterrows():
        seeds = [s for s in (0, 1) if pair in produced[s]]
        assert (row.n_seeds, row.sweep_seeds, row.seeds) == (len(seeds), 2, " ".join(map(str, seeds))), pair
        if len(seeds) == 2:
            assert row.low <= row["mean"] <= row.high, pair
        else:  # one seed: no interval, and the reproduce chapter lists it apart
            assert np.isnan(row.low) and np.isnan(row.high), pair
    assert any("Ray's overhead" in m for m in messages)
    # a rerun skips both points
    again = sweep.run(p, log=messages.append)
    assert (again.status == "skipped").all()
