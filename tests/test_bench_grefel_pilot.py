"""bench/grefel_pilot.py: the pack is the notebook's cache without its test split, and a variant trains as the
notebook's cpu profile with only its own settings changed."""

import json

import h5py
import numpy as np
import pytest
import torch

import helpers as H
from conftest import load_bench


# a GReFEL small enough to score in a second: the benches only need the notebook's evaluator to run it
TINY_GREFEL = {"embed_dim": 16, "num_heads": 2, "depth": 1, "patch_sizes": [16, 8, 4], "num_anchors_per_class": 2,
               "image_size": 64, "window": 4, "dropout": 0.0, "backbone": "resnet18",
               "backbone_args": {"channels": [8, 8, 8, 8], "stem_width": 8}}


@pytest.fixture(scope="module")
def pilot():
    return load_bench("grefel_pilot")


@pytest.fixture(scope="module")
def packed(pilot, tmp_path_factory):
    """A demo FER+ archive, its 64-px landmark cache as the notebook builds it (fixed points for dlib's), the pack."""
    tmp = tmp_path_factory.mktemp("grefel_pilot")
    archive = H.make_demo_ferplus(tmp / "FERPlus.zip", num_train=24, num_val=12, num_test=12)
    index, _ = H.read_ferplus(H.prepare_ferplus(archive, tmp / "ex", verbose=False), verbose=False)
    index = index[index["label"] != ""].reset_index(drop=True)
    rng = np.random.default_rng(0)

    def landmarker(crop):  # points partly outside the crop, as dlib's may be
        return rng.uniform(-0.2, 1.2, (68, 2)) * crop.shape[0], True

    cache = H.build_hdf5_cache(index, tmp / "ferplus_64px_lm.h5", H.FERPLUS_CLASSES, 64, channels=1,
                               extra_columns=("votes",), landmarker=landmarker, progress=False)
    out = tmp / "pack.npz"
    pilot.pack(str(cache), str(archive), str(out))
    return cache, out


def test_pack_is_the_cache_without_its_test_split(pilot, packed, tmp_path):
    cache, npz = packed
    with h5py.File(cache, "r") as f:
        keep = f["split"].asstr()[:] != "test"
        expected = {k: f[k][:][keep] for k in ("images", "labels", "votes", "landmarks", "landmarks_ok")}
        is_val = f["split"].asstr()[:][keep] == "val"
    assert 0 < keep.sum() < len(keep)
    idx = pilot.write_cache(str(npz), tmp_path / "p.h5", 64, 0)
    with h5py.File(tmp_path / "p.h5", "r") as f:
        np.testing.assert_array_equal(f["images"][:], expected["images"])  # 48 px faces resized as the cache does
        np.testing.assert_array_equal(f["labels"][:], expected["labels"])
        np.testing.assert_array_equal(f["votes"][:], expected["votes"])
        np.testing.assert_array_equal(f["landmarks_ok"][:], expected["landmarks_ok"])
        # quantised: within half a step (1.5 / 255 / 2 of the side) where inside the stored range
        inside = (expected["landmarks"] >= -0.25) & (expected["landmarks"] <= 1.25)
        err = np.abs(f["landmarks"][:] - expected["landmarks"])[inside]
        assert err.max() <= 1.5 / 255 / 2 + 1e-6
    assert list(idx["val"]) == list(np.flatnonzero(is_val)) and idx["num_classes"] == 8


