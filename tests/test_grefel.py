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


TINY_CNN = {"channels": [8, 16, 32, 64], "stem_width": 8}
SMALL = dict(num_classes=8, embed_dim=32, num_heads=4, depth=1, patch_sizes=[12, 6, 3], num_anchors_per_class=3,
             img_size=48, window=3, backbone="resnet18", backbone_args=TINY_CNN)
SMALL_CONFIG = {"embed_dim": 32, "num_heads": 4, "depth": 1, "patch_sizes": [12, 6, 3], "num_anchors_per_class": 3,
                "image_size": 48, "window": 3, "dropout": 0.1, "backbone": "resnet18", "backbone_args": TINY_CNN,
                "components": "full"}


def test_seed_api_shapes_and_probabilities(g):
    model = g["GReFELModel"](num_classes=8, embed_dim=64, num_heads=8, depth=1, patch_sizes=[28, 14, 7],
                             num_anchors_per_class=10)
    images, landmarks, labels = g["create_dummy_data"](3)
    assert images.shape == (3, 3, 112, 112) and landmarks.shape == (3, 68, 2) and labels.shape == (3,)
    model.trust.fill_(0.5)
    out = model(images, landmarks)
    for k in ("logits", "probs", "anchor_probs", "attention_probs", "final_probs"):
        assert out[k].shape == (3, 8), k
    assert out["embeddings"].shape == (3, 64) and out["confidence"].shape == (3,)
    for k in ("probs", "anchor_probs", "attention_probs", "corrected_probs", "final_probs"):
        torch.testing.assert_close(out[k].sum(-1), torch.ones(3), msg=k)
        assert (out[k] >= 0).all()
    assert ((out["confidence"] >= 0) & (out["confidence"] <= 1)).all()


def test_landmark_heatmap_tokens_by_value(g):
    """Token (row y, column x) of a G x G grid is exp(-d² / 2σ²), d the distance from cell (x, y)'s centre."""
    grid, sigma = 4, 0.25
    lm = torch.tensor([[[0.375, 0.125], [0.9, 0.6]]])               # landmark 0 at the centre of cell x=1, y=0
    tokens = g["landmark_heatmap_tokens"](lm, grid, sigma)
    assert tokens.shape == (1, grid * grid, 2)
    assert tokens[0, 1, 0] == pytest.approx(1.0)                      # row 0, column 1
    assert tokens[0, 1 * grid + 1, 0] == pytest.approx(math.exp(-0.25**2 / (2 * sigma**2)))   # one row down
    for y in range(grid):
        for x in range(grid):
            d2 = ((x + 0.5) / grid - 0.9) ** 2 + ((y + 0.5) / grid - 0.6) ** 2
            assert tokens[0, y * grid + x, 1] == pytest.approx(math.exp(-d2 / (2 * sigma**2)), rel=1e-5), (x, y)


