"""GReFEL components, executed from the notebook's cells tagged ``grefel-model``."""

import math

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import helpers as H
from conftest import ROOT


@pytest.fixture(scope="module")
def g():
    """The namespace the tagged cells define (GReFELModel, ReliabilityBalancing, grefel_loss, ...)."""
    nb = nbformat.read(ROOT / "GReFEL.ipynb", as_version=4)
    ns = {"torch": torch, "np": np, "pd": pd, "H": H}
    cells = [c.source for c in nb.cells if "grefel-model" in c.metadata.get("tags", [])]
    assert len(cells) >= 4
    for src in cells:
        exec(compile(src, "GReFEL.ipynb", "exec"), ns)
    return ns


SMALL = dict(num_classes=8, embed_dim=32, num_heads=4, depth=1, patch_sizes=[12, 6, 3], num_anchors_per_class=3,
             img_size=48)


def test_seed_api_shapes_and_probabilities(g):
    model = g["GReFELModel"](num_classes=8, embed_dim=64, num_heads=8, depth=1, patch_sizes=[28, 14, 7],
                             num_anchors_per_class=10)
    images, landmarks, labels = g["create_dummy_data"](3)
    assert images.shape == (3, 3, 224, 224) and landmarks.shape == (3, 68, 2) and labels.shape == (3,)
    model.trust.fill_(0.5)
    out = model(images, landmarks)
    for k in ("logits", "probs", "anchor_probs", "attention_probs", "final_probs"):
        assert out[k].shape == (3, 8), k
    assert out["embeddings"].shape == (3, 64) and out["confidence"].shape == (3,)
    for k in ("probs", "anchor_probs", "attention_probs", "corrected_probs", "final_probs"):
        torch.testing.assert_close(out[k].sum(-1), torch.ones(3), msg=k)
        assert (out[k] >= 0).all()
    assert ((out["confidence"] >= 0) & (out["confidence"] <= 1)).all()


def test_confidence_is_one_for_one_hot_and_zero_for_uniform(g):
    c = g["confidence"](torch.tensor([[1.0, 0, 0, 0], [0.25] * 4, [0.7, 0.1, 0.1, 0.1]]))
    torch.testing.assert_close(c[:2], torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)
    assert 0 < c[2] < 1


def test_zero_trust_gives_the_plain_softmax(g):
    torch.manual_seed(0)
    model = g["GReFELModel"](**SMALL)
    images, landmarks, _ = g["create_dummy_data"](4, 48)
    model.set_progress(0.0)
    out = model(images, landmarks)
    torch.testing.assert_close(out["final_probs"], out["probs"])
    model.set_progress(0.25)
    assert model.trust.item() == pytest.approx(0.5)
    out = model(images, landmarks)
    assert not torch.allclose(out["final_probs"], out["probs"])
    expected = 0.5 * out["probs"] + 0.5 * out["corrected_probs"]
    torch.testing.assert_close(out["final_probs"], expected)