def test_a_variant_is_the_cpu_profile_with_its_own_settings_changed(pilot, packed, tmp_path):
    _, npz = packed
    nb_config = pilot.cpu_profile(tmp_path / "nb")
    assert nb_config["profile"] == "cpu" and nb_config["num_epochs"] > 1
    assert nb_config["soft_labels"] is False  # the profile's "auto", pinned to what the variants are measured against
    pilot.launch(str(npz), tmp_path / "out", ["soft_mixup"], deadline=600, epochs=1, limit=8, work=tmp_path / "w")
    assert [f.name for f in (tmp_path / "out").iterdir()] == ["pilot.json"]  # one file to fetch from a device
    r = json.loads((tmp_path / "out" / "pilot.json").read_text())["variants"]["soft_mixup"]
    assert r["done"] and len(r["history"]) == 1 and r["train"] == 8 and r["val"] == 2
    changed = {k for k in nb_config if r["config"][k] != nb_config[k]}
    assert changed == {"soft_labels", "mixup", "num_epochs", "workdir"}, changed
    assert r["config"]["soft_labels"] is True and r["best_val_acc"] == r["history"][0]["val_acc"]
    assert H.load_checkpoint(tmp_path / "w" / "run_soft_mixup" / "last.pth")["mixup"] == 0.2  # training mixed
    best = r["best_val"]  # the selected checkpoint evaluated on validation again: the same accuracy, and per class
    assert best["accuracy"] == pytest.approx(r["best_val_acc"]) and 0 <= best["f1_macro"] <= 1
    assert list(best["recall"]) == list(H.FERPLUS_CLASSES) and 1 <= best["predicted_classes"] <= 8


def test_rare_class_variants_weight_the_loss_or_balance_the_draw_as_the_notebook_does(pilot, packed, tmp_path):
    cache, _ = packed
    config = {**pilot.cpu_profile(tmp_path / "nb"), "components": "backbone"}
    with h5py.File(cache, "r") as f:
        split = f["split"].asstr()[:]
    train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    labels = H.H5Dataset(cache, train).labels
    counts = np.bincount(labels, minlength=8)

    def build(name):
        return pilot.build_training({**config, **pilot.VARIANTS[name]}, cache, train, val, 8, "cpu", False, 0,
                                    progress=False)

    plain, weighted, balanced = build("base"), build("class_weighted"), build("balanced")
    assert not hasattr(plain[0].sampler, "weights") and isinstance(balanced[0].sampler, torch.utils.data.WeightedRandomSampler)
    # each training image drawn with probability 1 / its class's count: every class equally often
    np.testing.assert_allclose(balanced[0].sampler.weights.numpy(), 1.0 / counts[labels])
    # the NLL weights each sample by its class's inverse frequency: a rare-class sample's loss counts more
    rare, common = int(np.argmin(np.where(counts > 0, counts, 1 << 30))), int(np.argmax(counts))
    probs = torch.full((2, 8), 1 / 8).index_put_((torch.tensor([0, 1]), torch.tensor([rare, common])), torch.tensor(0.5))
    probs = probs / probs.sum(1, keepdim=True)
    out = {"final_probs": probs, "probs": probs}
    y = torch.tensor([rare, rare])  # sample 0 right-ish, sample 1 wrong: the same under both losses if weights are equal
    assert weighted[4](out, y, 1.0).item() == pytest.approx(plain[4](out, y, 1.0).item())  # one class: weights cancel
    y = torch.tensor([rare, common])
    w = H.class_weights_from_labels(labels, 8)
    nll = -(torch.log(probs[[0, 1], [rare, common]]) * 0.9 + 0.1 / 8 * torch.log(probs).sum(1))  # label smoothing 0.1
    assert config["label_smoothing"] == 0.1 and counts[rare] < counts[common]
    both = config["lambda_cls"] + config["lambda_plain"]  # without reliability balancing final = p: both NLL terms
    assert weighted[4](out, y, 1.0).item() == pytest.approx(both * ((w[y] * nll).sum() / w[y].sum()).item(), rel=1e-5)
    assert plain[4](out, y, 1.0).item() == pytest.approx(both * nll.mean().item(), rel=1e-5)
    # the milder variants: square-root weights, and the logit-adjusted NLL (log p + log prior, renormalised)
    w = H.class_weights_from_labels(labels, 8, power=0.5)
    assert build("backbone_sqrt_weighted")[4](out, y, 1.0).item() == pytest.approx(
        both * ((w[y] * nll).sum() / w[y].sum()).item(), rel=1e-5)
    shifted = torch.log_softmax(torch.log(probs) + torch.tensor(H.class_log_prior(labels, 8)).float(), 1)
    smooth = torch.softmax(torch.tensor(H.class_log_prior(labels, 8)).float(), 0)  # smoothing spread at the prior
    nll_la = -(shifted[[0, 1], [rare, common]] * 0.9 + 0.1 * (shifted * smooth).sum(1))
    assert build("backbone_la")[4](out, y, 1.0).item() == pytest.approx(both * nll_la.mean().item(), rel=1e-5)