def test_window_cross_attention_by_value(g):
    """Each window's geometry tokens attend to that window's image tokens through the module's own
    nn.MultiheadAttention (the reference, window by window), plus the residual; nothing crosses windows."""
    torch.manual_seed(0)
    b, grid, window, d = 2, 6, 3, 16
    cross = g["WindowCrossAttention"](d, 4, window).eval()
    image, geo = torch.randn(b, grid * grid, d), torch.randn(b, grid * grid, d)
    with torch.no_grad():
        out = cross(image, geo, grid)
        q, kv = cross.norm_q(geo), cross.norm_kv(image)
        expected = image.clone()
        for wy in range(0, grid, window):
            for wx in range(0, grid, window):
                cells = [y * grid + x for y in range(wy, wy + window) for x in range(wx, wx + window)]
                fused, _ = cross.attn(q[:, cells], kv[:, cells], kv[:, cells], need_weights=False)
                expected[:, cells] += fused
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        moved = image.clone()
        moved[:, grid * grid - 1] += 5.0                                   # a cell of the last window only
        changed = (cross(moved, geo, grid) - out).abs().amax((0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [y * grid + x for y in range(3, 6) for x in range(3, 6)]


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
                 "features.cross.0.attn.in_proj_weight", "features.geo_proj.2.weight", "features.proj.0.weight",
                 "features.cnn.conv1.weight", "features.cnn.layer3.0.bn2.weight"):  # timm zero-inits bn2
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


def _outputs(final_probs, **extra):
    """A model-output dict with the given final probabilities (no anchors: classification loss only)."""
    return {"final_probs": torch.as_tensor(final_probs, dtype=torch.float32), **extra}


def test_weighted_nll_by_value_for_hard_and_soft_labels(g):
    final = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])
    y = torch.tensor([0, 1, 2, 1])
    w = torch.tensor([1.0, 3.0, 0.5])
    nll = -torch.log(final[torch.arange(4), y])                      # per-sample NLL, by hand
    expected = (w[y] * nll).sum() / w[y].sum()                        # F.nll_loss(weight=...)'s weighted mean
    loss = g["grefel_loss"](None, class_weights=w)
    torch.testing.assert_close(loss(_outputs(final), y, 0.0), expected)
    torch.testing.assert_close(loss(_outputs(final), torch.nn.functional.one_hot(y, 3).float(), 0.0), expected)
    torch.testing.assert_close(expected, torch.nn.functional.nll_loss(final.log(), y, weight=w))
    # soft targets: the cross-entropy with the vote distribution, weighted by the majority class
    soft = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.9, 0.1], [0.2, 0.0, 0.8], [0.3, 0.7, 0.0]])
    per = -(soft * final.log()).sum(-1)
    torch.testing.assert_close(loss(_outputs(final), soft, 0.0), (w[y] * per).sum() / w[y].sum())
    # label smoothing 0.3 over 3 classes: target 0.8 on the label, 0.1 elsewhere
    smooth = torch.full((4, 3), 0.1)
    smooth[torch.arange(4), y] = 0.8
    torch.testing.assert_close(g["grefel_loss"](None, label_smoothing=0.3)(_outputs(final), y, 0.0),
                               (-(smooth * final.log()).sum(-1)).mean())


def test_plain_output_term_by_value(g):
    """lambda_plain adds the (weighted, smoothed) NLL of the plain output p to that of the final output."""
    final = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    plain = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    y = torch.tensor([0, 1])
    w = torch.tensor([2.0, 1.0, 1.0])
    nll_final = (2.0 * -math.log(0.7) + 1.0 * -math.log(0.6)) / 3.0
    nll_plain = (2.0 * -math.log(0.5) + 1.0 * -math.log(0.2)) / 3.0
    out = _outputs(final, probs=plain)
    torch.testing.assert_close(g["grefel_loss"](None, class_weights=w)(out, y, 0.0), torch.tensor(nll_final))
    torch.testing.assert_close(g["grefel_loss"](None, lambda_cls=2.0, class_weights=w, lambda_plain=0.5)(out, y, 0.0),
                               torch.tensor(2.0 * nll_final + 0.5 * nll_plain))