def test_gradients_reach_anchors_and_attention_correction(g):
    torch.manual_seed(0)
    model = g["GReFELModel"](**SMALL)
    model.set_progress(1.0)
    images, landmarks, labels = g["create_dummy_data"](6, 48)
    loss = g["grefel_loss"](model)(model(images, landmarks), labels, 1.0)
    loss.backward()
    for name in ("balance.anchors.anchors", "balance.attn_proj.weight", "balance.batch_attn.in_proj_weight",
                 "features.cross.0.attn.in_proj_weight", "features.geo_proj.2.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_anchor_loss_is_bounded_below_unlike_arbex(g):
    far = torch.zeros(3, 2, 4)
    far[:, :, 0] = torch.arange(3)[:, None] * 100.0  # classes 100 apart
    assert g["anchor_separation_loss"](far, margin=2.0).item() == 0.0
    near = torch.zeros(3, 2, 4)
    assert g["anchor_separation_loss"](near, margin=2.0).item() == pytest.approx(4.0)
    flat = far.reshape(6, 4)
    arbex = -(torch.cdist(flat, flat) ** 2).sum()  # ARBEx's form: -> -inf as anchors spread
    assert arbex < -1e4 and g["anchor_separation_loss"](far * 10, 2.0) >= 0


def test_soft_labels_and_class_weights_in_the_loss(g):
    torch.manual_seed(0)
    model = g["GReFELModel"](**SMALL)
    images, landmarks, labels = g["create_dummy_data"](4, 48)
    out = model(images, landmarks)
    soft = torch.nn.functional.one_hot(labels, 8).float()
    hard_loss = g["grefel_loss"](model)(out, labels, 0.0)
    torch.testing.assert_close(g["grefel_loss"](model)(out, soft, 0.0), hard_loss)
    weighted = g["grefel_loss"](model, class_weights=torch.ones(8) * 2)(out, labels, 0.0)
    torch.testing.assert_close(weighted, hard_loss)  # NLL with uniform weights is a weighted mean: unchanged
    assert math.isfinite(hard_loss.item())


def test_checkpoint_round_trips_through_the_evaluator(g, tmp_path):
    torch.manual_seed(0)
    config = {"embed_dim": 32, "num_heads": 4, "depth": 1, "patch_sizes": [12, 6, 3], "num_anchors_per_class": 3,
              "image_size": 48, "window": 4, "dropout": 0.1}
    model = g["build_grefel"](config, 8)
    model.set_progress(1.0)
    norm = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    H.save_checkpoint(tmp_path / "best_model.pth", model=model.state_dict(), config=config,
                      class_names=list(H.FERPLUS_CLASSES), norm=norm, temperature=1.0)
    ev = g["GReFELEvaluator"](tmp_path / "best_model.pth")
    assert ev.model.trust.item() == 1.0
    from helpers.demo import draw_face, make_subjects
    img = draw_face("happy", make_subjects(1, 0)[0], np.random.default_rng(0), 48, 48, crop=True)
    Image.fromarray(img).save(tmp_path / "face.png")
    pred = ev.predict_single_image(tmp_path / "face.png")
    assert set(pred["probabilities"]) == set(H.FERPLUS_CLASSES)
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert pred["emotion"] == max(pred["probabilities"], key=pred["probabilities"].get)
    # The same crop through the original model gives the same probabilities.
    crop = H.crop_face(H.load_image(tmp_path / "face.png", 1), pred["face_box"], 48, margin=0.15, no_face="full")
    pts, _ = H.LandmarkDetector()(crop)
    t = H.build_transform("eval", 48, norm["mean"], norm["std"], channels=1, keypoints=True)
    o = t(image=crop[..., None], keypoints=pts)
    model.eval()
    with torch.no_grad():
        ref = model(o["image"][None], torch.as_tensor(o["keypoints"] / 48)[None].float())["final_probs"][0]
    np.testing.assert_allclose(list(pred["probabilities"].values()), ref.numpy(), atol=1e-5)


def test_evaluator_on_a_larger_photo_finds_the_face(g, tmp_path, demo_kmu_zip):
    config = {"embed_dim": 32, "num_heads": 4, "depth": 1, "patch_sizes": [12, 6, 3], "num_anchors_per_class": 3,
              "image_size": 48, "window": 4, "dropout": 0.1}
    H.save_checkpoint(tmp_path / "m.pth", model=g["build_grefel"](config, 8).state_dict(), config=config,
                      class_names=list(H.FERPLUS_CLASSES), norm={"mean": (0.5,) * 3, "std": (0.5,) * 3})
    root = H.extract_archive(demo_kmu_zip, tmp_path / "ex", verbose=False)
    frame = sorted(root.rglob("*.jpg"))[0]  # 192 x 144 frame with a face in it
    pred = g["GReFELEvaluator"](tmp_path / "m.pth").predict_single_image(frame)
    assert pred["face_box"] is not None and pred["face_box"][2] < 144
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