def test_speed_bench_rows_train_in_the_layout_and_data_path_they_name(pilot, tmp_path, monkeypatch, capsys):
    """bench/bench_grefel_speed.py: each row is a real H.fit run of the notebook's model whose record says
    channels-last, the batched augmentation, dropout off and the input size exactly where the row's name does."""
    bench = load_bench("bench_grefel_speed")
    out = tmp_path / "speed.json"
    monkeypatch.setattr("sys.argv", ["bench_grefel_speed.py", "--components", "backbone", "--images", "128",
                                     "--epochs", "1", "--rows", "nchw-loader", "nhwc-batched", "nhwc-batched-dropout0",
                                     "nhwc-batched-dropout0.1", "nhwc-batched-48px", "nhwc-batched-48px-half",
                                     "nhwc-batched-half", "nhwc-batched-96px-half", "--json", str(out)])
    bench.main()
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert (rows["nchw-loader"]["channels_last"], rows["nchw-loader"]["batched"]) == (False, False)
    assert (rows["nhwc-batched"]["channels_last"], rows["nhwc-batched"]["batched"]) == (True, True)
    assert rows["nhwc-batched-dropout0.1"]["dropout_p"] == [0.1] and rows["nhwc-batched-dropout0"]["dropout_p"] == [0.0]
    assert rows["nhwc-batched-dropout0"]["batched"] and not rows["nhwc-batched"]["compile"]["used"]
    assert (rows["nhwc-batched"]["image_size"], rows["nhwc-batched-48px"]["image_size"]) == (64, 48)
    half, full = rows["nhwc-batched-48px-half"], rows["nhwc-batched-48px"]  # the half-width ResNet: ~1/4 the weights
    assert half["image_size"] == 48 and half["changed"]["backbone_args"] == pilot.HALF_WIDTH
    assert 0.2 < half["parameters"] / full["parameters"] < 0.5
    # the same half-width ResNet on upsampled faces: its weights do not depend on the input size
    assert [(rows[r]["image_size"], rows[r]["parameters"]) for r in ("nhwc-batched-half", "nhwc-batched-96px-half")] \
        == [(64, half["parameters"]), (96, half["parameters"])]
    assert rows["nhwc-batched-96px-half"]["changed"]["patch_sizes"] == [24, 12, 6]
    assert all(r["steps"] == 1 and r["s_per_step"] > 0 for r in rows.values())
    assert "nhwc-batched" in capsys.readouterr().out