def test_logit_adjusted_nll_by_value(g):
    """Menon et al.'s logit-adjusted loss: the NLL of softmax(log p + tau log prior), by hand; tau = 0 is the NLL,
    and a frequent class's head start lowers its loss, so training moves p towards the rare classes."""
    final = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    y = torch.tensor([0, 2])
    labels = np.array([0] * 6 + [1] * 2 + [2] * 1)
    log_prior = np.log((np.bincount(labels, minlength=3) + 1) / (len(labels) + 3))  # add-one smoothed
    shift = H.logit_adjustment_shift(2.0, labels, 3)
    torch.testing.assert_close(shift, torch.tensor(2.0 * log_prior, dtype=torch.float32))
    adjusted = final * np.exp(2.0 * log_prior)  # p_c x prior_c^tau, renormalised
    adjusted = adjusted / adjusted.sum(1, keepdim=True)
    expected = -torch.log(adjusted[torch.arange(2), y]).mean()
    torch.testing.assert_close(g["grefel_loss"](None, prior_shift=shift)(_outputs(final), y, 0.0), expected.float())
    assert H.logit_adjustment_shift(0.0, labels, 3) is None and H.logit_adjustment_shift(None, labels, 3) is None
    per_sample = [g["grefel_loss"](None, prior_shift=shift)(_outputs(final[i:i + 1]), y[i:i + 1], 0.0) for i in (0, 1)]
    plain = [g["grefel_loss"](None)(_outputs(final[i:i + 1]), y[i:i + 1], 0.0) for i in (0, 1)]
    assert per_sample[0] < plain[0] and per_sample[1] > plain[1]  # the frequent class 0 easier, the rare 2 harder
    # with label smoothing an uninformed model (p uniform) is at its optimum when the targets follow the prior:
    # the smoothing share is spread as softmax(tau log prior), not uniformly (which would favour the rare classes)
    prior = torch.tensor(np.exp(log_prior), dtype=torch.float32)
    f = torch.zeros(1, 3, requires_grad=True)
    g["grefel_loss"](None, label_smoothing=0.1, prior_shift=H.logit_adjustment_shift(1.0, labels, 3))(
        _outputs(f.softmax(-1)), prior[None], 0.0).backward()
    torch.testing.assert_close(f.grad, torch.zeros(1, 3), atol=1e-6, rtol=0)
    smoothed = 0.9 * torch.eye(3)[y] + 0.1 * torch.softmax(shift, 0)  # tau = 2: smoothing spread as prior^2
    expected = -(smoothed * torch.log(adjusted)).sum(1).mean()
    torch.testing.assert_close(g["grefel_loss"](None, label_smoothing=0.1, prior_shift=shift)(_outputs(final), y, 0.0),
                               expected.float())
    for bad in (-1.0, "1", True):
        with pytest.raises(ValueError, match="logit_adjusted_loss"):
            H.check_logit_adjusted_loss(bad)


def test_center_and_anchor_terms_by_value(g):
    torch.manual_seed(0)
    model = g["GReFELModel"](**{**SMALL, "num_classes": 2, "num_anchors_per_class": 2, "embed_dim": 4, "num_heads": 2})
    anchors = torch.tensor([[[0.0, 0, 0, 0], [3, 0, 0, 0]], [[0, 4, 0, 0], [0, 0, 0, 1]]])  # (C=2, K=2, D=4)
    model.balance.anchors.anchors.data.copy_(anchors)
    e = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 3]])
    dist = model.balance.anchors.distances(e)
    torch.testing.assert_close(dist, torch.tensor([[[1.0, 2.0], [17**0.5, 2**0.5]], [[3.0, 18**0.5], [5.0, 2.0]]]))
    out = {"final_probs": torch.tensor([[0.9, 0.1], [0.5, 0.5]]), "anchor_distances": dist,
           "confidence": torch.tensor([0.8, 0.2]), "trust": torch.tensor(0.5)}
    y = torch.tensor([0, 1])
    cls = -(torch.log(torch.tensor(0.9)) + torch.log(torch.tensor(0.5))) / 2
    center = (0.8 * 1.0 + 0.2 * 2.0) / 2                              # own class, nearest anchor, x confidence
    pair = torch.cdist(anchors.reshape(4, 4), anchors.reshape(4, 4))
    hinge = [max(0.0, 5.0 - pair[i, j].item()) ** 2 for i in (0, 1) for j in (2, 3)]  # class 0 vs class 1
    anchor = sum(hinge) / 4 * 2 / 2                                   # each pair counted twice in the mean
    expected = cls + 0.5 * (2.0 * anchor + 3.0 * center)
    loss = g["grefel_loss"](model, lambda_anchor=2.0, lambda_center=3.0, margin=5.0)(out, y, 0.5)
    torch.testing.assert_close(loss, expected.float())


