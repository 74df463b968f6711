"""Face crop policies and box cache, augmentation with landmarks, metrics."""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import helpers as H


def test_crop_face_box_margin_and_no_face_policies():
    img = np.zeros((100, 200), np.uint8)
    img[40:60, 90:110] = 255  # a 20 px "face"
    crop = H.crop_face(img, (90, 40, 20, 20), out_size=40, margin=0.5)
    assert crop.shape == (40, 40)
    assert crop[10:30, 10:30].mean() > 200 and crop[:5].mean() < 10  # face centred, margin around it
    assert H.crop_face(img, None, 32, no_face="full").shape == (32, 32)
    center = H.crop_face(img, (np.nan,) * 4, 50, no_face="center")
    assert center.shape == (50, 50) and center.mean() > 0
    assert H.crop_face(img, None, 32, no_face="drop") is None
    edge = H.crop_face(img, (0, 0, 30, 30), 30, margin=0.5)  # crop leaves the frame: padded, not shifted
    assert edge.shape == (30, 30)
    with pytest.raises(ValueError):
        H.crop_face(img, None, 32, no_face="skip")


def test_detect_faces_uses_and_resumes_its_cache(demo_kmu_zip, tmp_path):
    root = H.extract_archive(demo_kmu_zip, tmp_path / "ex", verbose=False)
    index, _ = H.discover_dataset(root, verbose=False)

    class Counting(H.FaceDetector):
        calls = 0

        def detect(self, gray):
            Counting.calls += 1
            return super().detect(gray)

    cache = tmp_path / "boxes.csv"
    first = H.detect_faces(index.iloc[:10], cache, Counting(), progress=False)
    assert Counting.calls == 10
    both = H.detect_faces(index.iloc[:15], cache, Counting(), progress=False)
    assert Counting.calls == 15  # only the 5 new images were detected
    np.testing.assert_allclose(both[H.faces.BOX_COLUMNS].iloc[:10].to_numpy(),
                               first[H.faces.BOX_COLUMNS].to_numpy())
    H.detect_faces(index.iloc[:15], cache, Counting(passes=((200, 0),)), progress=False)
    assert Counting.calls == 30  # other detector settings: not taken from the cache ...
    H.detect_faces(index.iloc[:15], cache, Counting(), progress=False)
    assert Counting.calls == 30  # ... nor do they push the first settings' boxes out of it
    assert pd.read_csv(cache)["params"].nunique() == 2


def test_detector_errors_are_never_cached_as_no_face(demo_kmu_zip, tmp_path):
    root = H.extract_archive(demo_kmu_zip, tmp_path / "ex", verbose=False)
    index, _ = H.discover_dataset(root, verbose=False)
    index = index.iloc[:4].reset_index(drop=True)
    broken = Path(index.loc[1, "path"])
    good = broken.read_bytes()
    broken.write_bytes(good[:40])                           # a truncated JPEG: unreadable, not "no face"
    cache = tmp_path / "boxes.csv"
    with pytest.warns(UserWarning, match="1 images could not be read"):
        out = H.detect_faces(index, cache, progress=False)
    assert not out.loc[1, "face_found"] and out["face_found"].drop(1).all()
    assert index.loc[1, "sha1"] not in set(pd.read_csv(cache, dtype={"sha1": str})["sha1"])  # not cached
    broken.write_bytes(good)                                # repaired: detected on the next run
    assert H.detect_faces(index, cache, progress=False).loc[1, "face_found"]

    class Buggy(H.FaceDetector):
        def detect(self, gray):
            raise RuntimeError("detector bug")

    with pytest.raises(RuntimeError, match="detector bug"):  # a bug is an error, not a frame without a face
        H.detect_faces(index, tmp_path / "other.csv", Buggy(), progress=False)


def test_flip_permutation_is_a_mirror_involution():
    perm = H.FLIP_PERMUTATION_68
    assert sorted(perm) == list(range(68))
    np.testing.assert_array_equal(perm[perm], np.arange(68))
    assert perm[36] == 45 and perm[48] == 54 and perm[8] == 8 and perm[30] == 30