def test_tta_bench_scores_one_view_the_mirror_pair_and_each_shift_on_the_chosen_split(packed, tmp_path):
    """bench/grefel_tta.py: the notebook's evaluator over the cache's validation split, a row per view set;
    its figures are the evaluator's own for the same views (so the bench measures what the notebook does)."""
    bench = load_bench("grefel_tta")
    cache, _ = packed
    g = bench.model_cells()
    config = {**TINY_GREFEL, "components": "full"}
    torch.manual_seed(0)
    model = g["build_grefel"](config, 8)
    model.set_progress(1.0)  # the balancing's full weight, as trained: then the outputs depend on the batch
    H.save_checkpoint(tmp_path / "m.pth", model=model.state_dict(), config={**config, "batch_size": 4},
                      class_names=list(H.FERPLUS_CLASSES), norm={"mean": (0.5,) * 3, "std": (0.5,) * 3})
    out = bench.compare(str(tmp_path / "m.pth"), str(cache), "val", [2, 0, 3], keep_outputs=True)
    meta, _ = H.read_cache_meta(cache)
    val = np.flatnonzero(meta["split"].to_numpy() == "val")
    assert out["images"] == len(val) > 4 and out["config"]["image_size"] == 64
    assert out["batch_size"] == 4  # the run's, as the notebook validates (the balancing attends over the batch)
    assert [(r["views"], r["tta_flip"], r["tta_shift"]) for r in out["rows"]] == [
        (1, False, 0), (2, True, 0), (10, True, 2), (10, True, 3)]
    ev = g["GReFELEvaluator"](tmp_path / "m.pth")
    batches = {b: H.make_loader(H.H5Dataset(cache, val, ev.transform, landmarks=True), b, shuffle=False) for b in (4, 8)}
    o = ev.outputs(batches[4], tta_flip=True, tta_shift=3)
    np.testing.assert_allclose(out["rows"][3]["final_probs"], o["final_probs"], atol=1e-6)
    assert out["rows"][3]["accuracy"] == pytest.approx(float((o["final_probs"].argmax(1) == o["y"]).mean()))
    assert out["rows"][3]["f1_macro"] == pytest.approx(H.macro_f1(o["y"], o["final_probs"].argmax(1), 8))
    votes = H.read_cache_votes(cache, val)  # the demo's votes: the FERPlus paper's protocol beside, each view set
    assert out["paper_protocol"]["images"] == H.ferplus_paper_subset(votes).sum()
    assert out["rows"][3]["paper_accuracy"] == H.ferplus_paper_accuracy(votes, o["final_probs"].argmax(1), o["y"])["accuracy"]
    # another batch gives other outputs: why the bench takes the notebook's
    assert not np.allclose(ev.outputs(batches[8], tta_flip=True, tta_shift=3)["final_probs"], o["final_probs"], atol=1e-6)
    with pytest.raises(SystemExit, match="has no 'valid' split"):
        bench.compare(str(tmp_path / "m.pth"), str(cache), "valid", [2])


def test_heads_bench_stats_by_value():
    """bench/grefel_heads.py: per class, how often a head predicts it, the mean probability and the mean rank of the
    true class on that class's images (0: the head's top choice)."""
    bench = load_bench("grefel_heads")
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.5, 0.2, 0.3], [0.1, 0.2, 0.7]])
    y = np.array([0, 1, 1, 2])
    out = bench.head_stats(probs, y, ["a", "b", "c"])
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["per_class"]["a"] == {"predicted": 2, "support": 1, "mean_p_true": pytest.approx(0.6), "mean_rank_true": 0.0}
    # class b: ranked first on one image, last of three on the other (0.2 under 0.5 and 0.3)
    assert out["per_class"]["b"] == {"predicted": 1, "support": 2, "mean_p_true": pytest.approx(0.35), "mean_rank_true": 1.0}
    assert out["per_class"]["c"]["predicted"] == 1 and out["per_class"]["c"]["mean_rank_true"] == 0.0
    empty = bench.head_stats(probs[:1], y[:1], ["a", "b", "c"])["per_class"]["b"]
    assert empty == {"predicted": 0, "support": 0, "mean_p_true": None, "mean_rank_true": None}