def test_branch_term_by_value(g):
    """lambda_branch adds the NLL of each correction branch's own output (anchors s, attention a), untrusted by tau."""
    model = g["GReFELModel"](**{**SMALL, "num_classes": 3, "num_anchors_per_class": 1, "embed_dim": 2,
                                "num_heads": 1})
    out = {"final_probs": torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]),
           "anchor_probs": torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]),
           "attention_probs": torch.tensor([[0.25, 0.25, 0.5], [0.1, 0.8, 0.1]]),
           "anchor_distances": torch.tensor([[[0.0], [9.0], [9.0]], [[9.0], [0.0], [9.0]]]),
           "confidence": torch.ones(2), "trust": torch.tensor(0.0)}   # tau 0: anchor and centre terms off
    y = torch.tensor([0, 1])
    nll = {k: -(math.log(out[k][0, 0]) + math.log(out[k][1, 1])) / 2
           for k in ("final_probs", "anchor_probs", "attention_probs")}
    torch.testing.assert_close(g["grefel_loss"](model)(out, y, 0.0), torch.tensor(nll["final_probs"]))
    torch.testing.assert_close(g["grefel_loss"](model, lambda_branch=0.5)(out, y, 0.0),
                               torch.tensor(nll["final_probs"] + 0.5 * (nll["anchor_probs"] + nll["attention_probs"])))


def test_detached_branches_train_the_head_but_not_the_embedding(g):
    """detach_branches: the same outputs; the embedding's gradient is the one through the classifier p alone
    (the correction's share of the balanced output held constant), while the anchors and the batch attention
    still learn from every term; without it the branches' losses reach the embedding."""
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    e0 = torch.randn(6, 8)

    def run(detach):
        torch.manual_seed(1)
        model = g["GReFELModel"](**{**SMALL, "num_classes": 3, "num_anchors_per_class": 2, "embed_dim": 8,
                                    "num_heads": 2, "detach_branches": detach})
        model.set_progress(1.0)
        e = e0.clone().requires_grad_()
        out = model.forward_head(e)
        g["grefel_loss"](model, lambda_plain=1.0, lambda_branch=1.0, lambda_center=1.0)(out, y, 1.0).backward()
        return model, e, out

    (kept, e_kept, out_kept), (detached, e_det, out_det) = run(False), run(True)
    for k in ("probs", "anchor_probs", "attention_probs", "final_probs"):
        torch.testing.assert_close(out_det[k], out_kept[k])
    # the embedding's gradient by hand: NLL(final) + NLL(p) with the correction treated as a constant
    conf = g["confidence"]
    s_, a_ = out_det["anchor_probs"].detach(), out_det["attention_probs"].detach()
    corr = (s_ * conf(s_)[:, None] + a_ * conf(a_)[:, None]) / (conf(s_) + conf(a_))[:, None]
    e = e0.clone().requires_grad_()
    p = detached.classifier(e).softmax(-1)
    final = conf(p)[:, None] * p + (1 - conf(p)[:, None]) * corr                  # tau 1
    own = torch.arange(6), y
    (-final[own].log().mean() - p[own].log().mean()).backward()
    torch.testing.assert_close(e_det.grad, e.grad)
    assert not torch.allclose(e_kept.grad, e_det.grad, atol=1e-4)  # without detaching, the branches reach e
    for model in (kept, detached):  # the branches learn either way
        assert model.balance.anchors.anchors.grad.abs().sum() > 0
        assert model.balance.attn_proj.weight.grad.abs().sum() > 0


