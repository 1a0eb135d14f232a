from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from core.continual import benchmarks, harness
from core.errors import ConfigError, DataError


def test_metrics_arithmetic() -> None:
    r = [[0.9, 0.1, 0.2],
         [0.7, 0.8, 0.3],
         [0.6, 0.5, 0.9]]
    m = harness.metrics(r, base=[0.1, 0.1, 0.1])
    assert m["average_accuracy"] == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert m["forgetting_per_task"] == pytest.approx([0.9 - 0.6, 0.8 - 0.5])
    assert m["forgetting"] == pytest.approx(0.3)
    assert m["backward_transfer"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert m["forward_transfer"] == pytest.approx(((0.1 - 0.1) + (0.3 - 0.1)) / 2)


def test_permuted_digits_tasks_are_fixed_permutations() -> None:
    b = benchmarks.permuted_digits(n_tasks=3)
    again = benchmarks.permuted_digits(n_tasks=3)
    x0, x1 = b.tasks[0].train[0], b.tasks[1].train[0]
    assert torch.equal(x1, again.tasks[1].train[0])  # seeded: identical across builds
    assert torch.equal(b.tasks[0].train[1], b.tasks[1].train[1])  # same images and labels
    assert not torch.equal(x0, x1) and torch.equal(x0.sort(dim=1).values, x1.sort(dim=1).values)
    n_train, n_eval = len(b.tasks[0].train[1]), len(b.tasks[0].eval[1])
    assert n_train + n_eval == 1797 and n_eval == pytest.approx(0.2 * 1797, abs=1)


def test_short_run_fills_matrix_plots_and_json(tmp_path: Path) -> None:
    b = benchmarks.permuted_digits(n_tasks=3)
    b.epochs, b.batch_size, b.fisher_samples = 2, 128, 128
    b.make_model = lambda: benchmarks.MLP(64, 64, 10)
    res = harness.run(b, "ewc", out_dir=tmp_path, timing=False)
    r = res["accuracy_matrix"]
    assert len(r) == 3 and all(len(row) == 3 for row in r)
    assert all(0.0 <= a <= 1.0 for row in r for a in row)
    assert r[0][0] > 0.5  # the first task is learned (chance is 0.1)
    assert {"average_accuracy", "forgetting", "backward_transfer", "forward_transfer", "joint_accuracy",
            "naive_average_accuracy"} <= set(res)
    assert res["joint_accuracy"] > 0.5
    for p in res["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(res["json_path"]).read_text())["accuracy_matrix"] == r


def test_lora_method_has_zero_forgetting() -> None:
    b = benchmarks.permuted_digits(n_tasks=3)
    b.epochs, b.batch_size, b.lora_rank = 2, 128, 8
    b.make_model = lambda: benchmarks.MLP(64, 64, 10)
    r, _ = harness.train_sequence(b, "lora")
    assert r[1][0] == r[2][0] == r[0][0]  # task 0 runs on the frozen base: bit-identical predictions
    assert r[2][1] == r[1][1]


def test_step_time_ratio_times_a_trained_run_as_it_is() -> None:
    """``trained=(model, hook)``: the timing uses that hook's Fisher (no new consolidation on a fresh
    model) and leaves the trained model and hook untouched."""
    b = benchmarks.permuted_digits(n_tasks=3)
    b.make_model = lambda: benchmarks.MLP(64, 32, 10)
    b.epochs = 1
    kept: dict = {}
    harness.train_sequence(dataclasses.replace(b, tasks=b.tasks[:2]), "ewc", keep=kept)
    model, ewc = kept["model"], kept["hooks"][0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tasks = list(ewc.fishers)
    assert len(tasks) == 2
    out = harness.step_time_ratio(b, "separate", rounds=2, steps=2, trained=(model, ewc))
    assert out["ewc_timing_fisher"] == "trained run" and out["ewc_step_time_ratio"] > 0
    assert list(ewc.fishers) == tasks  # not re-consolidated on the benchmark's 3 tasks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fresh = harness.step_time_ratio(b, "separate", rounds=2, steps=2)
    assert fresh["ewc_timing_fisher"] == "fresh model, 64 samples"


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(ConfigError):
        harness.train_sequence(benchmarks.permuted_digits(n_tasks=2), "distill")


@pytest.fixture
def small_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI path end to end, on a 64-wide MLP and a short timing loop (the suite stays fast)."""
    load, timing = benchmarks.load, harness.step_time_ratio

    def small_load(name: str, **kw: object) -> benchmarks.Benchmark:
        b = load(name, **kw)
        b.make_model = lambda: benchmarks.MLP(64, 64, 10)
        b.fisher_samples = 64
        return b

    monkeypatch.setattr(benchmarks, "load", small_load)
    monkeypatch.setattr(harness, "step_time_ratio", lambda *a, **k: timing(*a, **{**k, "rounds": 2, "steps": 4}))


def test_cli_continual_eval_prints_json_last(tmp_path: Path, tmp_home: Path, small_cli: None) -> None:
    from core.cli import app

    res = CliRunner().invoke(app, ["core", "continual-eval", "--benchmark", "permuted-digits", "--method",
                                   "online-ewc", "--tasks", "2", "--epochs", "1", "--json",
                                   "--ewc-fisher", "empirical_per_sample", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "permuted-digits" and out["method"] == "online-ewc"
    assert len(out["accuracy_matrix"]) == 2
    assert out["ewc_step_time_ratio"] > 0 and out["ewc_apply"] == "grad"
    assert out["ewc_timing_fisher"] == "trained run"  # timed on the run's own model and Fisher
    assert {"ewc_grad_step_time_ratio", "ewc_loss_step_time_ratio", "ewc_prox_step_time_ratio"} <= set(out)
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_cli_rejects_unknown_benchmark(tmp_home: Path) -> None:
    from core.cli import main

    with pytest.raises(SystemExit) as e:
        main(["core", "continual-eval", "--benchmark", "mnist", "--json"])
    assert e.value.code == 2


def test_intents_readers_report_bad_files(tmp_path: Path) -> None:
    root = tmp_path / "customer_service"
    with pytest.raises(DataError, match="Banking77 not found"):
        benchmarks.intents(data_root=tmp_path)
    (root / "banking77").mkdir(parents=True)
    (root / "banking77" / "train.csv").write_text("wrong,header\nx,y\n")
    with pytest.raises(DataError, match="text,category"):
        benchmarks._read_banking77(root)
    (root / "dstc11" / "development").mkdir(parents=True)
    (root / "dstc11" / "development" / "test-utterances.jsonl").write_text('{"utterance": "hi"}\n')
    with pytest.raises(DataError, match="line 1"):
        benchmarks._read_dstc11(root)


def test_intents_readers_on_real_data(shared_data: Path) -> None:
    root = shared_data / "customer_service"
    texts, labels = benchmarks._read_dstc11(root)
    assert len(texts) == len(labels) > 800 and len(set(labels)) == 22
    keep = benchmarks._per_class(labels, 5, seed=0)
    assert max(sum(1 for i in keep if labels[i] == c) for c in set(labels)) == 5


@pytest.mark.slow
def test_full_permuted_digits_ewc_beats_naive(tmp_path: Path) -> None:
    res = harness.run(benchmarks.permuted_digits(), "ewc", out_dir=tmp_path)
    assert res["average_accuracy"] > res["naive_average_accuracy"] + 0.2
    assert res["forgetting"] < res["naive_forgetting"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ewc", "lora"])
def test_full_intents_protects_task_one(method: str, tmp_path: Path, shared_data: Path) -> None:
    res = harness.run(benchmarks.intents(data_root=shared_data), method, out_dir=tmp_path, timing=False)
    assert res["forgetting_per_task"][0] < res["naive_forgetting_per_task"][0]
    assert res["forgetting_per_task"][0] <= 0.03


def _fake_tiles(root: Path, per_setup: int = 6) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    tile = root / "industrial" / "magnetic_tile"
    for k, exp in enumerate(["exp1", "exp3", "exp5"]):
        for i in range(per_setup):
            for folder, defect in (("train/good", False), ("test/good", False), ("test/crack", True)):
                img = rng.integers(90, 110, (40 + 3 * k, 50), dtype=np.uint8)
                if defect:
                    img[10:20, 5:45] = 0  # a dark band
                (tile / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(tile / folder / f"{exp}_num_{i}.jpg")
    return root


def test_defects_benchmark_groups_setups_and_scores_balanced(tmp_path: Path, tmp_home: Path) -> None:
    root = _fake_tiles(tmp_path, per_setup=10)
    b = benchmarks.defects(data_root=root, size=16)
    assert [t.name for t in b.tasks] == ["setup-a", "setup-b", "setup-c"] and b.metric == "balanced_accuracy"
    for k, t in enumerate(b.tasks):
        assert t.train[0].shape[1] == 16 * 16 and bool((t.train[2] == k).all())
        assert len(t.eval[1]) == 6 and set(t.eval[1].tolist()) == {0, 1}
        assert int((t.train[1] == 0).sum()) == int((t.train[1] == 1).sum()) == 16  # defects repeated to balance
        assert 0.0 <= float(t.train[0].min()) and float(t.train[0].max()) <= 1.0
    again = benchmarks.defects(data_root=root, size=16)  # second build reads the cache: same tensors
    assert torch.equal(again.tasks[1].train[0], b.tasks[1].train[0])
    b.epochs = 3
    r, _ = harness.train_sequence(b, "ewc")
    assert len(r) == 3 and all(0.0 <= a <= 1.0 for row in r for a in row)


def test_balanced_accuracy_weights_classes_equally() -> None:
    y = torch.tensor([0] * 8 + [1] * 2)
    task = benchmarks.Task("t", (torch.zeros(10, 1), y, torch.zeros(10, dtype=torch.int64)),
                           (torch.zeros(10, 1), y, torch.zeros(10, dtype=torch.int64)), 2)
    always_good = nn.Linear(1, 2)
    with torch.no_grad():
        always_good.weight.zero_()
        always_good.bias.copy_(torch.tensor([1.0, 0.0]))
    model = type("M", (nn.Module,), {"forward": lambda self, x, t: always_good(x)})()
    assert harness.accuracy(model, task) == pytest.approx(0.8)
    assert harness.accuracy(model, task, metric="balanced_accuracy") == pytest.approx(0.5)


def test_defects_missing_data_is_a_clear_error(tmp_path: Path, tmp_home: Path) -> None:
    with pytest.raises(DataError, match="MVTec layout"):
        benchmarks.defects(data_root=tmp_path)


def test_sgd_optimizer_option() -> None:
    model = nn.Linear(3, 2)
    tr = harness.make_trainer(model, lr=0.05, optimizer="sgd")
    assert isinstance(tr.optimizer, torch.optim.SGD) and tr.optimizer.param_groups[0]["lr"] == 0.05
    with pytest.raises(ConfigError):
        harness.make_trainer(model, lr=0.05, optimizer="lbfgs")


def test_cli_several_methods_share_one_reference(tmp_path: Path, tmp_home: Path, small_cli: None) -> None:
    from core.cli import app

    res = CliRunner().invoke(app, ["core", "continual-eval", "--benchmark", "permuted-digits", "--method",
                                   "naive,lora", "--tasks", "2", "--epochs", "1", "--json", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.strip().splitlines() if line.startswith("{")]
    assert [o["method"] for o in lines] == ["naive", "lora"]
    assert lines[0]["joint_accuracy"] == lines[1]["joint_accuracy"]
    # the shared naive reference is the naive run itself: same seed, same batches
    assert lines[0]["naive_average_accuracy"] == lines[0]["average_accuracy"]
    assert len(list(tmp_path.glob("*.png"))) == 4
    bad = CliRunner().invoke(app, ["core", "continual-eval", "--method", "ewc,distill", "--json"])
    assert bad.exit_code != 0


@pytest.mark.parametrize("method", ["ewc+replay", "online-ewc+replay"])
def test_ewc_plus_replay_combination_uses_both_hooks(method: str) -> None:
    from core.continual.ewc import EWC
    from core.continual.replay import Replay

    b = benchmarks.permuted_digits(n_tasks=2)
    hooks = harness._hooks(b, method, seed=0)
    assert [type(h) for h in hooks] == [EWC, Replay]
    assert hooks[0].mode == ("online" if method.startswith("online") else "separate")
    assert hooks[1].buffer.capacity == b.replay_capacity
    assert hooks[0].lam == b.replay_ewc_lambda != b.ewc_lambda  # the combination's own lambda
    assert harness._hooks(b, method.removesuffix("+replay"), seed=0)[0].lam == b.ewc_lambda
    reported = harness.method_settings(b, method)  # what the JSON says it ran with
    assert reported["ewc_lambda"] == hooks[0].lam and reported["replay_capacity"] == b.replay_capacity
    b.epochs, b.batch_size, b.fisher_samples = 3, 64, 64
    b.make_model = lambda: benchmarks.MLP(64, 64, 10)
    r, _ = harness.train_sequence(b, method)
    assert len(r) == 2 and r[0][0] > 0.3  # trains (chance is 0.1)


def test_validation_slice_comes_from_training_data_only() -> None:
    b = benchmarks.permuted_digits(n_tasks=2)
    v = benchmarks.validation(b)
    for task, vt in zip(b.tasks, v.tasks, strict=True):
        n = len(task.train[1])
        assert len(vt.train[1]) + len(vt.eval[1]) == n
        assert len(vt.eval[1]) == pytest.approx(0.2 * n, abs=1)
        rows = {tuple(r.tolist()) for r in task.train[0]}
        assert all(tuple(r.tolist()) in rows for r in vt.eval[0])  # every validation image is a training image
        # stratified: every class in both parts
        assert set(vt.eval[1].tolist()) == set(vt.train[1].tolist()) == set(range(10))
    # permuted tasks share the slice (the same images): labels line up across tasks
    assert torch.equal(v.tasks[0].eval[1], v.tasks[1].eval[1])
    assert "VALIDATION" in v.notes["eval_set"] and b.tasks[0].eval[0] is not v.tasks[0].eval[0]


def test_cli_validation_slice_with_kfac(tmp_path: Path, tmp_home: Path, small_cli: None) -> None:
    from core.cli import app

    res = CliRunner().invoke(app, ["core", "continual-eval", "--benchmark", "permuted-digits", "--method",
                                   "ewc", "--tasks", "2", "--epochs", "1", "--json", "--validation",
                                   "--ewc-fisher", "kfac", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["settings"]["ewc_fisher"] == "kfac" and "VALIDATION" in out["notes"]["eval_set"]
    assert out["ewc_step_time_ratio"] > 0 and "ewc_loss_path_step_time_ratio" in out
    assert "ewc_prox_step_time_ratio" not in out  # no proximal step for the Kronecker penalty
    bad = CliRunner().invoke(app, ["core", "continual-eval", "--ewc-fisher", "fancy", "--json"])
    assert bad.exit_code != 0