def test_landmarks_follow_flip_with_index_swap():
    size = 64
    pts = np.zeros((68, 2), np.float32)
    pts[:] = (32, 32)
    pts[36] = (20, 25)  # outer corner of the eye on the image's left
    pts[45] = (44, 25)  # outer corner of the eye on the image's right
    img = np.zeros((size, size, 1), np.uint8)
    import albumentations as A
    t = H.KeypointCompose([A.HorizontalFlip(p=1.0)])
    out = t(image=img, keypoints=pts)
    # Flipped, the point stored at index 36 must again be the left-most outer eye corner.
    assert out["keypoints"][36][0] < out["keypoints"][45][0]
    np.testing.assert_allclose(out["keypoints"][36], (size - 44, 25), atol=1)
    none = H.KeypointCompose([A.HorizontalFlip(p=0.0)])(image=img, keypoints=pts)
    np.testing.assert_allclose(none["keypoints"], pts)


@pytest.mark.parametrize("kind", ["seed", "grefel", "shift", "eval"])
def test_transforms_output_normalised_tensors(kind):
    img = np.random.default_rng(0).integers(0, 255, (48, 48, 1), dtype=np.uint8)
    x = H.build_transform(kind, 32, channels=1)(image=img)["image"]
    assert tuple(x.shape) == (3, 32, 32) and x.dtype.is_floating_point
    out = H.build_transform(kind, 32, channels=1, keypoints=True)(image=img, keypoints=np.full((68, 2), 24.0))
    assert out["keypoints"].shape == (68, 2)
    with pytest.raises(ValueError):
        H.build_transform("heavy", 32)