def _train_head(g, lambda_branch: float, steps: int = 60) -> dict:
    """Train only the head on fixed, separable embeddings, the attention branch starting uniform (zero projection,
    where the 58-epoch cpu run ended); the outputs afterwards."""
    torch.manual_seed(0)
    model = g["GReFELModel"](**{**SMALL, "num_classes": 3, "num_anchors_per_class": 2, "embed_dim": 8,
                                "num_heads": 2})
    model.set_progress(1.0)
    centres = torch.randn(3, 8) * 3
    y = torch.arange(3).repeat(16)
    e = centres[y] + torch.randn(len(y), 8) * 0.3
    torch.nn.init.zeros_(model.balance.attn_proj.weight)
    torch.nn.init.zeros_(model.balance.attn_proj.bias)
    head = [*model.classifier.parameters(), *model.balance.parameters()]
    opt = torch.optim.Adam(head, lr=0.02)
    loss_fn = g["grefel_loss"](model, lambda_branch=lambda_branch)
    for _ in range(steps):
        loss = loss_fn(model.forward_head(e), y, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = model.forward_head(e)
    return {"y": y, **out}


def test_a_uniform_attention_branch_learns_only_with_its_own_loss(g):
    """Uniform is where the attention branch of the 58-epoch cpu run ended, and a trap: there c(a) = 0, so the
    branch has no share of corr, and the entropy's gradient is 0 too; trained only through the confidence-weighted
    mix (ARBEx, lambda_branch=0) it stays exactly uniform. With its own NLL it learns to name the class."""
    conf = g["confidence"]
    untrained, trained = _train_head(g, 0.0), _train_head(g, 1.0)
    torch.testing.assert_close(untrained["attention_probs"], torch.full((48, 3), 1 / 3))
    assert (untrained["anchor_probs"].argmax(1) == untrained["y"]).float().mean() > 0.9  # the head did train
    assert conf(trained["attention_probs"]).mean() > 0.3
    assert (trained["attention_probs"].argmax(1) == trained["y"]).float().mean() > 0.9
    assert (trained["anchor_probs"].argmax(1) == trained["y"]).float().mean() > 0.9


def test_reliability_balancing_by_value(g):
    """Every ARBEx term on a case where a swapped confidence or mix would give another result."""
    rb = g["ReliabilityBalancing"](num_classes=3, num_anchors=1, dim=2, num_heads=1, delta=0.5)
    rb.anchors.anchors.data.copy_(torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]], [[0.0, 2.0]]]))
    torch.nn.init.zeros_(rb.attn_proj.weight)
    torch.nn.init.zeros_(rb.attn_proj.bias)                            # attention correction: uniform, c(a) = 0
    e = torch.tensor([[0.2, 0.1], [1.8, 0.3]])
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.3, 0.1]])
    out = rb(logits, e, torch.tensor(0.75))
    # by hand, independently of the module
    p = torch.softmax(logits, -1)
    d = torch.cdist(e, torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]))
    s = torch.softmax(-d / 0.5, -1)
    a = torch.full((2, 3), 1 / 3)

    def conf(q):
        return 1 + (q * q.log()).sum(-1) / math.log(3)

    cs, ca, cp = conf(s), torch.zeros(2), conf(p)
    corr = (s * cs[:, None] + a * ca[:, None]) / (cs + ca)[:, None]
    p_tilde = cp[:, None] * p + (1 - cp[:, None]) * corr
    for k, v in {"probs": p, "anchor_probs": s, "attention_probs": a, "corrected_probs": p_tilde,
                 "final_probs": 0.25 * p + 0.75 * p_tilde, "confidence": cp}.items():
        torch.testing.assert_close(out[k], v, msg=k)
    # the case is asymmetric: the confident sample trusts its own prediction more
    assert cp[0] > 0.3 > cp[1] and cs.min() > 0.2
    torch.testing.assert_close(corr, s)                                 # c(a) = 0: the anchors alone correct


def test_trust_ramps_over_the_first_half_and_only_with_reliability_balancing(g):
    model = g["GReFELModel"](**SMALL)
    for progress, tau in ((0.0, 0.0), (0.1, 0.2), (0.25, 0.5), (0.5, 1.0), (0.9, 1.0)):
        model.set_progress(progress)
        assert model.trust.item() == pytest.approx(tau)
    plain = g["GReFELModel"](**{**SMALL, "components": "geometry"})
    plain.set_progress(0.9)
    assert plain.trust.item() == 0.0 and plain.balance is None


@pytest.mark.parametrize("components", ["backbone", "pyramid", "geometry"])
def test_ablation_rows_output_plain_softmax_and_train_without_anchors(g, components):
    torch.manual_seed(0)
    model = g["GReFELModel"](**{**SMALL, "components": components})
    images, landmarks, labels = g["create_dummy_data"](4, 48)
    out = model(images, landmarks)
    torch.testing.assert_close(out["final_probs"], out["logits"].softmax(-1))
    assert "anchor_distances" not in out
    g["grefel_loss"](model)(out, labels, 1.0).backward()
    params = dict(model.named_parameters())
    assert params["features.cnn.conv1.weight"].grad.abs().sum() > 0
    assert ("features.cross.0.attn.in_proj_weight" in params) == (components == "geometry")
    assert ("features.vit.layers.0.linear1.weight" in params) == (components != "backbone")
    # landmarks matter exactly when the geometry queries are on
    model.eval()
    with torch.no_grad():
        same = torch.allclose(model(images, landmarks)["final_probs"], model(images, torch.rand_like(landmarks))["final_probs"])
    assert same == (components != "geometry")