def test_heads_bench_reads_every_head_of_the_evaluators_outputs(packed, tmp_path):
    bench = load_bench("grefel_heads")
    cache, _ = packed
    g = load_bench("grefel_tta").model_cells()
    config = {**TINY_GREFEL, "components": "full", "batch_size": 4}
    torch.manual_seed(0)
    model = g["build_grefel"](config, 8)
    model.set_progress(1.0)
    H.save_checkpoint(tmp_path / "m.pth", model=model.state_dict(), config=config,
                      class_names=list(H.FERPLUS_CLASSES), norm={"mean": (0.5,) * 3, "std": (0.5,) * 3})
    out = bench.heads(str(tmp_path / "m.pth"), str(cache), "val")
    assert set(out["heads"]) == {"probs", "final_probs", "anchor_probs", "attention_probs"} and out["batch_size"] == 4
    meta, _ = H.read_cache_meta(cache)
    val = np.flatnonzero(meta["split"].to_numpy() == "val")
    ev = g["GReFELEvaluator"](tmp_path / "m.pth")
    o = ev.outputs(H.make_loader(H.H5Dataset(cache, val, ev.transform, landmarks=True), 4, shuffle=False))
    for head in out["heads"]:  # the evaluator's own outputs, the notebook's batch
        assert out["heads"][head] == bench.head_stats(o[head], o["y"], list(H.FERPLUS_CLASSES)), head
    assert sum(c["predicted"] for c in out["heads"]["probs"]["per_class"].values()) == out["images"] == len(val)


def test_ensemble_bench_averages_the_members_final_probabilities_view_set_by_view_set(packed, tmp_path):
    """bench/grefel_ensemble.py: each member scored as the notebook's evaluator scores it, the ensemble the mean of
    their final probabilities; members of other classes, or a single member, stop it with the file named."""
    bench = load_bench("grefel_ensemble")
    cache, _ = packed
    g = load_bench("grefel_tta").model_cells()
    config = {**TINY_GREFEL, "components": "backbone", "batch_size": 4}
    paths = []
    for seed, classes in [(0, H.FERPLUS_CLASSES), (1, H.FERPLUS_CLASSES), (2, H.FERPLUS_CLASSES[::-1])]:
        torch.manual_seed(seed)
        paths.append(tmp_path / f"m{seed}.pth")
        H.save_checkpoint(paths[-1], model=g["build_grefel"](config, 8).state_dict(), config=config,
                          class_names=list(classes), norm={"mean": (0.5,) * 3, "std": (0.5,) * 3})
    out = bench.ensemble([str(p) for p in paths[:2]], str(cache), "val", [3], keep_outputs=True)
    meta, _ = H.read_cache_meta(cache)
    val = np.flatnonzero(meta["split"].to_numpy() == "val")
    assert out["images"] == len(val) and [(r["views"], r["tta_shift"]) for r in out["rows"]] == [(1, 0), (2, 0), (10, 3)]
    outputs = []
    for p in paths[:2]:  # each member through the notebook's evaluator, 10 views, the run's batch
        ev = g["GReFELEvaluator"](p)
        loader = H.make_loader(H.H5Dataset(cache, val, ev.transform, landmarks=True), 4, shuffle=False)
        outputs.append(ev.outputs(loader, tta_flip=True, tta_shift=3))
    probs = (outputs[0]["final_probs"] + outputs[1]["final_probs"]) / 2
    row = out["rows"][2]
    assert not np.allclose(outputs[0]["final_probs"], outputs[1]["final_probs"], atol=1e-3)  # two different members
    np.testing.assert_allclose(row["final_probs"], probs, atol=1e-6)
    assert [m["accuracy"] for m in row["members"]] == pytest.approx(
        [float((o["final_probs"].argmax(1) == o["y"]).mean()) for o in outputs])
    assert row["accuracy"] == pytest.approx(float((probs.argmax(1) == outputs[0]["y"]).mean()))
    assert row["f1_macro"] == pytest.approx(H.macro_f1(outputs[0]["y"], probs.argmax(1), 8))
    votes = H.read_cache_votes(cache, val)
    assert row["paper_accuracy"] == H.ferplus_paper_accuracy(votes, row["final_probs"].argmax(1), outputs[0]["y"])["accuracy"]
    with pytest.raises(SystemExit, match="m2.pth: classes"):
        bench.ensemble([str(paths[0]), str(paths[2])], str(cache), "val", [])
    with pytest.raises(SystemExit, match="at least two checkpoints, got 1"):
        bench.ensemble([str(paths[0])], str(cache), "val", [3])
