"""bench/dfer_ensemble.py: DFER_GCViT runs on the same folds averaged fold by fold, by the recipe's own evaluation;
the run spec's guard against a cache rebuilt under its folds; train_seed."""

import shutil

import h5py
import numpy as np
import pytest
import torch

import helpers as H
from conftest import TINY_RUN_CONFIG, load_bench

CONFIG = {**TINY_RUN_CONFIG, "dropout": 0.0, "num_epochs": 1, "amp": "off", "seed": 0}


@pytest.fixture(scope="module")
def folds(demo_cache):
    cache, classes = demo_cache
    meta, _ = H.read_cache_meta(cache)
    return H.make_folds(meta, "subject", num_folds=2, val_fraction=0.25, seed=0)


def _run(tmp_path, demo_cache, folds, name: str, seed: int, **overrides):
    """A run folder as the notebook writes it (run.json, fold_k/best_model.pth), with untrained models of ``seed``."""
    cache, classes = demo_cache
    config = {**CONFIG, **overrides}
    run_dir = tmp_path / name
    H.write_run_spec(run_dir / "run.json", config=config, cache_path=cache, class_names=classes, folds=folds,
                     run_dir=run_dir, run_key=name)
    for k in range(len(folds)):
        torch.manual_seed(seed + k)
        model, _, _ = H.build_classifier(config, classes)
        H.save_checkpoint(run_dir / f"fold_{k + 1}" / "best_model.pth", model=model.state_dict())
    return run_dir