@pytest.mark.parametrize("components", ["pyramid", "full"])
def test_fusion_class_token_starts_as_the_backbone_rows_feature(g, components):
    """With the transformer's residual branches silenced, the fused feature is the backbone row's exactly."""
    torch.manual_seed(0)
    fused = g["GReFELModel"](**{**SMALL, "components": components}).features.eval()
    plain = g["GReFELModel"](**{**SMALL, "components": "backbone"}).features.eval()
    plain.cnn.load_state_dict(fused.cnn.state_dict())
    plain.proj[0].load_state_dict(fused.proj[-1].state_dict())
    images, landmarks, _ = g["create_dummy_data"](3, 48)
    with torch.no_grad():
        assert not torch.allclose(fused(images, landmarks), plain(images, landmarks), atol=1e-3)
        for layer in fused.vit.layers:
            for lin in (layer.self_attn.out_proj, layer.linear2):
                lin.weight.zero_(), lin.bias.zero_()
        fused.cls.zero_()
        torch.testing.assert_close(fused(images, landmarks), plain(images, landmarks))
        fused.cls.normal_()  # the learned offset moves it
        assert not torch.allclose(fused(images, landmarks), plain(images, landmarks), atol=1e-3)


def test_pyramid_stages_are_chosen_by_grid_size_and_bad_sizes_say_what_works(g):
    model = g["GReFELModel"](**SMALL)
    assert model.features.backbone_info["out_indices"] == [1, 2, 3]     # ResNet strides 4/8/16 at 48 px
    maps = model.features.cnn(torch.zeros(1, 3, 48, 48))
    assert [m.shape[-1] for m in maps] == [12, 6, 3]
    with pytest.raises(ValueError, match=r"grid sizes \[14, 7, 4\].*\[24, 12, 6, 3, 2\].*56"):
        g["GReFELModel"](**{**SMALL, "patch_sizes": [14, 7, 4]})
    with pytest.raises(ValueError, match="timm has no model 'resnet1'"):
        g["GReFELModel"](**{**SMALL, "backbone": "resnet1"})
    with pytest.raises(ValueError, match="window 4 does not tile"):
        g["GReFELModel"](**{**SMALL, "window": 4})


def test_backbone_weights_from_a_file_load_and_are_recorded(g, tmp_path):
    import timm

    donor = timm.create_model("resnet18", num_classes=5, **TINY_CNN)
    torch.save(donor.state_dict(), tmp_path / "r18.pth")
    model = g["GReFELModel"](**SMALL, weights=str(tmp_path / "r18.pth"))
    torch.testing.assert_close(model.features.cnn.layer2[0].conv1.weight, donor.layer2[0].conv1.weight)
    assert model.features.backbone_info["sha256"] == H.file_sha256(tmp_path / "r18.pth")
    with pytest.raises(H.WeightsUnavailableError, match="not found"):
        g["GReFELModel"](**SMALL, weights=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(H.WeightsUnavailableError, match="junk.pth"):
        g["GReFELModel"](**SMALL, weights=str(tmp_path / "junk.pth"))
    torch.save({f"module.{k}": v for k, v in donor.state_dict().items()}, tmp_path / "ddp.pth")  # DDP's prefix
    model = g["GReFELModel"](**SMALL, weights=str(tmp_path / "ddp.pth"))
    torch.testing.assert_close(model.features.cnn.layer2[0].conv1.weight, donor.layer2[0].conv1.weight)
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "wide.pth")  # another width: nothing fits
    with pytest.raises(H.WeightsUnavailableError, match=r"only \d+ of the model's \d+ weights match"):
        g["GReFELModel"](**SMALL, weights=str(tmp_path / "wide.pth"))


