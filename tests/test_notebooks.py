"""Both notebooks, executed headless with the smoke profile, on generated and on real data."""

import json
from pathlib import Path

import h5py
import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

import helpers as H

from conftest import ROOT, SHARED

import sys
sys.path.insert(0, str(ROOT / "scripts"))
from run_notebooks import run_notebook  # noqa: E402


def _run(name, workdir, **params):
    run_notebook(name, workdir / "runs", {"profile": "smoke", "workdir": str(workdir), **params})
    return json.loads((workdir / name / "final_results.json").read_text())


def test_committed_notebooks_have_no_outputs_and_one_parameters_cell():
    for name in ("DFER_GCViT", "GReFEL"):
        nb = nbformat.read(ROOT / f"{name}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), name
        assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1, name


def test_every_parameter_reaches_the_config():
    """A name of the Parameters cell that the Configuration cell's ``resolve_config(profile, ..., dict(...))``
    does not pass as ``name=name`` would be ignored without a word (papermill injects it, nothing reads it)."""
    import ast

    for name in ("DFER_GCViT", "GReFEL"):
        nb = nbformat.read(ROOT / f"{name}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        params = next(c for c in code if "parameters" in c.metadata.get("tags", []))
        names = [t.id for node in ast.parse(params.source).body if isinstance(node, ast.Assign) for t in node.targets]
        calls = [node for c in code for node in ast.walk(ast.parse(c.source))
                 if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "resolve_config"]
        assert len(calls) == 1, name
        profile, _, overrides = calls[0].args
        passed = {kw.arg for kw in overrides.keywords if isinstance(kw.value, ast.Name) and kw.value.id == kw.arg}
        assert profile.id == "profile" and len(names) > 40, name
        assert [n for n in names if n not in passed | {"profile"}] == [], name


def test_paired_scripts_match_the_notebooks():
    import jupytext

    for name in ("DFER_GCViT", "GReFEL"):
        nb = nbformat.read(ROOT / f"{name}.ipynb", as_version=4)
        py = jupytext.read(ROOT / f"{name}.py")
        assert [c.source for c in nb.cells] == [c.source for c in py.cells], f"{name}.py and .ipynb differ: jupytext --sync"


DFER_FILES = ("class_distribution.png", "samples.png", "face_crops.png", "annotations.csv", "best_model.pth",
              "confusion_matrix.png", "performance_summary.png", "training_curve.png", "final_results.json")


def check_dfer_results(r, out, weights="none"):
    """What every DFER_GCViT run must have written, whatever the data."""
    for f in DFER_FILES:
        assert (out / f).stat().st_size > 0, f
    assert r["config"]["profile"] == "smoke" and r["protocol"]["name"] == r["config"]["protocol"]
    folds = r["metrics"]["per_fold"]
    assert len(folds) == r["protocol"]["folds"] >= 1
    for m, sizes in zip(folds, r["protocol"]["sizes"]):
        assert sum(map(sum, m["confusion_matrix"])) == m["num_samples"] == sizes["test"]
        for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "ece"):
            assert 0.0 <= m[k] <= 1.0, k
    agg = r["metrics"]["mean_std"]["accuracy"]
    assert agg["mean"] == pytest.approx(sum(m["accuracy"] for m in folds) / len(folds))
    for m in folds:  # sequence-level figures where the file names give sequences (KMU-FED, the demo)
        seq = m["sequence"]
        if seq is not None:
            assert 0 < seq["num_sequences"] <= m["num_samples"] and 0 <= seq["accuracy_majority_vote"] <= 1
    assert r["model"]["parameters"]["total"] > 1e6 and r["model"]["weights"]["source"] == weights
    assert r["wall_time_s"]["train_total"] > 0 and r["environment"]["torch"]
    assert r["cache"]["fingerprint"] and "rate" in r["face_detection"]
    best = torch.load(out / "best_model.pth", weights_only=True)
    assert best["class_names"] == sorted(r["dataset"]["counts"]) and best["config"]["profile"] == "smoke"
    # the top-level files are copies of the run's own, which names itself
    run_dir = Path(r["run_dir"])
    assert run_dir.parent == out / "runs" and run_dir.name.endswith(r["run_key"]) and best["run_key"] == r["run_key"]
    assert json.loads((run_dir / "final_results.json").read_text()) == r
    export = json.loads((run_dir / "export" / "export_report.json").read_text())
    for name in ("torchscript", "onnx"):
        assert export["formats"][name]["max_abs_diff_vs_pytorch"] <= 1e-4
    assert H.read_onnx_metadata(run_dir / "export" / "model.onnx")["class_names"] == best["class_names"]
    video = json.loads((run_dir / "export" / "video_summary.json").read_text())
    frames = pd.read_csv(run_dir / "export" / "frames.csv")
    assert len(frames) == video["frames"] == r["config"]["video_frames"]


def test_dfer_notebook_on_generated_demo(tmp_path):
    with pytest.raises(Exception, match="optimizer must be one of"):  # stops in the Configuration cell
        _run("DFER_GCViT", tmp_path / "bad", optimizer="lamb")
    r = _run("DFER_GCViT", tmp_path)
    assert r["data"] == "generated demo" and set(r["channels_last"]) == {False}
    check_dfer_results(r, tmp_path / "DFER_GCViT")
    assert r["face_detection"]["frames"] == r["cache"]["report"]["num_source"] > 0
    with h5py.File(r["cache"]["path"]) as f:
        assert f["images"].shape[1:] == (64, 64, 1)
    # Rerun, training "with torchrun" (nproc=2): extraction, boxes, cache and the finished fold
    # are reused by the two processes and by the kernel; same results, nothing trained again.
    (spec,) = (tmp_path / "DFER_GCViT" / "runs").glob("*/run.json")
    last = spec.parent / "fold_1" / "last.pth"
    written = last.stat().st_mtime_ns
    again = _run("DFER_GCViT", tmp_path, nproc=2)
    assert again["cache"]["fingerprint"] == r["cache"]["fingerprint"]
    assert again["metrics"]["per_fold"] == r["metrics"]["per_fold"]
    assert last.stat().st_mtime_ns == written
    cli = json.loads((spec.parent / "train_results.json").read_text())  # what the 2 processes reported
    assert cli["world_size"] == 2
    assert [f["test"]["accuracy"] for f in cli["folds"]] == [m["accuracy"] for m in r["metrics"]["per_fold"]]
    # A seed ensemble: the seed-42 member is that run (reused, not trained again), seed 7 trains; the folds score,
    # deploy and export the mean of the two models' probabilities, from a folder of their own.
    ens = _run("DFER_GCViT", tmp_path, train_seeds=[42, 7])
    check_dfer_results(ens, tmp_path / "DFER_GCViT")
    assert last.stat().st_mtime_ns == written
    members = ens["model"]["members"]
    assert [m["train_seed"] for m in members] == ens["model"]["train_seeds"] == [42, 7]
    assert members[0]["run_dir"] == r["run_dir"] and ens["run_dir"] not in {m["run_dir"] for m in members}
    spec7 = H.read_run_spec(Path(members[1]["run_dir"]) / "run.json")
    assert spec7["config"]["train_seed"] == 7 and spec7["config"]["train_seeds"] is None
    fold = ens["metrics"]["per_fold"][0]
    outs = [H.fold_outputs(H.read_run_spec(Path(m["run_dir"]) / "run.json"), 0,
                           Path(m["run_dir"]) / "fold_1" / "best_model.pth", "test", "cpu") for m in members]
    probs = (outs[0]["probs"] + outs[1]["probs"]) / 2
    assert fold["accuracy"] == pytest.approx(float((probs.argmax(1) == outs[0]["y_true"]).mean()))
    assert [m["accuracy"] for m in fold["members"]] == [r["metrics"]["per_fold"][0]["accuracy"],
                                                        float((outs[1]["y_pred"] == outs[1]["y_true"]).mean())]
    assert ens["metrics"]["val_accuracy_mean_std"]["mean"] == ens["metrics"]["val_per_fold"][0]["accuracy"]
    assert ens["wall_time_s"]["train_total"] == pytest.approx(sum(sum(m["wall_s"]) for m in members))
    # the reused member's training counts with the time it took then, not the moment it took to load
    assert sum(members[0]["epochs_s"]) == pytest.approx(r["wall_time_s"]["epochs_total"])
    assert sum(members[0]["wall_s"]) < sum(members[0]["epochs_s"])
    # its final model is the two as one (H.EnsembleClassifier): not a start for another run's weights
    final = Path(ens["run_dir"]) / "final_model.pth"
    assert H.load_checkpoint(final)["train_seeds"] == [42, 7]
    with pytest.raises(H.WeightsUnavailableError, match="an ensemble of 2 models"):
        H.create_classifier("gcvit_xxtiny", 6, 64, weights=str(final))


def test_dfer_notebook_trains_on_ferplus_and_its_weights_start_a_kmu_run(tmp_path):
    # FER+ through DFER_GCViT: its own splits, crops as they are; then that GCViT initialises
    # a run on (demo) KMU-FED, whose 6-class head replaces the 8-class one.
    fer_zip = H.make_demo_ferplus(tmp_path / "data" / "FERPlus.zip")
    fer = _run("DFER_GCViT", tmp_path / "fer", data_path=str(fer_zip), protocol="given", layer_decay=0.5)
    check_dfer_results(fer, tmp_path / "fer" / "DFER_GCViT")
    assert fer["config"]["layer_decay"] is None  # a fine-tuning setting, turned off (and said) from scratch
    assert fer["dataset"]["layout"].startswith("FERPlus") and fer["dataset"]["pre_cropped"]
    assert fer["face_detection"]["note"] == "images are face crops already"
    assert fer["cache"]["preprocess"]["face_crop"] is False
    assert len(fer["dataset"]["counts"]) == 8 and "contempt" in fer["dataset"]["counts"]
    (sizes,) = fer["protocol"]["sizes"]
    meta = H.read_cache_meta(fer["cache"]["path"])[0]
    assert sizes == {p: int((meta["split"] == p).sum()) for p in ("train", "val", "test")}
    # FER+ pre-training as a step of the KMU-FED run (pretrain_data_path): trained, recorded, and the start of
    # every fold; an unchanged pre-training is then reused
    kmu = _run("DFER_GCViT", tmp_path / "kmu", pretrain_data_path=str(fer_zip), pretrain_epochs=1)
    pre = kmu["pretraining"]
    check_dfer_results(kmu, tmp_path / "kmu" / "DFER_GCViT", weights=pre["checkpoint"])
    assert pre["epochs"] == 1 and pre["class_names"] == sorted(fer["dataset"]["counts"])
    assert pre["sizes"]["test"] == pre["test"]["num_samples"] > 0 and 0 <= pre["test"]["accuracy"] <= 1
    assert pre["sha256"] == H.file_sha256(pre["checkpoint"]) == kmu["model"]["weights"]["sha256"]
    info = kmu["model"]["weights"]
    assert info["head_reset"] and not info["unexpected_keys"]
    assert all(k.startswith("head.") for k in info["missing_keys"]) and len(info["missing_keys"]) == 2
    last = Path(pre["run_dir"]) / "fold_1" / "last.pth"
    written = last.stat().st_mtime_ns
    # reused too by a run whose folds freeze early stages: the pre-training from scratch trains every layer
    again = _run("DFER_GCViT", tmp_path / "kmu", pretrain_data_path=str(fer_zip), pretrain_epochs=1,
                 finetune="partial", frozen_stages=1)
    assert again["pretraining"]["sha256"] == pre["sha256"] and last.stat().st_mtime_ns == written
    assert again["pretraining"]["epochs_s"] == pre["epochs_s"] > again["pretraining"]["wall_s"]  # its training's time
    assert again["config"]["finetune"] == "partial" and again["run_dir"] != kmu["run_dir"]
    assert H.load_checkpoint(last)["config"]["finetune"] == "full"
    # a run that changes only its own recipe (augmentation, the pre-training's pinned by pretrain_augment; layer-wise
    # lr decay, the weight average, mixup / CutMix, SGD and flip TTA, which fine-tuning uses and training from scratch
    # does not) reuses it
    nir = _run("DFER_GCViT", tmp_path / "kmu", pretrain_data_path=str(fer_zip), pretrain_epochs=1, augment="nir",
               pretrain_augment="seed", layer_decay=0.5, model_ema=0.9, tta_flip=True, mixup=0.2, cutmix=1.0,
               optimizer="sgd")
    assert nir["pretraining"]["sha256"] == pre["sha256"] and last.stat().st_mtime_ns == written
    assert nir["config"]["augment"] == "nir" and nir["run_dir"] != kmu["run_dir"]
    fold_last = H.load_checkpoint(Path(nir["run_dir"]) / "fold_1" / "last.pth")
    assert fold_last["model_ema"] == 0.9 and fold_last["ema"].keys() == fold_last["model"].keys()
    assert nir["config"]["model_ema"] == 0.9 and kmu["config"]["model_ema"] is None
    assert (fold_last["mixup"], fold_last["cutmix"]) == (0.2, 1.0)  # the folds mixed their batches,
    assert (H.load_checkpoint(last)["mixup"], H.load_checkpoint(last)["cutmix"]) == (0.0, 0.0)  # the pre-training not
    assert fold_last["optimizer_kind"] == "sgd" and H.load_checkpoint(last)["optimizer_kind"] == "adamw"
    # tta_flip validates the folds with TTA too (one view beside it); the pre-training stayed one view
    assert fold_last["val_tta_flip"] and all("val_acc_single" in row for row in fold_last["history"])
    assert not H.load_checkpoint(last).get("val_tta_flip", False)
    assert "single_view_accuracy" in nir["metrics"]["per_fold"][0]
    groups = fold_last["optimizer"]["param_groups"]
    scales = {g["lr_scale"] for g in groups}
    assert scales == {1.0, 0.5, 0.25, 0.125, 0.0625}  # gcvit_xxtiny: head and top stage, 3 stages below, the stem
    # another pre-training batch is another pre-training (keyed, recorded); the folds keep the run's batch
    big = _run("DFER_GCViT", tmp_path / "kmu", pretrain_data_path=str(fer_zip), pretrain_epochs=1, pretrain_batch_size=32)
    assert big["pretraining"]["batch_size"] == 32 and pre["batch_size"] == kmu["config"]["batch_size"] == 16
    assert big["pretraining"]["run_dir"] != pre["run_dir"] and last.stat().st_mtime_ns == written
    assert H.load_checkpoint(Path(big["pretraining"]["run_dir"]) / "fold_1" / "last.pth")["config"]["batch_size"] == 32
    assert big["config"]["batch_size"] == 16 and big["model"]["weights"]["sha256"] == big["pretraining"]["sha256"]


GREFEL_FILES = ("class_distribution.png", "samples.png", "training_curve.png", "confusion_matrix.png",
                "reliability_diagram.png", "confidence_distribution.png", "best_model.pth", "final_results.json")


def check_grefel_results(r, out):
    for f in GREFEL_FILES:
        assert (out / f).stat().st_size > 0, f
    m = r["metrics"]
    assert sum(map(sum, m["test"]["confusion_matrix"])) == m["test"]["num_samples"] == r["dataset"]["used"]["test"]
    for k in ("accuracy", "f1_macro", "ece"):
        assert 0 <= m["test"][k] <= 1
    rb = m["reliability_balancing"]
    assert 0 <= rb["share_changed"] <= 1 and rb["accuracy_with"] == pytest.approx(m["test"]["accuracy"])
    # temperature scaling changes confidences, never the predicted class (fitted by value in test_faces_augment_metrics)
    assert m["temperature"] > 0 and m["test"]["accuracy"] == m["test_uncalibrated"]["accuracy"]
    paper = m["test_ferplus_paper_protocol"]  # the FERPlus paper's clear-majority subset (by value: test_faces_augment_metrics)
    if r["dataset"]["ferplus"]:
        meta, _ = H.read_cache_meta(r["cache"]["path"])
        votes = H.read_cache_votes(r["cache"]["path"], np.flatnonzero(meta["split"].to_numpy() == "test"))
        assert paper["of"] == m["test"]["num_samples"] and paper["images"] == H.ferplus_paper_subset(votes).sum()
        assert paper["images"] == 0 or 0 <= paper["accuracy"] <= 1
    else:
        assert paper is None
    assert m["test"]["confusion_matrix"] == m["test_uncalibrated"]["confusion_matrix"]
    # logit adjustment: tau chosen on validation from the grid; at tau = 0 it would be the headline itself
    la = m["logit_adjusted"]
    assert la["tau"] in [g["tau"] for g in la["grid"]] and la["val_f1_macro"] == max(g["f1_macro"] for g in la["grid"])
    assert la["test"]["num_samples"] == m["test"]["num_samples"] and sum(la["train_prior"]) == pytest.approx(1)
    if la["tau"] == 0:
        assert la["test"]["confusion_matrix"] == m["test"]["confusion_matrix"]
    assert r["landmarks"]["ok"] + r["landmarks"]["failed"] == r["cache"]["report"]["num_cached"]
    best = torch.load(out / "best_model.pth", weights_only=True)
    assert best["temperature"] == m["temperature"] and best["class_names"] == list(H.FERPLUS_CLASSES)
    # the top-level files are copies of the run's own, which names itself
    run_dir = Path(r["run_dir"])
    assert run_dir.parent == out / "runs" and run_dir.name.endswith(r["run_key"]) and best["run_key"] == r["run_key"]
    assert json.loads((run_dir / "final_results.json").read_text()) == r
    assert (run_dir / "confusion_matrix.png").read_bytes() == (out / "confusion_matrix.png").read_bytes()
    export = json.loads((run_dir / "export" / "export_report.json").read_text())
    assert max(export["max_abs_diff_vs_pytorch"].values()) <= 1e-4
    assert set(export["max_abs_diff_vs_pytorch"]) == {f"{k}, batch {n}" for k in ("onnx", "torchscript") for n in (1, 16)}
    frames = pd.read_csv(run_dir / "export" / "frames.csv")
    assert len(frames) == json.loads((run_dir / "export" / "video_summary.json").read_text())["frames"] == 30
    faces = frames["face_found"] == 1
    np.testing.assert_allclose(frames.loc[faces, [f"p_{c}" for c in H.FERPLUS_CLASSES]].sum(axis=1), 1, atol=1e-4)
    with h5py.File(r["cache"]["path"]) as f:
        assert f["landmarks"].shape == (f["images"].shape[0], 68, 2)
        assert f["votes"].shape == (f["images"].shape[0], 10)


def test_grefel_notebook_on_generated_demo(tmp_path):
    """The demo FER+ trained on its vote distributions, from the GPU data path (asked for: on a CPU here;
    the batched recipe moves the landmarks and the soft targets come along), at another batch size with
    a learning-rate rule, in channels-last order, with a moving average of the weights, the epoch kept by
    validation macro F1."""
    r = _run("GReFEL", tmp_path, soft_labels=True, data_on_device=True, batch_size=16, lr_scaling="linear",
             channels_last=True, model_ema=0.9, monitor="val_f1_macro", detach_branches=True)
    assert r["data"] == "generated demo" and r["channels_last"] is True
    last = H.load_checkpoint(Path(r["run_dir"]) / "last.pth")  # the average validated and kept, the live weights beside
    assert last["model_ema"] == 0.9 and last["ema"].keys() == last["model"].keys()
    assert r["training_data"] == {"on_device": True, "why": "data_on_device=True"}
    history = json.loads((Path(r["run_dir"]) / "history.json").read_text())
    f1s = [h["val_f1_macro"] for h in history]
    assert r["model"]["best"] == {"epoch": f1s.index(max(f1s)) + 1, "metric": "val_f1_macro", "value": max(f1s)}
    # half the profile's batch (32), linear rule: half its lr (1e-3), recorded
    assert r["config"]["lr_reference_batch"] == 32 and r["lr_effective"] == pytest.approx(5e-4)
    check_grefel_results(r, tmp_path / "GReFEL")
    # the backbone row in the same working directory, with another label smoothing and layout: the ablation
    # table lists both runs, this run's recipe first; the other's recipe differences (not its layout) by its values
    b = _run("GReFEL", tmp_path, data_on_device=True, batch_size=16, lr_scaling="linear",
             model_ema=0.9, monitor="val_f1_macro", components="backbone", label_smoothing=0.0, tta_shift=2,
             optimizer="sgd", time_budget_min=1e-4)
    assert H.load_checkpoint(Path(b["run_dir"]) / "last.pth")["optimizer_kind"] == "sgd"
    # a budget of 6 ms: the first epoch is over it, so the plan ends the run there (the profile asked for 2)
    history = json.loads((Path(b["run_dir"]) / "history.json").read_text())
    assert b["model"]["epochs_run"] == b["model"]["planned_epochs"] == 1 == len(history)
    assert b["model"]["time_budget_s"] == pytest.approx(0.006) and history[0]["planned_epochs"] == 1
    assert b["config"]["soft_labels"] is True  # the profile's "auto": FER+ has votes, so they are the targets
    m = b["metrics"]  # the mirror pair and four shifts of 2 px: 10 views, the mirror pair alone on record beside
    assert m["tta_views"] == 10 and m["tta_shift"] == 2 and 0 <= m["accuracy_flip_only"] <= 1
    table = pd.read_csv(tmp_path / "GReFEL" / "ablation.csv", keep_default_na=False)
    assert list(table["components"]) == ["backbone", "full"]
    assert list(table["other settings"]) == ["", "detach_branches=True, label_smoothing=0.1, optimizer='adamw', time_budget_min=None, tta_shift=0"]
    assert list(table["run"]) == [Path(b["run_dir"]).name, Path(r["run_dir"]).name]


def test_grefel_notebook_on_whole_frames_without_votes_or_splits(demo_kmu_zip, tmp_path):
    """Any labelled dataset, not only FER+: KMU-FED-style whole frames in class folders get their faces
    detected, then landmarks; one stratified random split; soft labels (FER+'s votes) are refused. Trained
    with the "shift" recipe (an unknown one stops before the data work)."""
    with pytest.raises(Exception, match="augment must be 'grefel' or 'shift', not 'heavy'"):
        _run("GReFEL", tmp_path / "bad", data_path=str(demo_kmu_zip), augment="heavy")
    with pytest.raises(Exception, match="model_ema must be in \\(0, 1\\)"):
        _run("GReFEL", tmp_path / "bad", data_path=str(demo_kmu_zip), model_ema=1.0)
    with pytest.raises(Exception, match="optimizer must be one of"):
        _run("GReFEL", tmp_path / "bad", data_path=str(demo_kmu_zip), optimizer="adam")
    with pytest.raises(Exception, match="cutmix must be a Beta"):
        _run("GReFEL", tmp_path / "bad", data_path=str(demo_kmu_zip), cutmix=-1.0)
    with pytest.raises(Exception, match="monitor must be one of 'val_acc', 'val_f1_macro', 'val_loss', not 'f1'"):
        _run("GReFEL", tmp_path / "bad", data_path=str(demo_kmu_zip), monitor="f1")
    with pytest.raises(Exception, match="tta_shift must be a whole number of pixels from 0 to"):
        _run("GReFEL", tmp_path / "bad", data_path=str(demo_kmu_zip), tta_shift=-2)
    with pytest.raises(Exception, match="class_weighted must be True"):
        _run("GReFEL", tmp_path / "bad", data_path=str(demo_kmu_zip), class_weighted="sqrt")
    with pytest.raises(Exception, match="logit_adjusted_loss must be a number >= 0"):
        _run("GReFEL", tmp_path / "bad", data_path=str(demo_kmu_zip), logit_adjusted_loss=-1.0)
    with pytest.raises(Exception, match="soft_labels must be True, False or 'auto', not 'yes'"):
        _run("GReFEL", tmp_path / "bad", data_path=str(demo_kmu_zip), soft_labels="yes")
    with pytest.raises(Exception, match="time_budget_min must be a positive number of minutes or None, not 0"):
        _run("GReFEL", tmp_path / "bad", data_path=str(demo_kmu_zip), time_budget_min=0)
    with pytest.raises(Exception, match="detach_branches must be True or False, not 'yes'"):
        _run("GReFEL", tmp_path / "bad", data_path=str(demo_kmu_zip), detach_branches="yes")
    assert not (tmp_path / "bad" / "cache").exists()  # all stopped before the data work
    # the rare-class knobs on: square-root class weights and the logit-adjusted NLL train end to end
    r = _run("GReFEL", tmp_path, data_path=str(demo_kmu_zip), video_frames=5, augment="shift", mixup=0.2, cutmix=1.0,
             class_weighted=0.5, logit_adjusted_loss=1.0)
    assert (r["config"]["augment"], r["config"]["class_weighted"], r["config"]["logit_adjusted_loss"]) == ("shift", 0.5, 1.0)
    assert r["config"]["soft_labels"] is False  # the profile's "auto": no votes here, so the labels are the targets
    last = H.load_checkpoint(Path(r["run_dir"]) / "last.pth")  # the landmark model trained on mixed batches
    assert (last["mixup"], last["cutmix"]) == (0.2, 1.0) and r["config"]["mixup"] == 0.2
    d = r["dataset"]
    assert d["ferplus"] is False and d["face_detection"] is True and d["name"] == demo_kmu_zip.name.split(".")[0]
    classes = ["angry", "disgust", "fear", "happy", "sad", "surprise"]
    assert list(d["counts"]["(no split)"]) == classes and all(n > 0 for n in d["counts"]["(no split)"].values())
    assert sum(d["used"].values()) == r["cache"]["report"]["num_cached"] and min(d["used"].values()) > 0
    assert torch.load(tmp_path / "GReFEL" / "best_model.pth", weights_only=True)["class_names"] == classes
    assert len(r["metrics"]["test"]["confusion_matrix"]) == len(classes)
    with h5py.File(r["cache"]["path"]) as f:
        assert "votes" not in f and f["landmarks"].shape == (f["images"].shape[0], 68, 2)
    with pytest.raises(Exception, match="soft_labels=True trains on FER\\+'s annotator votes"):
        _run("GReFEL", tmp_path / "soft", data_path=str(demo_kmu_zip), soft_labels=True)


def test_dfer_notebook_on_real_kmu_fed_subject_protocol_and_ckplus(kmu_zip, ckplus_zip, tmp_path):
    # a seed ensemble of two (the cpu profile's train_seeds is three): each fold's CK+ figure is its two models' mean
    r = _run("DFER_GCViT", tmp_path, data_path=str(kmu_zip), cross_data_path=str(ckplus_zip), max_folds=2,
             train_seeds=[42, 1])
    assert r["data"] == "real" and r["dataset"]["num_images"] == 1106 and r["model"]["train_seeds"] == [42, 1]
    check_dfer_results(r, tmp_path / "DFER_GCViT")
    assert r["face_detection"]["rate"] >= 0.9
    assert r["cache"]["report"]["num_cached"] == r["face_detection"]["frames"]
    # Subject protocol: the folds' test subjects are disjoint from their training subjects.
    meta = H.read_cache_meta(r["cache"]["path"])[0]
    folds = H.make_folds(meta, "subject", num_folds=r["config"]["num_folds"], seed=r["config"]["seed"])[:2]
    assert [{p: len(f[p]) for p in ("train", "val", "test")} for f in folds] == r["protocol"]["sizes"]
    for f in folds:
        train_subjects = set(meta["subject"].to_numpy()[np.concatenate([f["train"], f["val"]])])
        assert not train_subjects & set(meta["subject"].to_numpy()[f["test"]])
    (cross,) = r["cross_dataset"]
    assert cross["classes"] == ["angry", "disgust", "fear", "happy", "sad", "surprise"]
    assert cross["num_samples"] == 981 - 54 and cross["not_shared"] == ["contempt"]  # CK+ without contempt
    assert len(cross["folds"]) == 2 and cross["ensemble"]["num_samples"] == cross["num_samples"]
    # fold 1's figure is its two models averaged: the ensemble of the two scored as separate folds
    spec = H.read_run_spec(Path(r["model"]["members"][0]["run_dir"]) / "run.json")
    apart = H.cross_dataset(ckplus_zip, tmp_path, spec, [[Path(m["run_dir"]) / "fold_1" / "best_model.pth"]
                                                         for m in r["model"]["members"]], "cpu")
    assert cross["folds"][0] == apart["ensemble"] and apart["folds"][0] != apart["folds"][1]


def test_grefel_notebook_on_real_ferplus_subset(ferplus_zip, tmp_path):
    r = _run("GReFEL", tmp_path, data_path=str(ferplus_zip), max_per_split=100)
    assert r["data"] == "real" and r["dataset"]["splits"] == {"train": 28558, "val": 3579, "test": 3573}
    assert r["cache"]["report"]["num_cached"] == 300 and r["config"]["soft_labels"] is True  # "auto" on FER+
    check_grefel_results(r, tmp_path / "GReFEL")


def test_dfer_notebook_on_a_flat_dot_separated_naming_with_the_subject_protocol(tmp_path):
    """A dataset this project has never seen (JAFFE-style flat TIFFs, subject.CODEn.k.tiff): one
    parameter, label_pattern, gives the classes and the subjects, and the subject protocol runs."""
    from PIL import Image

    from helpers.demo import draw_face, make_subjects

    rng = np.random.default_rng(0)
    people = make_subjects(4, 0)
    codes = {"AN": "angry", "HA": "happy", "SU": "surprise"}
    root, k = tmp_path / "jaffe", 0
    root.mkdir()
    for s, person in zip(("KA", "KL", "KM", "KR"), people):
        for code, emotion in codes.items():
            for n in (1, 2, 3):
                k += 1
                img = draw_face(emotion, person, rng, 96, 96, crop=True)
                Image.fromarray(img).convert("L").save(root / f"{s}.{code}{n}.{k}.tiff")
    others = [H.make_demo_ferplus(tmp_path / "FERPlus.zip"),
              H.make_demo_kmufed(tmp_path / "kmu.zip", num_subjects=2, frames_per_class=2)]
    r = _run("DFER_GCViT", tmp_path, data_path=str(root), protocol="subject", num_folds=4,
             label_pattern=r"^(?P<subject>[A-Z]{2})\.(?P<label>[A-Z]{2})\d+\.\d+$",
             cross_data_path=[str(p) for p in others])
    # cross-dataset on several at once: each over the classes it shares, per fold model and ensembled
    assert [Path(c["source"]).name for c in r["cross_dataset"]] == ["FERPlus.zip", "kmu.zip"]
    for c in r["cross_dataset"]:
        assert c["classes"] == sorted(codes.values()) and len(c["folds"]) == 1
        assert sum(map(sum, c["ensemble"]["confusion_matrix"])) == c["num_samples"] > 0
    assert r["dataset"]["num_subjects"] == 4 and sorted(r["dataset"]["counts"]) == sorted(codes.values())
    assert "label_pattern" in r["dataset"]["layout"] and r["protocol"]["name"] == "subject"
    meta = H.read_cache_meta(r["cache"]["path"])[0]
    (fold,) = H.make_folds(meta, "subject", num_folds=4, val_fraction=r["config"]["val_fraction"],
                           seed=r["config"]["seed"])[:1]
    assert not set(meta["subject"][fold["train"]]) & set(meta["subject"][fold["test"]])