def test_ensemble_averages_the_members_probabilities_fold_by_fold(demo_cache, folds, tmp_path):
    bench = load_bench("dfer_ensemble")
    runs = [_run(tmp_path, demo_cache, folds, "a", 0), _run(tmp_path, demo_cache, folds, "b", 10, tta_flip=True)]
    out = bench.ensemble([str(r) for r in runs], "test")
    classes = demo_cache[1]
    assert [f["fold"] for f in out["folds"]] == [1, 2]
    for k, fold in enumerate(out["folds"]):
        specs = [H.read_run_spec(r / "run.json") for r in runs]
        outs = [H.fold_outputs(s, k, r / f"fold_{k + 1}" / "best_model.pth", "test", "cpu") for s, r in zip(specs, runs)]
        probs = (outs[0]["probs"] + outs[1]["probs"]) / 2  # member b with its own flip TTA
        y = outs[0]["y_true"]
        assert fold["images"] == len(y) == len(folds[k]["test"])
        assert fold["ensemble"]["accuracy"] == pytest.approx(float((probs.argmax(1) == y).mean()))
        assert fold["ensemble"]["f1_macro"] == pytest.approx(H.macro_f1(y, probs.argmax(1), len(classes)))
        # the probabilities themselves, not only their argmax: the NLL of the mean, unlike either member's
        nll = -np.mean(np.log(probs[np.arange(len(y)), y]))
        assert fold["ensemble"]["nll"] == pytest.approx(nll, rel=1e-5)
        assert all(abs(nll + np.mean(np.log(o["probs"][np.arange(len(y)), y]))) > 1e-4 for o in outs)
        for m, o in zip(fold["members"], outs):
            assert m["accuracy"] == pytest.approx(float((o["probs"].argmax(1) == y).mean()))
        assert fold["members"][0]["accuracy"] == pytest.approx(
            H.evaluate_fold(specs[0], k, runs[0] / f"fold_{k + 1}" / "best_model.pth", "test", "cpu")["accuracy"])
    accs = [f["ensemble"]["accuracy"] for f in out["folds"]]
    assert out["ensemble_mean"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert out["ensemble_mean"]["accuracy"]["std"] == pytest.approx(np.std(accs))  # the notebook's tables' std


def test_ensemble_refuses_runs_on_other_folds_or_classes_and_unfinished_runs(demo_cache, folds, tmp_path):
    bench = load_bench("dfer_ensemble")
    a = _run(tmp_path, demo_cache, folds, "a", 0)
    swapped = _run(tmp_path, demo_cache, folds[::-1], "swapped", 1)  # the same images, other folds
    with pytest.raises(SystemExit, match="fold 1's test images differ"):
        bench.ensemble([str(a), str(swapped)])
    cache, classes = demo_cache
    other = tmp_path / "other"
    H.write_run_spec(other / "run.json", config=CONFIG, cache_path=cache, class_names=classes[::-1], folds=folds,
                     run_dir=other, run_key="other")
    with pytest.raises(SystemExit, match="classes .* differ"):
        bench.ensemble([str(a), str(other)])
    unfinished = _run(tmp_path, demo_cache, folds, "unfinished", 2)
    (unfinished / "fold_2" / "best_model.pth").unlink()
    with pytest.raises(SystemExit, match="has not finished fold 2"):
        bench.ensemble([str(a), str(unfinished)])
    with pytest.raises(SystemExit, match="at least two"):
        bench.ensemble([str(a)])


def test_train_seed_trains_the_same_folds_again_with_other_weights(demo_cache, folds, tmp_path):
    cache, classes = demo_cache
    small = [{p: f[p][:16] for p in ("train", "val", "test")} for f in folds[:1]]

    def trained(name, **overrides):
        run_dir = tmp_path / name
        spec = H.read_run_spec(H.write_run_spec(run_dir / "run.json", config={**CONFIG, **overrides}, cache_path=cache,
                                                class_names=classes, folds=small, run_dir=run_dir, run_key=name))
        H.train_fold(spec, 0, "cpu", progress=False)
        return H.load_checkpoint(run_dir / "fold_1" / "last.pth")["model"]

    default, same, other = trained("default"), trained("same", train_seed=CONFIG["seed"]), trained("other", train_seed=7)
    assert all(torch.equal(default[k], same[k]) for k in default)  # train_seed = seed: the default run, exactly
    assert any(not torch.equal(default[k], other[k]) for k in default)
    assert H.training_seed({"seed": 3, "train_seed": None}) == 3 and H.training_seed({"seed": 3, "train_seed": 0}) == 0


def test_a_cache_rebuilt_since_the_run_spec_stops_training_evaluation_and_the_bench(demo_cache, folds, tmp_path):
    cache, classes = demo_cache
    own = tmp_path / "c.h5"
    shutil.copy(cache, own)  # the shared fixture stays as it is
    run = _run(tmp_path, (own, classes), folds, "a", 0)
    other = _run(tmp_path, (own, classes), folds, "b", 1)
    spec = H.read_run_spec(run / "run.json")
    assert spec["cache_fingerprint"] == H.stored_fingerprint(own)
    with h5py.File(own, "a") as f:  # as another run's rebuild with other crop settings leaves it
        f.attrs["fingerprint"] = "0" * 40
    with pytest.raises(ValueError, match=r"c\.h5 was rebuilt since .*a/run\.json was written"):
        H.read_run_spec(run / "run.json")
    with pytest.raises(ValueError, match="was rebuilt since"):
        H.train_fold(spec, 0, "cpu", progress=False)
    with pytest.raises(ValueError, match="was rebuilt since"):
        H.fold_outputs(spec, 0, run / "fold_1" / "best_model.pth", "test", "cpu")
    with pytest.raises(ValueError, match="was rebuilt since"):
        load_bench("dfer_ensemble").ensemble([str(run), str(other)])
    assert not (run / "fold_1" / "history.json").exists()  # nothing trained on the other crops


def test_evaluate_members_is_the_fold_model_or_the_mean_of_its_seeds(demo_cache, folds, tmp_path):
    """The notebook's train_seeds: one member scores exactly as evaluate_fold; several as their mean probability,
    each member's figures beside it."""
    runs = [_run(tmp_path, demo_cache, folds, "a", 0), _run(tmp_path, demo_cache, folds, "b", 10)]
    specs = [H.read_run_spec(r / "run.json") for r in runs]
    paths = [r / "fold_1" / "best_model.pth" for r in runs]
    one = H.evaluate_members(specs[:1], 0, paths[:1], "test", "cpu")
    assert one == H.evaluate_fold(specs[0], 0, paths[0], "test", "cpu") and "members" not in one
    two = H.evaluate_members(specs, 0, paths, "val", "cpu")
    outs = [H.fold_outputs(s, 0, p, "val", "cpu") for s, p in zip(specs, paths)]
    probs = (outs[0]["probs"] + outs[1]["probs"]) / 2
    assert two["accuracy"] == pytest.approx(float((probs.argmax(1) == outs[0]["y_true"]).mean()))
    assert two["num_samples"] == len(folds[0]["val"])
    assert [m["accuracy"] for m in two["members"]] == [H.outputs_metrics(o, demo_cache[1])["accuracy"] for o in outs]
    swapped = H.read_run_spec(_run(tmp_path, demo_cache, folds[::-1], "swapped", 1) / "run.json")  # other folds
    with pytest.raises(ValueError, match="images differ"):
        H.evaluate_members([specs[0], swapped], 0, paths, "test", "cpu")


def test_ensemble_classifier_gives_the_mean_probability_and_exports_as_one_model(tmp_path):
    torch.manual_seed(0)
    members = [H.create_classifier("gcvit_xxtiny", 4, 32)[0].eval() for _ in range(3)]
    ensemble = H.EnsembleClassifier(members).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        mean = torch.stack([m(x).softmax(-1) for m in members]).mean(0)
    probs = H.Backend("torch", ensemble)(x.numpy())
    np.testing.assert_allclose(probs, mean.numpy(), atol=1e-6)  # softmax of its output: the mean, exactly
    meta = H.export_metadata(["a", "b", "c", "d"], {"image_size": 32, "channels": 1}, (0.5,) * 3, (0.5,) * 3)
    onnx = H.export_onnx(ensemble, tmp_path / "e.onnx", (x[:1],), meta)
    np.testing.assert_allclose(H.Backend("onnx", onnx)(x.numpy()), mean.numpy(), atol=1e-5)
    assert ensemble.data_config() == members[0].data_config()
    with pytest.raises(ValueError, match="at least one model"):
        H.EnsembleClassifier([])


def test_train_seeds_checks_and_member_configs():
    for bad in ([], [1, True], "42", [1.5], (3, 3)):
        with pytest.raises(ValueError, match="train_seeds"):
            H.check_train_seeds(bad, None)
    with pytest.raises(ValueError, match="both set"):
        H.check_train_seeds([1, 2], 5)
    H.check_train_seeds([42, 1, 2], None)
    H.check_train_seeds(None, 5)
    config = {"seed": 42, "train_seed": None, "train_seeds": [42, 1, 2], "lr": 1e-3}
    members = H.member_configs(config)
    # the run's own seed is the run train_seed=None trains (the same run folder), the others train_seed's
    assert [m["train_seed"] for m in members] == [None, 1, 2] and {m["train_seeds"] for m in members} == {None}
    assert [H.training_seed(m) for m in members] == [42, 1, 2] and all(m["lr"] == 1e-3 for m in members)
    assert H.member_configs({**config, "train_seeds": None, "train_seed": 7}) == [{**config, "train_seeds": None,
                                                                                 "train_seed": 7}]