def test_mirror_landmarks_matches_a_flipped_transform(g):
    rng = np.random.default_rng(0)
    pts = rng.uniform(5, 40, (68, 2)).astype(np.float32)
    img = rng.integers(0, 255, (48, 48, 1), dtype=np.uint8)
    flip = H.KeypointCompose([__import__("albumentations").HorizontalFlip(p=1.0)])
    flipped = flip(image=img, keypoints=pts)["keypoints"] / 48
    mirrored = g["mirror_landmarks"](torch.as_tensor(pts / 48)[None])[0].numpy()
    np.testing.assert_allclose(mirrored, flipped, atol=1.5 / 48)    # the same points, up to the pixel convention
    assert np.abs(mirrored - pts / 48).max() > 0.1


def test_onnx_and_torchscript_exports_take_any_batch_size(g, tmp_path):
    """Exported from one image (as the notebook exports), both files give PyTorch's probabilities for a batch of
    five: the batch size is an input of the graph, not a constant of the trace (reliability balancing attends
    over the batch, so every image's output depends on the batch's size)."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = g["GReFELModel"](**SMALL).eval()
    model.trust.fill_(1.0)
    images, landmarks = torch.randn(5, 3, 48, 48), torch.rand(5, 68, 2)
    onnx = H.export_onnx(model, tmp_path / "g.onnx", (images[:1], landmarks[:1]), {}, input_names=("image", "landmarks"))
    script = torch.jit.load(str(H.export_torchscript(model, tmp_path / "g.pt", (images[:1], landmarks[:1]), {})))
    with torch.no_grad():
        expected = H.ProbabilityModel(model).eval()(images, landmarks)
        traced = script(images, landmarks)
    got = ort.InferenceSession(str(onnx)).run(None, {"image": images.numpy(), "landmarks": landmarks.numpy()})[0]
    assert got.shape == (5, 8)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    torch.testing.assert_close(traced, expected, atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trips_through_the_evaluator(g, tmp_path):
    torch.manual_seed(0)
    config = dict(SMALL_CONFIG)
    model = g["build_grefel"](config, 8)
    model.set_progress(1.0)
    norm = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    H.save_checkpoint(tmp_path / "best_model.pth", model=model.state_dict(), config=config,
                      class_names=list(H.FERPLUS_CLASSES), norm=norm, temperature=2.0)
    ev = g["GReFELEvaluator"](tmp_path / "best_model.pth")
    assert ev.model.trust.item() == 1.0
    from helpers.demo import draw_face, make_subjects
    img = draw_face("happy", make_subjects(1, 0)[0], np.random.default_rng(0), 48, 48, crop=True)
    Image.fromarray(img).save(tmp_path / "face.png")
    pred = ev.predict_single_image(tmp_path / "face.png")
    assert set(pred["probabilities"]) == set(H.FERPLUS_CLASSES) and isinstance(pred["landmarks_ok"], bool)
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
    # ... then calibrated with the checkpoint's temperature: softmax(log p / T), argmax unchanged
    calibrated = torch.softmax(ref.log() / 2.0, -1).numpy()
    np.testing.assert_allclose(list(pred["probabilities"].values()), calibrated, atol=1e-5)
    assert not np.allclose(calibrated, ref.numpy(), atol=1e-3) and calibrated.argmax() == ref.argmax()


def test_a_uniform_correction_branch_is_reported_loudly(g, tmp_path, capsys):
    torch.manual_seed(0)
    config = {**SMALL_CONFIG, "lambda_branch": 0.0}
    model = g["build_grefel"](config, 8)
    torch.nn.init.zeros_(model.balance.attn_proj.weight)                # the collapsed branch: uniform output
    torch.nn.init.zeros_(model.balance.attn_proj.bias)
    H.save_checkpoint(tmp_path / "best_model.pth", model=model.state_dict(), config=config,
                      class_names=list(H.FERPLUS_CLASSES), norm={"mean": (0.5,) * 3, "std": (0.5,) * 3})
    ev = g["GReFELEvaluator"](tmp_path / "best_model.pth")
    images, landmarks, labels = g["create_dummy_data"](6, 48)
    result = ev.analyze_reliability_balancing([(images, landmarks, labels)])
    assert result["confidence_attention"] == pytest.approx(0.0, abs=1e-6) and result["confidence_anchor"] > 0
    printed = capsys.readouterr().out
    assert "WARNING: the attention correction branch outputs a uniform distribution" in printed
    assert "anchor correction branch" not in printed and "lambda_branch=0.0" in printed


def test_shift_tta_averages_the_ten_views_with_the_landmarks_moved_along(g, tmp_path):
    """outputs(tta_flip, tta_shift=2) is the mean of the model's outputs over the image moved 0 / 2 px right,
    left, down and up (black border: -1 after this normalisation), landmarks moved by the same share of the
    side, each view with its mirror image; rebuilt here by padding and cropping."""
    torch.manual_seed(0)
    model = g["build_grefel"](dict(SMALL_CONFIG), 8)
    model.set_progress(1.0)
    norm = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    H.save_checkpoint(tmp_path / "m.pth", model=model.state_dict(), config=dict(SMALL_CONFIG),
                      class_names=list(H.FERPLUS_CLASSES), norm=norm)
    ev = g["GReFELEvaluator"](tmp_path / "m.pth")
    x, lm, y = torch.rand(4, 3, 48, 48) * 2 - 1, torch.rand(4, 68, 2) * 0.6 + 0.2, torch.arange(4)
    out = ev.outputs([(x, lm, y)], tta_flip=True, tta_shift=2)
    model.eval()
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    views = []
    with torch.no_grad():
        for dx, dy in ((0, 0), (2, 0), (-2, 0), (0, 2), (0, -2)):
            view, moved = padded[..., 2 - dy:50 - dy, 2 - dx:50 - dx], lm + torch.tensor([dx / 48, dy / 48])
            views += [model(view, moved)["final_probs"], model(view.flip(-1), g["mirror_landmarks"](moved))["final_probs"]]
    np.testing.assert_allclose(out["final_probs"], torch.stack(views).mean(0).numpy(), atol=1e-5)
    np.testing.assert_array_equal(out["y"], [0, 1, 2, 3])
    # the landmarks each view is given (an untrained model barely reads them, so a recording stand-in checks them)
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, images, landmarks):
            seen.append((images, landmarks))
            return {"final_probs": torch.full((len(images), 8), 1 / 8)}

    ev.model = Recorder()
    ev.outputs([(x, lm, y)], tta_flip=True, tta_shift=2)
    assert len(seen) == 10
    for (image, points), (mirror_image, mirror_points), (dx, dy) in zip(seen[::2], seen[1::2],
                                                                        ((0, 0), (2, 0), (-2, 0), (0, 2), (0, -2))):
        torch.testing.assert_close(points, lm + torch.tensor([dx / 48, dy / 48]))
        torch.testing.assert_close(mirror_points, g["mirror_landmarks"](points))
        torch.testing.assert_close(mirror_image, image.flip(-1))
    ev.model = model
    # without shifts: the mirror pair, as before
    pair = ev.outputs([(x, lm, y)], tta_flip=True)["final_probs"]
    np.testing.assert_allclose(pair, torch.stack(views[:2]).mean(0).numpy(), atol=1e-5)


def test_evaluator_on_a_larger_photo_finds_the_face(g, tmp_path, demo_kmu_zip):
    config = dict(SMALL_CONFIG)
    H.save_checkpoint(tmp_path / "m.pth", model=g["build_grefel"](config, 8).state_dict(), config=config,
                      class_names=list(H.FERPLUS_CLASSES), norm={"mean": (0.5,) * 3, "std": (0.5,) * 3})
    root = H.extract_archive(demo_kmu_zip, tmp_path / "ex", verbose=False)
    frame = sorted(root.rglob("*.jpg"))[0]  # 192 x 144 frame with a face in it
    pred = g["GReFELEvaluator"](tmp_path / "m.pth").predict_single_image(frame)
    assert pred["face_box"] is not None and pred["face_box"][2] < 144
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