def test_compute_metrics_values():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    m = H.compute_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["recall_macro"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["precision_macro"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["per_class"]["b"]["f1-score"] == pytest.approx(0.8)
    assert sum(map(sum, m["confusion_matrix"])) == m["num_samples"] == 6
    assert m["predicted_classes"] == 3


def test_never_predicted_names_the_held_classes_no_prediction_chose():
    # c is held (two images) and never predicted; d is neither held nor predicted: not a miss; b is predicted only
    y_true, y_pred = np.array([0, 0, 2, 2, 0]), np.array([0, 1, 0, 1, 0])
    m = H.compute_metrics(y_true, y_pred, ["a", "b", "c", "d"])
    assert m["never_predicted"] == ["c"]
    assert m["per_class"]["c"]["recall"] == 0
    assert H.compute_metrics(y_true, np.array([0, 1, 2, 2, 0]), ["a", "b", "c", "d"])["never_predicted"] == []


def test_compute_metrics_flags_a_model_that_predicts_one_class():
    y_true = np.array([0, 0, 0, 1, 2])
    with pytest.warns(UserWarning, match="predicts 'a' for all 5 samples"):
        m = H.compute_metrics(y_true, np.zeros(5, int), ["a", "b", "c"])
    assert m["predicted_classes"] == 1 and m["accuracy"] == pytest.approx(0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one class in the data, one predicted: nothing to flag
        assert H.compute_metrics(np.zeros(3, int), np.zeros(3, int), ["a", "b"])["predicted_classes"] == 1


def test_expected_calibration_error():
    y = np.array([0, 1, 0, 1])
    perfect = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert H.expected_calibration_error(perfect, y) == pytest.approx(0.0)
    overconfident = np.array([[0.9, 0.1]] * 4)  # says 90 %, right half the time
    assert H.expected_calibration_error(overconfident, y) == pytest.approx(0.4)
    with pytest.warns(UserWarning, match="collapsed to one class"):
        m = H.compute_metrics(y, overconfident.argmax(1), ["a", "b"], probs=overconfident)
    assert m["ece"] == pytest.approx(0.4) and m["nll"] > 0


def test_resolve_config_explicit_wins():
    profiles = {"smoke": {"lr": 1e-3, "epochs": 1}}
    cfg = H.resolve_config("smoke", profiles, {"lr": None, "epochs": 5, "data_path": None})
    assert cfg == {"profile": "smoke", "lr": 1e-3, "epochs": 5, "data_path": None}
    with pytest.raises(ValueError, match="profile"):
        H.resolve_config("huge", profiles, {})


def test_inference_crop_reproduces_the_cached_training_crop(demo_kmu_zip, tmp_path):
    import torch

    root = H.extract_archive(demo_kmu_zip, tmp_path / "ex", verbose=False)
    index, report = H.discover_dataset(root, verbose=False)
    index = H.detect_faces(index.iloc[:6], tmp_path / "boxes.csv", progress=False)
    assert index["face_found"].all()
    cache = H.build_hdf5_cache(index, tmp_path / "c.h5", sorted(report["counts"]), 48, channels=1, progress=False)
    pre = H.read_cache_meta(cache)[1]["preprocess"]
    predictor = H.Predictor(torch.nn.Identity(), sorted(report["counts"]), pre, H.IMAGENET_MEAN, H.IMAGENET_STD)
    ds = H.H5Dataset(cache)
    for i, path in enumerate(index["path"]):
        crop, box = predictor.crop(path)
        np.testing.assert_array_equal(crop, ds.image(i))
        np.testing.assert_allclose(box, index.loc[i, H.faces.BOX_COLUMNS].to_numpy(float))


def test_inference_follows_the_training_no_face_policy(tmp_path):
    import torch
    from PIL import Image

    Image.fromarray(np.full((120, 160), 90, np.uint8)).save(tmp_path / "empty.png")  # no face in it
    pre = {"image_size": 32, "channels": 1, "face_crop": True, "margin": 0.25, "square": True}
    classes = ["a", "b", "c"]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    dropped = H.Predictor(model, classes, {**pre, "no_face": "drop"}, H.IMAGENET_MEAN, H.IMAGENET_STD)
    out = dropped(tmp_path / "empty.png")  # trained without faceless frames: no guess on one
    assert out["emotion"] is None and out["probabilities"] is None and "no_face='drop'" in out["note"]
    full = H.Predictor(model, classes, {**pre, "no_face": "full"}, H.IMAGENET_MEAN, H.IMAGENET_STD)
    assert full(tmp_path / "empty.png")["emotion"] in classes


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_ece():
    """Labels drawn from softmax(z / 2.5): the NLL-optimal temperature for the logits z is 2.5 (the
    model is over-confident by exactly that factor), and scaling by it calibrates the model."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (40000, 5))
    p_true = np.exp(z / 2.5) / np.exp(z / 2.5).sum(1, keepdims=True)
    y = (rng.random((len(z), 1)) > p_true.cumsum(1)).sum(1)          # one draw per row from p_true
    t = H.fit_temperature(z, y)
    assert t == pytest.approx(2.5, rel=0.03)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    assert H.fit_temperature(log_p, y) == pytest.approx(t, rel=1e-4)  # log-probabilities: the same optimum
    raw = np.exp(log_p)
    scaled = np.exp(z / t) / np.exp(z / t).sum(1, keepdims=True)
    assert (scaled.argmax(1) == raw.argmax(1)).all()
    before, after = H.expected_calibration_error(raw, y), H.expected_calibration_error(scaled, y)
    assert before > 0.1 and after < 0.02


def test_logit_adjustment_by_hand():
    assert np.exp(H.class_log_prior([0, 0, 0, 1], 3)) == pytest.approx([4 / 7, 2 / 7, 1 / 7])  # add-one smoothed
    log_p = np.log([[0.7, 0.3], [0.95, 0.05]])
    prior = np.log([0.9, 0.1])
    np.testing.assert_allclose(H.adjust_logits(log_p, prior, 0.0), log_p, atol=1e-12)
    # tau 1: p / prior renormalised: [0.7 / 0.9, 0.3 / 0.1] -> [0.2059, 0.7941]; [0.95 / 0.9, 0.05 / 0.1] -> [0.6786, 0.3214]
    np.testing.assert_allclose(np.exp(H.adjust_logits(log_p, prior, 1.0)),
                               [[7 / 9 / (7 / 9 + 3), 3 / (7 / 9 + 3)], [19 / 18 / (19 / 18 + 0.5), 0.5 / (19 / 18 + 0.5)]])


def test_logit_adjustment_recovers_a_never_predicted_rare_class_on_validation():
    """Two 1-D Gaussian classes, 95% / 5%: the exact posterior never favours the rare class in
    this range, so it is never predicted; subtracting tau x log prior with tau near 1 (the
    balanced rule) makes it predicted, raises macro F1, and the chosen tau is in the grid."""
    rng = np.random.default_rng(0)
    y = (rng.random(20000) < 0.05).astype(int)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.5)
    log_prior = np.log([0.95, 0.05])
    log_lik = np.stack([-(x + 1) ** 2, -(x - 1) ** 2], 1) / (2 * 1.5 ** 2)
    log_post = log_lik + log_prior
    log_post -= np.log(np.exp(log_post).sum(1, keepdims=True))
    fit = H.fit_logit_adjustment(log_post, y, log_prior)
    grid = {g["tau"]: g for g in fit["grid"]}
    assert grid[0.0]["f1_macro"] < 0.55 and np.mean(log_post.argmax(1) == 1) < 0.01  # rare class hardly predicted
    assert 0.3 <= fit["tau"] <= 1.2 and fit["val_f1_macro"] > grid[0.0]["f1_macro"] + 0.05
    assert fit["val_f1_macro"] == max(g["f1_macro"] for g in fit["grid"])
    # a uniform prior changes nothing: every tau ties, and the smallest (no change) is kept
    assert H.fit_logit_adjustment(log_post, y, np.log([0.5, 0.5]))["tau"] == 0.0


def test_expected_calibration_error_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    y = np.array([0, 1, 1, 0])
    # 5 bins: (0.8, 1.0] holds 0.9 (right) -> |1 - 0.9|; (0.6, 0.8] holds 0.8 (wrong), 0.7 (right): |0.5 - 0.75|;
    # (0.4, 0.6] holds 0.6 (right): |1 - 0.6|
    expected = 0.25 * 0.1 + 0.5 * 0.25 + 0.25 * 0.4
    assert H.expected_calibration_error(probs, y, num_bins=5) == pytest.approx(expected)


def test_sequence_votes_by_hand():
    probs = np.array([[0.6, 0.4], [0.6, 0.4], [0.0, 1.0],    # seq a (true 0): majority 0, mean prob -> 1 (0.4 vs 0.6)
                      [0.1, 0.9], [0.45, 0.55],               # seq b (true 1): both votes 1
                      [0.9, 0.1], [0.2, 0.8],                 # seq c (true 0): a tie, broken by summed prob -> 0
                      [0.3, 0.7]])                            # no sequence id: left out
    y = np.array([0, 0, 0, 1, 1, 0, 0, 1])
    groups = np.array(["a", "a", "a", "b", "b", "c", "c", ""])
    out = H.sequence_metrics(probs, y, groups)
    assert out["num_sequences"] == 3 and out["frames_per_sequence"] == pytest.approx(7 / 3)
    assert out["accuracy_majority_vote"] == pytest.approx(1.0)      # a: 0, b: 1, c: 0 (tie, 1.1 vs 0.9)
    assert out["accuracy_mean_probability"] == pytest.approx(2 / 3)  # a: mean 0.4/0.6 -> 1, wrong
    assert H.sequence_metrics(probs, y, np.array([""] * 8)) is None


def test_nir_recipe_and_random_erasing_keep_shape_and_vary_the_image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 64, 1), dtype=np.uint8)
    t = H.build_transform("nir", 64, (0.5,) * 3, (0.5,) * 3, channels=1, erasing=1.0)
    t.set_random_seed(0)
    outs = [t(image=img)["image"] for _ in range(4)]
    assert all(o.shape == (3, 64, 64) for o in outs)
    assert not all(np.allclose(outs[0].numpy(), o.numpy()) for o in outs[1:])
    assert any("Erasing" in repr(x) for x in t.transforms)
    with pytest.raises(ValueError, match="'nir'"):
        H.build_transform("infrared", 64)


def test_flip_tta_averages_the_image_and_its_mirror():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3)).eval()
    x, y = torch.rand(5, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    with torch.no_grad():
        expected = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
    out = H.evaluate(model, loader, "cpu", tta_flip=True)
    np.testing.assert_allclose(out["probs"], expected.numpy(), atol=1e-6)
    assert not np.allclose(H.evaluate(model, loader, "cpu")["probs"], out["probs"], atol=1e-4)


def test_ferplus_paper_protocol_keeps_clear_majorities_after_dropping_single_votes():
    """By value, on hand-made vote rows (neutral .. contempt, unknown, not-a-face), as microsoft/FERPlus's
    'majority' mode reads them: votes of 1 dropped, then the top must hold more than half of what is left."""
    votes = np.array([
        [0, 0, 0, 0, 2, 1, 0, 7, 0, 0],  # the 1 dropped: 7 of 9 -> kept (contempt)
        [3, 0, 0, 5, 0, 0, 0, 0, 2, 0],  # 5 of 10 is not more than half -> out (the pipeline keeps it: sadness)
        [6, 0, 1, 2, 0, 0, 0, 0, 1, 0],  # 6 of 8 after the two 1s -> kept (neutral)
        [4, 0, 0, 4, 2, 0, 0, 0, 0, 0],  # a tie -> out
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # nothing left -> out
        [2, 0, 0, 0, 0, 0, 0, 0, 6, 2],  # unknown's majority -> out
        [5, 0, 0, 0, 0, 0, 0, 0, 0, 4],  # 5 of 9, not-a-face counted -> kept
        [3, 1, 1, 1, 1, 1, 1, 1, 0, 0],  # 3 of 3 once the single votes go -> kept
    ])
    keep = H.ferplus_paper_subset(votes)
    assert keep.tolist() == [True, False, True, False, False, False, True, True]
    y = np.array([7, 3, 0, 0, 0, 0, 0, 0])  # the pipeline's labels (plurality; rows 4-5 would not be in its test set)
    pred = np.array([7, 3, 1, 0, 0, 0, 0, 2])  # right, right (not counted), wrong, -, -, -, right, wrong
    r = H.ferplus_paper_accuracy(votes, pred, y)
    assert (r["images"], r["of"], r["accuracy"]) == (4, 8, 0.5)
    with pytest.raises(ValueError, match="not their votes' majority"):
        H.ferplus_paper_accuracy(votes, pred, np.roll(y, 1))
    with pytest.raises(ValueError, match=r"\(N, 10\) counts"):
        H.ferplus_paper_subset(votes[:, :8])
    with pytest.raises(ValueError, match="8 vote rows for 7 labels"):
        H.ferplus_paper_accuracy(votes, pred[:7], y[:7])


def test_read_cache_votes_returns_the_rows_asked_for_or_none(tmp_path):
    import h5py

    with h5py.File(tmp_path / "with.h5", "w") as f:
        f["votes"] = np.arange(30, dtype=np.float32).reshape(3, 10)
    with h5py.File(tmp_path / "without.h5", "w") as f:
        f["labels"] = np.zeros(3, dtype=np.int64)
    np.testing.assert_array_equal(H.read_cache_votes(tmp_path / "with.h5", [2, 0]), [np.arange(20, 30), np.arange(10)])
    assert H.read_cache_votes(tmp_path / "with.h5").shape == (3, 10)
    assert H.read_cache_votes(tmp_path / "without.h5", [0]) is None
