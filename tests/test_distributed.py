"""The engine under torchrun: 2 gloo processes on CPU, run spec, sharding, rank-0 writes, failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers as H
from conftest import TINY_RUN_CONFIG

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "ddp_worker.py"
CONFIG = TINY_RUN_CONFIG


@pytest.fixture(scope="module")
def demo_split(demo_cache):
    cache, classes = demo_cache
    meta, _ = H.read_cache_meta(cache)
    # 4 subjects: train on 1 (+1 for validation), test on 2; sizes chosen so that the ranks get
    # unequal shares: 29 training images, 3 validation batches of 8 (2 + 1), 5 test batches (3 + 2)
    folds = H.make_folds(meta, "subject", num_folds=2, val_fraction=0.25, seed=0)[:1]
    folds[0]["train"] = folds[0]["train"][:29]
    folds[0]["val"] = folds[0]["val"][:19]
    folds[0]["test"] = folds[0]["test"][:37]
    return cache, classes, folds


def _spec(demo_split, run_dir: Path, **overrides) -> Path:
    cache, classes, folds = demo_split
    return H.write_run_spec(run_dir / "run.json", config={**CONFIG, **overrides}, cache_path=cache,
                            class_names=classes, folds=folds, run_dir=run_dir, run_key="test")


def _torchrun(spec: Path, audit: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    audit.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--audit", str(audit), *extra, "--", "train", "--config", str(spec), "--quiet", "--timeout-s", "60"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_run(demo_split, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_run")
    spec = _spec(demo_split, tmp / "run", model_ema=0.9)  # the weight average too: the same on every rank
    proc = _torchrun(spec, tmp / "audit")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    audits = [json.loads((tmp / "audit" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return spec, audits, json.loads((tmp / "run" / "train_results.json").read_text())


def test_two_processes_record_the_batch_semantics(ddp_run):
    _, _, results = ddp_run
    assert results["world_size"] == 2 and results["backend"] == "gloo"
    assert results["batch_size_per_process"] == 8 and results["global_batch_size"] == 16
    assert results["lr"] == CONFIG["lr"] and results["lr_scaling"] == "none"
    fold = results["folds"][0]
    assert fold["epochs_run"] == 2 and fold["train_images_per_s"] > 0


def test_only_rank_0_writes(ddp_run):
    spec, audits, _ = ddp_run
    run_dir = str(spec.parent)
    written = [{Path(p).name for p in a["writes"] if p.startswith(run_dir)} for a in audits]
    assert {"best_model.pth", "last.pth", "history.json", "train_results.json"} <= written[0]
    assert written[1] == set(), f"rank 1 wrote {written[1]}"


def test_ranks_see_disjoint_shares_of_every_epoch(ddp_run, demo_split):
    _, audits, _ = ddp_run
    n_train = len(demo_split[2][0]["train"])
    for epoch in ("0", "1"):
        a, b = (set(audit["train_indices"][epoch]) for audit in audits)
        assert not a & b
        assert len(a) == len(b) == n_train // 2 and a | b <= set(range(n_train))
    assert audits[0]["train_indices"]["0"] != audits[0]["train_indices"]["1"]  # reshuffled per epoch
    for a, b in zip(audits[0]["eval_indices"], audits[1]["eval_indices"]):  # every evaluation: a partition
        assert not set(a) & set(b) and sorted(a + b) == list(range(len(a) + len(b)))


def test_checkpoint_gives_the_reported_figures_in_one_process(ddp_run):
    spec_path, _, results = ddp_run
    spec = H.read_run_spec(spec_path)
    fold = results["folds"][0]
    history = json.loads((spec_path.parent / "fold_1" / "history.json").read_text())
    for part in ("val", "test"):
        single = H.evaluate_fold(spec, 0, spec_path.parent / "fold_1" / "best_model.pth", part, "cpu")
        assert single["confusion_matrix"] == fold[part]["confusion_matrix"]
        assert single["accuracy"] == pytest.approx(fold[part]["accuracy"], abs=1e-12)
        assert single["ece"] == pytest.approx(fold[part]["ece"], abs=1e-6)  # the probabilities agree too
    # fit's own validation under torchrun (history) = one process on the checkpoint it saved (the weight
    # average's, model_ema), to the loss
    assert H.load_checkpoint(spec_path.parent / "fold_1" / "last.pth")["model_ema"] == 0.9
    best = history[fold["best"]["epoch"] - 1]
    model, _, _ = H.build_classifier(spec["config"], spec["class_names"])
    model.load_state_dict(H.load_checkpoint(spec_path.parent / "fold_1" / "best_model.pth")["model"])
    eval_tf = H.build_transform("eval", 32, **{k: model.data_config()[k] for k in ("mean", "std")}, channels=1)
    loader = H.make_loader(H.H5Dataset(spec["cache_path"], spec["folds"][0]["val"], eval_tf), 8, shuffle=False)
    single = H.evaluate(model, loader, "cpu", H.cross_entropy_loss())
    assert single["acc"] == pytest.approx(best["val_acc"], abs=1e-12) == fold["val"]["accuracy"]
    assert single["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    # The notebook's path on the same spec: the finished fold is loaded, not trained again.
    run = H.train_fold(spec, 0, "cpu", progress=False)
    assert run["epochs_run"] == 2 and run["best"] == fold["best"]


def test_a_failing_rank_ends_every_rank_and_the_run_resumes(demo_split, ddp_run, tmp_path):
    spec = _spec(demo_split, tmp_path / "run", model_ema=0.9)  # ddp_run's settings: its result is the reference
    # rank 1 loads 8 training images an epoch (one full batch of its 14): its 9th, the first of
    # epoch 2, is corrupt, after epoch 1's checkpoint
    proc = _torchrun(spec, tmp_path / "audit", "--fail-rank", "1", "--fail-after", "8",
                     timeout=180)  # a hang fails the test here
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "FloatingPointError" in out and "loss is nan at epoch 2" in out
    assert not (tmp_path / "run" / "train_results.json").exists()
    interrupted = H.load_checkpoint(tmp_path / "run" / "fold_1" / "last.pth")
    assert interrupted["epoch"] == 1
    # Rerun: resumes after epoch 1 and ends where the uninterrupted 2-process run ended.
    proc = _torchrun(spec, tmp_path / "audit2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((tmp_path / "run" / "fold_1" / "history.json").read_text())
    assert resumed[0] == interrupted["history"][0]  # epoch 1 was kept (its timing included), not redone
    whole = json.loads((ddp_run[0].parent / "fold_1" / "history.json").read_text())
    for a, b in zip(resumed, whole, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_sharded_batches_are_the_single_process_batches():
    single = [list(range(s, min(s + 4, 10))) for s in range(0, 10, 4)]
    shards = [H.ShardedBatchSampler(10, 4, rank=r, world_size=2) for r in (0, 1)]
    assert [list(b) for b in shards[0]] == single[0::2] and [list(b) for b in shards[1]] == single[1::2]
    assert [len(s) for s in shards] == [2, 1]
    alone = H.ShardedBatchSampler(3, 4, rank=1, world_size=2)  # more ranks than batches
    assert len(alone) == 0 and len(alone.indices()) == 0


def test_resuming_with_another_process_count_is_refused(tmp_path):
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    data = torch.utils.data.TensorDataset(x, y)
    args = dict(num_epochs=3, lr=1e-2, weight_decay=0.0, device="cpu", progress=False, run_key="k")

    def crash(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        H.fit(torch.nn.Linear(4, 2), H.make_loader(data, 4, True), H.make_loader(data, 8, False), tmp_path,
              on_epoch_end=crash, **args)
    last = H.load_checkpoint(tmp_path / "last.pth")
    assert last["world_size"] == 1
    H.save_checkpoint(tmp_path / "last.pth", **{**last, "world_size": 2})  # as if two processes had trained it
    with pytest.raises(ValueError, match="2 process"):
        H.fit(torch.nn.Linear(4, 2), H.make_loader(data, 4, True), H.make_loader(data, 8, False), tmp_path, **args)


def test_a_bad_run_spec_names_the_file(tmp_path, demo_split):
    bad = tmp_path / "run.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="run.json is not valid JSON"):
        H.read_run_spec(bad)
    spec = json.loads(_spec(demo_split, tmp_path / "r").read_text())
    del spec["config"]["lr"]
    bad.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="lacks config.lr"):
        H.read_run_spec(bad)
    with pytest.raises(ValueError, match="has 1 folds; no fold"):
        H.run_spec(_spec(demo_split, tmp_path / "r"), folds=[2])
    assert np.isfinite(H.get_world_size()) and H.get_rank() == 0 and not H.is_distributed()
