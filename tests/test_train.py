"""The training engine, models and protocols."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import helpers as H


class TinyNet(nn.Module):
    """Small enough for the engine tests; has BatchNorm and Dropout, which resume must replay."""

    def __init__(self, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.body(x)


def _loaders(cache, workers=0):
    meta, _ = H.read_cache_meta(cache)
    idx = np.arange(len(meta))
    tf = H.build_transform("seed", 32, channels=1)
    ev = H.build_transform("eval", 32, channels=1)
    train = H.make_loader(H.H5Dataset(cache, idx[::2], tf), 8, shuffle=True, num_workers=workers)
    val = H.make_loader(H.H5Dataset(cache, idx[1::2], ev), 16, shuffle=False)
    return train, val


def _fit(cache, classes, out, workers=0, linear=False, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, len(classes))) if linear else TinyNet(len(classes))
    train, val = _loaders(cache, workers)
    args = dict(num_epochs=3, lr=1e-2, weight_decay=1e-4, device="cpu", seed=7, progress=False, warmup_epochs=0.5)
    args.update(kw)
    return model, H.fit(model, train, val, out, **args)


def _kill_after_epoch_2(row):
    if row["epoch"] == 2:
        raise KeyboardInterrupt("simulated kill after epoch 2")


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_run_resumes_to_the_same_result(demo_cache, tmp_path, workers):
    cache, classes = demo_cache
    full_model, full = _fit(cache, classes, tmp_path / "full", workers)

    with pytest.raises(KeyboardInterrupt):
        _fit(cache, classes, tmp_path / "cut", workers, on_epoch_end=_kill_after_epoch_2)
    assert H.load_checkpoint(tmp_path / "cut" / "last.pth")["epoch"] == 2
    resumed_model, resumed = _fit(cache, classes, tmp_path / "cut", workers)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for a, b in zip(full["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_acc"] == pytest.approx(b["val_acc"])
    for (k, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6, msg=k)
    # A different seed really gives a different run (so the equality above means something).
    _, other = _fit(cache, classes, tmp_path / "other", workers, seed=8)
    assert other["history"][-1]["train_loss"] != pytest.approx(full["history"][-1]["train_loss"], rel=1e-6)


def test_workers_persist_across_epochs_and_the_result_does_not_depend_on_them(demo_cache, tmp_path):
    """Each item's augmentation is seeded from (epoch seed, row): no workers, or two persistent ones that
    live through all epochs, train the same model."""
    cache, classes = demo_cache
    train, _ = _loaders(cache, workers=2)
    assert train.persistent_workers
    _, alone = _fit(cache, classes, tmp_path / "w0", workers=0)
    _, pooled = _fit(cache, classes, tmp_path / "w2", workers=2)
    for a, b in zip(alone["history"], pooled["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_acc"] == pytest.approx(b["val_acc"])
    # and the epochs really differ in their augmentation (the seed reaches the persistent workers)
    ds = H.H5Dataset(cache, np.arange(4), H.build_transform("seed", 32, channels=1))
    ds.set_epoch_seed(1)
    first = torch.stack([ds[i][0] for i in range(4)])
    ds.set_epoch_seed(2)
    assert not torch.equal(first, torch.stack([ds[i][0] for i in range(4)]))
    ds.set_epoch_seed(1)
    assert torch.equal(first, torch.stack([ds[i][0] for i in range(4)]))


def test_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(demo_cache, tmp_path):
    """A real kill: SIGKILL of a training process in the middle of epoch 2 (no exception, no cleanup),
    then a rerun resumes from epoch 1's last.pth and ends with the uninterrupted run's weights."""
    import signal
    import subprocess
    import sys
    import textwrap

    from conftest import ROOT

    cache, classes = demo_cache
    full_model, full = _fit(cache, classes, tmp_path / "full")
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        import helpers as H
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # as this process: the same floating-point sums
        from test_train import _fit
        base = H.cross_entropy_loss()

        def loss_fn(outputs, y, progress):
            if 0.5 < progress < 0.6 and torch.is_grad_enabled():  # a training step halfway through epoch 2 of 3
                os.kill(os.getpid(), signal.SIGKILL)
            return base(outputs, y, progress)

        _fit({str(cache)!r}, {classes!r}, {str(tmp_path / "cut")!r}, loss_fn=loss_fn)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert H.load_checkpoint(tmp_path / "cut" / "last.pth")["epoch"] == 1
    resumed_model, resumed = _fit(cache, classes, tmp_path / "cut")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for (k, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6, msg=k)
    assert not list((tmp_path / "cut").glob("*.tmp-*"))  # nothing half-written left behind


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(demo_cache, tmp_path):
    cache, classes = demo_cache
    ce = H.cross_entropy_loss()

    def loss_fn(outputs, y, progress):
        loss = ce(outputs, y, progress)
        return loss * float("nan") if progress > 0.5 else loss

    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 2"):
        _fit(cache, classes, tmp_path, loss_fn=loss_fn)
    assert H.load_checkpoint(tmp_path / "last.pth")["epoch"] == 1


def test_checkpoints_load_weights_only_and_refuse_arbitrary_objects(demo_cache, tmp_path):
    cache, classes = demo_cache
    _fit(cache, classes, tmp_path, num_epochs=1, config={"path": tmp_path, "lr": 1e-2},
         extra_state={"class_names": classes})
    best = H.load_checkpoint(tmp_path / "best_model.pth")
    assert best["class_names"] == classes and best["config"]["path"] == str(tmp_path)
    torch.save({"evil": pd.DataFrame({"a": [1]})}, tmp_path / "pickle.pth")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        H.load_checkpoint(tmp_path / "pickle.pth")


def test_early_stopping_and_finished_run_is_not_retrained(demo_cache, tmp_path):
    cache, classes = demo_cache
    # A linear model at lr 0 (no BatchNorm statistics either): epoch 2 cannot improve on epoch 1.
    _, run = _fit(cache, classes, tmp_path, linear=True, num_epochs=6, lr=0.0, warmup_epochs=0, monitor="val_loss",
                  early_stopping=1)
    assert run["stopped_early"] and run["epochs_run"] == 2
    _, again = _fit(cache, classes, tmp_path, linear=True, num_epochs=6, lr=0.0, warmup_epochs=0,
                    monitor="val_loss", early_stopping=1)
    assert again["epochs_run"] == 2


def _scripted_validation(monkeypatch, predictions, y_true):
    """fit's validation returns ``predictions[k]`` at its k-th call (one-hot probabilities), whatever the model."""
    calls = iter(predictions)

    def evaluate(model, loader, device, loss_fn=None, amp_dtype=None, progress=False, tta_flip=False):
        y_pred = np.asarray(next(calls))
        return {"acc": float((y_pred == y_true).mean()), "y_true": y_true, "y_pred": y_pred,
                "probs": np.eye(3)[y_pred], "loss": 1.0 - float((y_pred == y_true).mean())}

    monkeypatch.setattr(H.train, "evaluate", evaluate)


@pytest.mark.parametrize("monitor, kept", [("val_acc", 1), ("val_f1_macro", 2)])
def test_monitor_val_f1_macro_keeps_the_epoch_where_the_rare_classes_are_predicted(demo_cache, tmp_path, monkeypatch,
                                                                                   monitor, kept):
    """Epoch 1 predicts only the majority class (accuracy 4/6, macro F1 (0.8 + 0 + 0) / 3); epoch 2 predicts all
    three (accuracy 3/6; F1 per class 0.4, 0.5, 0.667: macro 0.522); epoch 3 repeats epoch 1. Accuracy keeps
    epoch 1, macro F1 keeps epoch 2; every row records both."""
    y_true = np.array([0, 0, 0, 0, 1, 2])
    _scripted_validation(monkeypatch, [[0] * 6, [0, 1, 1, 2, 1, 2], [0] * 6], y_true)
    cache, classes = demo_cache
    _, run = _fit(cache, classes, tmp_path, linear=True, monitor=monitor)
    assert [h["val_f1_macro"] for h in run["history"]] == pytest.approx([0.8 / 3, (0.4 + 0.5 + 2 / 3) / 3, 0.8 / 3])
    assert [h["val_acc"] for h in run["history"]] == pytest.approx([4 / 6, 3 / 6, 4 / 6])
    assert run["best"]["epoch"] == kept and run["best"]["metric"] == monitor
    assert H.load_checkpoint(run["best_path"])["epoch"] == kept
    # resuming the folder with another selection rule would mix two runs
    other = "val_acc" if monitor != "val_acc" else "val_f1_macro"
    with pytest.raises(ValueError, match=r"other settings \(monitor\)"):
        _fit(cache, classes, tmp_path, linear=True, num_epochs=4, monitor=other)


def test_best_fold_is_the_highest_score_or_the_lowest_loss():
    assert H.best_fold([{"metric": "val_acc", "value": v} for v in (0.5, 0.7, 0.6)]) == 1
    assert H.best_fold([{"metric": "val_f1_macro", "value": v} for v in (0.5, 0.4, 0.6)]) == 2
    assert H.best_fold([{"metric": "val_loss", "value": v} for v in (0.5, 0.3, 0.6)]) == 1
    with pytest.raises(ValueError, match="different metrics"):
        H.best_fold([{"metric": "val_loss", "value": 0.5}, {"metric": "val_acc", "value": 0.5}])


def test_macro_f1_of_the_history_is_the_metrics_macro_f1_of_the_kept_weights(demo_cache, tmp_path):
    cache, classes = demo_cache
    model, run = _fit(cache, classes, tmp_path, monitor="val_f1_macro")
    f1s = [h["val_f1_macro"] for h in run["history"]]
    assert run["best"]["value"] == max(f1s) and run["best"]["epoch"] == f1s.index(max(f1s)) + 1
    model.load_state_dict(H.load_checkpoint(run["best_path"])["model"])
    ev = H.evaluate(model, _loaders(cache)[1], "cpu")
    assert H.compute_metrics(ev["y_true"], ev["y_pred"], classes)["f1_macro"] == pytest.approx(max(f1s))
    with pytest.raises(ValueError, match="monitor must be one of 'val_acc', 'val_f1_macro', 'val_loss', not 'f1'"):
        _fit(cache, classes, tmp_path / "bad", monitor="f1")
    assert not (tmp_path / "bad").exists()  # refused before any file


def test_shifted_views_move_the_content_and_fill_the_border_per_channel():
    wide = torch.arange(24.0).reshape(1, 1, 4, 6)  # not square: columns move with dx, rows with dy
    (_, right, _, down, _) = (v for v, _, _ in H.shifted_views(wide, 1, 0.0))
    torch.testing.assert_close(right[0, 0, 1], torch.tensor([0.0, 6.0, 7.0, 8.0, 9.0, 10.0]))
    torch.testing.assert_close(down[0, 0, :, 5], torch.tensor([0.0, 5.0, 11.0, 17.0]))
    x = torch.arange(32.0).reshape(1, 2, 4, 4)  # channel 0: 0..15, channel 1: 16..31
    views = H.shifted_views(x, 1, [-1.0, -2.0])
    assert [(dx, dy) for _, dx, dy in views] == [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
    assert views[0][0] is x
    right, left, down, up = (v for v, _, _ in views[1:])
    torch.testing.assert_close(right[0, 0, 0], torch.tensor([-1.0, 0.0, 1.0, 2.0]))     # moved right, black column
    torch.testing.assert_close(right[0, 1, :, 0], torch.full((4,), -2.0))               # the second channel's black
    torch.testing.assert_close(left[0, 0, 3], torch.tensor([13.0, 14.0, 15.0, -1.0]))
    torch.testing.assert_close(down[0, 0, :, 1], torch.tensor([-1.0, 1.0, 5.0, 9.0]))
    torch.testing.assert_close(up[0, 1, :, 0], torch.tensor([20.0, 24.0, 28.0, -2.0]))
    assert len(H.shifted_views(x, 0, 0.0)) == 1
    for bad in (-1, 2, 1.5, True):  # a quarter of the 4-px side is 1
        with pytest.raises(ValueError, match="tta_shift must be a whole number of pixels from 0 to 1"):
            H.shifted_views(x, bad, 0.0)


def test_each_epoch_line_says_how_long_the_rest_of_the_run_will_take(demo_cache, tmp_path, capsys):
    assert H.time_left([240.0, 250.0, 9000.0], 99) == "~6 h 52 min left"  # the median: one slow epoch does not count
    assert H.time_left([50.0], 3) == "~2 min left" and H.time_left([5.0], 1) == "~1 min left"
    assert H.time_left([50.0], 0) == "" and H.time_left([], 5) == ""
    cache, classes = demo_cache
    _fit(cache, classes, tmp_path, num_epochs=3, progress=True)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 3 and "left)" in lines[0] and "left)" in lines[1] and "left" not in lines[2]


def test_amp_selection_and_bf16_on_cpu(demo_cache, tmp_path):
    assert H.resolve_amp("auto", "cpu") is None and H.resolve_amp("off", "cuda") is None
    assert H.resolve_amp("bf16", "cpu") == torch.bfloat16 and H.resolve_amp("fp16", "cpu") == torch.float16
    with pytest.raises(ValueError):
        H.resolve_amp("fp8", "cpu")
    # Apple MPS: fp16 autocast where this torch has it, else float32 and a message (no Mac here: the choice only)
    assert H.resolve_amp("auto", "mps") == (torch.float16 if torch.amp.autocast_mode.is_autocast_available("mps")
                                            else None)
    cache, classes = demo_cache
    _, run = _fit(cache, classes, tmp_path, num_epochs=1, amp="bf16")
    assert np.isfinite(run["history"][0]["train_loss"])


def test_cpu_amp_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch):
    for avx512_bf16, amx, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "off")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert H.cpu_amp() == expected
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probe: fp32
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert H.cpu_amp() == "off"


def _lr_trace(steps=40, **kw):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = H.build_scheduler(opt, num_epochs=4, steps_per_epoch=10, **kw)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_scheduler_warmup_cosine_and_restarts():
    lrs = _lr_trace(warmup_epochs=1)
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0) and lrs[-1] < 0.01
    lrs = _lr_trace(restart_epochs=2)
    assert lrs[20] == pytest.approx(1.0) and lrs[19] < 0.05  # warm restart at epoch 2


def test_plan_epochs_costs_the_epochs_left_at_the_recent_pace():
    assert H.plan_epochs([10.0, 10.0], budget_s=100, cap=50) == 10          # 80 s left at 10 s: 8 more
    assert H.plan_epochs([10.0, 10.0, 20.0], budget_s=100, cap=50) == 6     # slower now: 60 s at 20 s, 3 more
    assert H.plan_epochs([10.0] * 7 + [12.0], budget_s=200, cap=50) == 17   # 118 s left at 12 s (not the mean, 10.4): 9 more
    assert H.plan_epochs([10.0, 10.0], budget_s=100, cap=4) == 4            # never more than asked for
    assert H.plan_epochs([60.0, 60.0], budget_s=100, cap=50) == 2           # over the budget: what was done


class _Clock:
    """A clock that advances one second per training forward pass: epoch times that do not depend on the machine."""

    def __init__(self):
        self.now = 0.0

    def time(self):
        return self.now


class _ClockedNet(TinyNet):
    def __init__(self, num_classes, clock):
        super().__init__(num_classes)
        self.clock, self.shares = clock, []

    def set_progress(self, progress):  # the share of training done, as GReFEL's trust ramp reads it
        self.shares.append(progress)

    def forward(self, x):
        if self.training:
            self.clock.now += 1.0
        return super().forward(x)


def _fit_on_a_clock(cache, classes, out, monkeypatch, **kw):
    import helpers.train

    clock = _Clock()
    monkeypatch.setattr(helpers.train, "time", clock)  # only the engine's clock
    torch.manual_seed(0)
    model = _ClockedNet(len(classes), clock)
    train, val = _loaders(cache)
    budget = 3.5 * len(train)  # epochs of len(train) steps: 3.5 epochs' time
    run = H.fit(model, train, val, out, num_epochs=10, lr=1e-2, weight_decay=1e-4, device="cpu", seed=7,
                progress=False, warmup_epochs=0.5, time_budget_s=budget, **kw)
    return model, run


def test_a_time_budget_ends_the_cosine_with_the_last_epoch_that_fits_and_resumes_exactly(demo_cache, tmp_path,
                                                                                        monkeypatch):
    cache, classes = demo_cache
    model, run = _fit_on_a_clock(cache, classes, tmp_path / "full", monkeypatch)
    steps = len(_loaders(cache)[0])
    assert [r["epoch_s"] for r in run["history"]] == [float(steps)] * 3
    # after epoch 1: 2.5 epochs' time left, 2 more fit; 10 were the most asked for
    assert [r["planned_epochs"] for r in run["history"]] == [3, 3, 3]
    assert run["epochs_run"] == run["planned_epochs"] == 3 and run["time_budget_s"] == 3.5 * steps
    assert run["history"][-1]["lr"] < 1e-2 * 0.01                          # annealed, not cut at a tenth of 10
    assert model.shares[-1] == pytest.approx((3 - 1 / steps) / 3)          # the trust ramp's share reaches the end

    with pytest.raises(KeyboardInterrupt):
        _fit_on_a_clock(cache, classes, tmp_path / "cut", monkeypatch, on_epoch_end=_kill_after_epoch_2)
    _, resumed = _fit_on_a_clock(cache, classes, tmp_path / "cut", monkeypatch)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    for a, b in zip(run["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5) and a["lr"] == pytest.approx(b["lr"])


def test_a_time_budget_is_checked_and_part_of_what_resume_compares(demo_cache, tmp_path, monkeypatch):
    cache, classes = demo_cache
    for bad in (0, -5, "2h"):
        with pytest.raises(ValueError, match="time_budget_s must be"):
            _fit(cache, classes, tmp_path / "bad", time_budget_s=bad)
    with pytest.raises(ValueError, match="restart_epochs"):
        _fit(cache, classes, tmp_path / "bad", time_budget_s=60, restart_epochs=1)
    with pytest.raises(KeyboardInterrupt):
        _fit(cache, classes, tmp_path / "run", on_epoch_end=_kill_after_epoch_2)
    with pytest.raises(ValueError, match="time_budget_s"):
        _fit(cache, classes, tmp_path / "run", time_budget_s=600)


def test_class_weights_inverse_frequency():
    w = H.class_weights_from_labels(np.array([0, 0, 0, 1]), 3)
    assert w[0] < w[1] and w[2] == 0 and w[:2].mean() == pytest.approx(1.0)
    assert float(w[1] / w[0]) == pytest.approx(3.0)  # 1/count: class 1 is three times rarer


def test_class_weighted_setting_gives_a_power_of_the_inverse_frequency():
    labels = np.array([0] * 9 + [1])
    assert H.class_weights_for(None, labels, 2) is None and H.class_weights_for(False, labels, 2) is None
    torch.testing.assert_close(H.class_weights_for(True, labels, 2), H.class_weights_from_labels(labels, 2))
    sqrt = H.class_weights_for(0.5, labels, 2)  # the square root: 9x rarer weighs 3x, mean 1
    torch.testing.assert_close(sqrt, torch.tensor([0.5, 1.5]))
    for bad in ("sqrt", -1, 3.0):
        with pytest.raises(ValueError, match="class_weighted must be"):
            H.class_weight_power(bad)


# ----------------------------------------------------------------------------- models

def test_gcvit_small_with_7_class_head_matches_the_seed_count():
    model, _ = H.create_classifier("gcvit_small", 7, 224)
    assert H.count_parameters(model)["total"] == 50_522_348


def test_finetune_strategies_change_trainable_counts():
    model, _ = H.create_classifier("gcvit_xxtiny", 6, 64)
    full = H.set_finetune_strategy(model, "full")
    partial = H.set_finetune_strategy(model, "partial", frozen_stages=2)
    head = H.set_finetune_strategy(model, "head")
    head_params = sum(p.numel() for p in model.head.parameters())
    assert full["trainable"] == full["total"] > partial["trainable"] > head["trainable"] == head_params
    with pytest.raises(ValueError):
        H.set_finetune_strategy(model, "partial", frozen_stages=9)


def test_gcvit_size_constraints_are_explained():
    with pytest.raises(ValueError, match="multiple of 32.*use 96 or 128"):
        H.validate_gcvit_size("gcvit_xxtiny", 100, "none")
    with pytest.raises(ValueError, match="224 px"):
        H.validate_gcvit_size("gcvit_xxtiny", 96, "hub")
    H.validate_gcvit_size("gcvit_xxtiny", 96, "none")


def test_local_weights_backbone_file_and_pipeline_checkpoint_with_head_reset(tmp_path):
    import timm

    backbone = timm.create_model("gcvit_xxtiny", num_classes=1000, img_size=64)
    torch.save(backbone.state_dict(), tmp_path / "timm.pth")
    model, info = H.create_classifier("gcvit_xxtiny", 6, 64, weights=str(tmp_path / "timm.pth"))
    assert info["source"] == str(tmp_path / "timm.pth") and info["sha256"] == H.file_sha256(tmp_path / "timm.pth")
    assert not [k for k in info["missing_keys"] if k.startswith("backbone.")]
    torch.testing.assert_close(model.backbone.stem.conv1.weight, backbone.stem.conv1.weight)
    # A pipeline checkpoint trained on 8 classes (FER+) reused for 6: backbone kept, last layer reset.
    donor, _ = H.create_classifier("gcvit_xxtiny", 8, 64)
    H.save_checkpoint(tmp_path / "ferplus.pth", model=donor.state_dict(), class_names=list("abcdefgh"))
    model, info = H.create_classifier("gcvit_xxtiny", 6, 64, weights=str(tmp_path / "ferplus.pth"))
    assert info["head_reset"] and info["missing_keys"] == ["head.4.weight", "head.4.bias"]
    torch.testing.assert_close(model.head[0].weight, donor.head[0].weight)
    assert info["source_class_names"] == list("abcdefgh")
    # Same class count, other classes (or order): the last layer is reset all the same.
    model, info = H.create_classifier("gcvit_xxtiny", 8, 64, weights=str(tmp_path / "ferplus.pth"),
                                      class_names=list("abcdefgx"))
    assert info["head_reset"] and info["missing_keys"] == ["head.4.weight", "head.4.bias"]
    model, info = H.create_classifier("gcvit_xxtiny", 8, 64, weights=str(tmp_path / "ferplus.pth"),
                                      class_names=list("abcdefgh"))
    assert not info["head_reset"] and not info["missing_keys"]
    torch.testing.assert_close(model.head[4].weight, donor.head[4].weight)
    with pytest.raises(H.WeightsUnavailableError, match="shape"):  # trained at another size
        H.create_classifier("gcvit_xxtiny", 6, 96, weights=str(tmp_path / "timm.pth"))
    with pytest.raises(H.WeightsUnavailableError, match="not found"):
        H.create_classifier("gcvit_xxtiny", 6, 64, weights=str(tmp_path / "missing.pth"))
    # DistributedDataParallel's "module." prefix is removed; a file of another model loads nothing and is refused
    torch.save({f"module.{k}": v for k, v in donor.state_dict().items()}, tmp_path / "ddp.pth")
    model, info = H.create_classifier("gcvit_xxtiny", 8, 64, weights=str(tmp_path / "ddp.pth"))
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(model.backbone.stem.conv1.weight, donor.backbone.stem.conv1.weight)
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(H.WeightsUnavailableError, match=r"only 0 of the \d+ backbone weights"):
        H.create_classifier("gcvit_xxtiny", 6, 64, weights=str(tmp_path / "resnet.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(H.WeightsUnavailableError, match="junk.pth"):
        H.create_classifier("gcvit_xxtiny", 6, 64, weights=str(tmp_path / "junk.pth"))


def test_unreachable_hub_weights_stop_loudly_unless_random_init_allowed(monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("no internet")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(H.WeightsUnavailableError, match="weights='/path/to/file'"):
        H.create_classifier("gcvit_xxtiny", 6, 224, weights="hub")
    model, info = H.create_classifier("gcvit_xxtiny", 6, 224, weights="hub", allow_random_init=True)
    assert info["requested"] == "hub" and info["source"] == "none (hub unavailable)" and "no internet" in info["error"]


# ----------------------------------------------------------------------------- protocols

def _meta(n_subjects=6, per=12, dup=True):
    rows = []
    for s in range(n_subjects):
        for i in range(per):
            rows.append({"label": i % 3, "split": "", "subject": str(s), "sha1": f"{s}-{i}"})
    meta = pd.DataFrame(rows)
    if dup:
        meta.loc[1, "sha1"] = meta.loc[0, "sha1"] = "same"
        meta.loc[1, "subject"] = "0"
    return meta


def test_subject_protocol_without_subject_ids_says_how_to_give_them():
    meta = pd.DataFrame({"label": [0, 1] * 10, "subject": ["s1"] * 18 + ["", ""], "sha1": [str(i) for i in range(20)]})
    with pytest.raises(ValueError, match=r"2 of 20 have none. Give them with label_pattern .*subject column"):
        H.make_folds(meta, "subject", num_folds=2)


def test_subject_folds_never_share_a_subject():
    meta = _meta()
    folds = H.make_folds(meta, "subject", num_folds=3)
    assert len(folds) == 3
    tested = np.concatenate([f["test"] for f in folds])
    assert sorted(tested) == list(range(len(meta)))  # every image tested exactly once
    for f in folds:
        sides = [set(meta["subject"].to_numpy()[f[p]]) for p in ("train", "val", "test")]
        assert not (sides[0] & sides[2]) and not (sides[1] & sides[2]) and not (sides[0] & sides[1])


def test_kfold_keeps_duplicates_together_and_val_inside_the_training_side():
    meta = _meta()
    folds = H.make_folds(meta, "kfold", num_folds=4)
    for f in folds:
        assert not set(f["val"]) & set(f["test"]) and not set(f["train"]) & set(f["test"])
        assert ({0, 1} <= set(f["test"])) or not ({0, 1} & set(f["test"]))


def test_given_protocol_uses_archive_splits_or_a_random_split():
    meta = _meta(dup=False)
    meta["split"] = np.where(np.arange(len(meta)) % 4 == 0, "val", "train")
    (fold,) = H.make_folds(meta, "given")
    np.testing.assert_array_equal(fold["test"], np.flatnonzero(meta["split"] == "val"))
    assert set(fold["val"]) <= set(np.flatnonzero(meta["split"] == "train"))
    meta["split"] = ""
    (fold,) = H.make_folds(meta, "given", test_fraction=0.25)
    assert abs(len(fold["test"]) - 18) <= 3
    with pytest.raises(ValueError, match="subject id"):
        H.make_folds(meta.assign(subject=""), "subject")


def test_subject_folds_keep_a_duplicate_filed_under_two_subjects_on_one_side():
    meta = _meta()
    meta.loc[1, "subject"] = "1"  # image 1 is a copy of image 0 (subject 0) filed under subject 1
    for f in H.make_folds(meta, "subject", num_folds=3):
        sides = [set(f[p]) for p in ("train", "val", "test")]
        assert sum({0, 1} & s != set() for s in sides) == 1, "the duplicate pair straddles a split"
    # without such a link the folds are those of the subjects alone (ids numbered the same way)
    plain = _meta(dup=False)
    a = H.make_folds(plain, "subject", num_folds=3)
    groups = pd.factorize(plain["subject"])[0]
    from sklearn.model_selection import StratifiedGroupKFold
    ref = StratifiedGroupKFold(n_splits=3, shuffle=True, random_state=42).split(np.arange(len(plain)), plain["label"], groups)
    for f, (_, test) in zip(a, ref):
        np.testing.assert_array_equal(f["test"], test)


@pytest.mark.parametrize("policy", ["warn", "error", "drop"])
def test_given_splits_report_refuse_or_drop_copies_of_training_images(policy):
    meta = _meta(dup=False)
    meta["split"] = np.where(np.arange(len(meta)) % 4 == 0, "test", np.where(np.arange(len(meta)) % 4 == 1, "val", "train"))
    meta.loc[4, "sha1"] = meta.loc[2, "sha1"]   # a test image that is a copy of a training image
    meta.loc[5, "sha1"] = meta.loc[3, "sha1"]   # a val image, likewise
    if policy == "error":
        with pytest.raises(ValueError, match="2 images of the given val/test splits are byte-identical"):
            H.make_folds(meta, "given", cross_split_duplicates=policy)
        return
    with pytest.warns(UserWarning, match="byte-identical"):
        (fold,) = H.make_folds(meta, "given", cross_split_duplicates=policy)
    assert fold["cross_split_duplicates"] == {"val": 1, "test": 1}
    assert (4 in fold["test"] and 5 in fold["val"]) == (policy == "warn")
    assert (4 not in fold["test"] and 5 not in fold["val"]) == (policy == "drop")


def test_resume_refuses_a_checkpoint_written_with_other_settings(demo_cache, tmp_path):
    cache, classes = demo_cache
    _fit(cache, classes, tmp_path, num_epochs=1, config={"lr": 1e-2})
    with pytest.raises(ValueError, match="other settings.*lr"):
        _fit(cache, classes, tmp_path, num_epochs=2, config={"lr": 5e-3})
    _, run = _fit(cache, classes, tmp_path, num_epochs=2, config={"lr": 5e-3}, resume=False)
    assert run["epochs_run"] == 2
    assert H.config_fingerprint({"a": 1, "b": 2}, exclude=("b",)) == H.config_fingerprint({"a": 1, "b": 3}, exclude=("b",))
    assert H.config_fingerprint({"a": 1}) != H.config_fingerprint({"a": 2})
    # same settings, another weights file (or data) behind them: another run
    same = {"weights": "w.pth"}
    assert H.config_fingerprint(same, contents={"weights": "aa"}) != H.config_fingerprint(same, contents={"weights": "bb"})
    assert H.config_fingerprint(same, contents={"weights": "aa"}) == H.config_fingerprint(same, contents={"weights": "aa"})


def test_torch_compile_warm_up_leaves_no_trace_and_records_its_time(demo_cache, tmp_path):
    """torch_compile=True compiles forward and backward on one batch before training: the weights,
    BatchNorm statistics and gradients are as they were, and the compiled model trains like the eager one."""
    cache, classes = demo_cache
    torch.manual_seed(0)
    model = TinyNet(len(classes)).train()
    model.body[5].p = 0.0  # compiled dropout draws other random numbers than eager: compare without it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, _ = _loaders(cache)
    loss_fn = H.cross_entropy_loss()
    compiled, info = H.compile_for_training(model, True, train, loss_fn, "cpu", progress=False)
    assert info["used"] and info["compile_s"] > 0 and compiled is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats restored
    assert all(p.grad is None for p in model.parameters())
    x, y = next(iter(train))
    assert torch.allclose(loss_fn(compiled(x), y, 0.0), loss_fn(model(x), y, 0.0), atol=1e-5)


def test_torch_compile_auto_is_off_on_cpu_and_a_failed_compile_trains_eagerly_saying_so(
        demo_cache, tmp_path, monkeypatch, capsys):
    cache, classes = demo_cache
    _, run = _fit(cache, classes, tmp_path / "auto", num_epochs=1, torch_compile="auto")
    assert run["compile"] == {"requested": "auto", "used": False, "compile_s": None, "why": "auto: off on cpu (on CUDA only)"}

    def broken(model, **kw):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    _, run = _fit(cache, classes, tmp_path / "failed", num_epochs=1, torch_compile=True)
    assert not run["compile"]["used"] and "RuntimeError: no C++ compiler found" in run["compile"]["why"]
    assert "WARNING: torch.compile failed, training eagerly" in capsys.readouterr().out
    assert len(run["history"]) == 1 and np.isfinite(run["history"][0]["train_loss"])
    with pytest.raises(ValueError, match="torch_compile must be"):
        _fit(cache, classes, tmp_path / "bad", num_epochs=1, torch_compile="yes")


@pytest.mark.parametrize("model_ema", [None, 0.9])
def test_channels_last_trains_the_same_weights_in_nhwc_and_leaves_no_hook(demo_cache, tmp_path, model_ema):
    """channels_last=True: the convolution sees NHWC inputs during training and validation, the weights
    come out as with NCHW (a layout, not a transform), the run records it and the input hook is gone;
    with a weight average too (its copy validates in NHWC and is what best_model.pth keeps)."""
    cache, classes = demo_cache
    seen = []

    def train(out, channels_last):
        torch.manual_seed(0)
        model = TinyNet(len(classes))
        # a bias before BatchNorm has rounding noise for a gradient, which AdamW turns into full steps
        model.body[0].register_parameter("bias", None)
        model.body[0].register_forward_pre_hook(
            lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        train, val = _loaders(cache)
        run = H.fit(model, train, val, out, num_epochs=1, lr=1e-2, weight_decay=1e-4, device="cpu", seed=7,
                    progress=False, warmup_epochs=0.5, channels_last=channels_last, model_ema=model_ema)
        return model, run

    plain, ref = train(tmp_path / "nchw", False)
    assert seen and not any(seen)
    seen.clear()
    model, run = train(tmp_path / "nhwc", True)
    assert run["channels_last"] is True and ref["channels_last"] is False
    assert seen and all(seen)
    assert model.body[0].weight.is_contiguous(memory_format=torch.channels_last)
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    kept = [H.load_checkpoint(tmp_path / d / "best_model.pth")["model"] for d in ("nchw", "nhwc")]
    for name, a in kept[0].items():
        torch.testing.assert_close(a, kept[1][name], atol=1e-4, rtol=1e-4, msg=name)
    if model_ema is not None:  # the average, not the live weights, was kept
        assert not torch.allclose(kept[1]["body.6.weight"], model.state_dict()["body.6.weight"])
    assert not model._forward_pre_hooks  # after fit, inputs are left as they come
    seen.clear()
    model(torch.zeros(2, 3, 32, 32))
    assert seen == [False]
    with pytest.raises(ValueError, match="channels_last must be True or False"):
        _fit(cache, classes, tmp_path / "bad", num_epochs=1, channels_last="auto")


def test_learning_rate_rules_for_other_batch_sizes():
    assert H.scaled_lr(1e-3, 128, 32, "none") == 1e-3
    assert H.scaled_lr(1e-3, 128, 32, "sqrt") == pytest.approx(2e-3)
    assert H.scaled_lr(1e-3, 128, 32, "linear") == pytest.approx(4e-3)
    assert H.scaled_lr(1e-3, 16, 32, "linear") == pytest.approx(5e-4)
    # a fold's lr: the global batch under torchrun, the profile's batch as the reference by default
    cfg = {"lr": 1e-4, "batch_size": 256, "lr_reference_batch": 32, "lr_scaling": "sqrt"}
    assert H.fold_lr(cfg) == pytest.approx(1e-4 * 8 ** 0.5)
    assert H.fold_lr({"lr": 1e-4, "batch_size": 256}) == 1e-4
    with pytest.raises(ValueError, match="lr_scaling must be one of"):
        H.scaled_lr(1e-3, 64, 32, "square")


def test_layer_decay_scales_each_backbone_layer_below_the_top_and_the_schedule_keeps_the_ratios():
    model, _ = H.create_classifier("gcvit_xxtiny", 6, 64)
    H.set_finetune_strategy(model, "partial", frozen_stages=1)  # frozen parameters are left out
    opt = H.build_optimizer(model, 1e-3, 0.05, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(lr_of) == sum(len(g["params"]) for g in opt.param_groups) == len(trainable)  # each in one group
    expected = {"backbone.stem.": 0.0625, "backbone.stages.0.": 0.125, "backbone.stages.1.": 0.25,
                "backbone.stages.2.": 0.5, "backbone.stages.3.": 1.0, "head.": 1.0}
    for name, p in trainable:
        scale = next(v for k, v in expected.items() if name.startswith(k))
        assert lr_of[id(p)] == pytest.approx(1e-3 * scale), name
    assert all(g["weight_decay"] == 0 for g in opt.param_groups if any(p.ndim <= 1 for p in g["params"]))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and not any(id(p) in lr_of for p in frozen)
    sched = H.build_scheduler(opt, num_epochs=2, steps_per_epoch=5, warmup_epochs=1)
    for _ in range(7):
        opt.step()
        sched.step()
    factor = opt.param_groups[0]["lr"] / (1e-3 * opt.param_groups[0]["lr_scale"])
    assert 0 < factor < 1 and all(g["lr"] == pytest.approx(1e-3 * g["lr_scale"] * factor) for g in opt.param_groups)


def test_layer_decay_off_is_one_learning_rate_and_bad_settings_are_refused():
    model, _ = H.create_classifier("gcvit_xxtiny", 6, 64)
    for off in (None, 1.0):
        opt = H.build_optimizer(model, 1e-3, 0.05, layer_decay=off)
        assert len(opt.param_groups) == 2 and {g["lr"] for g in opt.param_groups} == {1e-3}
    for bad in (0, 1.5, -0.5):
        with pytest.raises(ValueError, match="layer_decay must be in"):
            H.build_optimizer(model, 1e-3, 0.05, layer_decay=bad)
    with pytest.raises(ValueError, match="group_matcher"):  # no timm backbone whose layers timm can name
        H.build_optimizer(TinyNet(3), 1e-3, 0.05, layer_decay=0.75)


def test_model_ema_averages_the_weights_after_every_step_and_is_what_is_validated_and_kept(demo_cache, tmp_path):
    """By value: the average follows e_1 = w_1, e_k = d_k e_(k-1) + (1 - d_k) w_k over the live weights w_k after
    each step, d_k = decay; validation and best_model.pth use it."""
    cache, classes = demo_cache
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, len(classes)))  # no buffers: weights only
    train, val = _loaders(cache)
    base, seen = H.cross_entropy_loss(), []

    def loss_fn(outputs, y, progress):  # the weights before each training step = after the one before
        if torch.is_grad_enabled():
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return base(outputs, y, progress)

    decay = 0.9
    run = H.fit(model, train, val, tmp_path / "ema", num_epochs=3, lr=1e-2, weight_decay=1e-4, device="cpu", seed=7,
                progress=False, loss_fn=loss_fn, model_ema=decay)
    live = seen[1:] + [model.state_dict()]  # w_1 .. w_N
    steps = len(train)
    assert len(live) == 3 * steps and run["model_ema"] == decay
    expected, ema = [], None
    for k, w in enumerate(live, start=1):
        d = 0.0 if k == 1 else decay
        ema = {n: v.clone() for n, v in w.items()} if ema is None else {n: d * ema[n] + (1 - d) * w[n] for n in w}
        if k % steps == 0:
            expected.append(ema)
    last = H.load_checkpoint(tmp_path / "ema" / "last.pth")
    for n, v in expected[-1].items():
        torch.testing.assert_close(last["ema"][n], v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(last["model"][n], model.state_dict()[n])  # the live weights kept beside it
    assert not torch.allclose(last["ema"]["1.weight"], last["model"]["1.weight"])  # it really is another model
    best = run["best"]["epoch"]
    kept = H.load_checkpoint(run["best_path"])["model"]
    for n, v in expected[best - 1].items():
        torch.testing.assert_close(kept[n], v, rtol=1e-5, atol=1e-6)
    # each epoch's validation figure is the average's
    check = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, len(classes)))
    for row, weights in zip(run["history"], expected):
        check.load_state_dict(weights)
        assert H.evaluate(check, val, "cpu")["acc"] == pytest.approx(row["val_acc"])


def test_val_tta_flip_selects_by_the_flip_averaged_validation_and_keeps_the_one_view_figure(demo_cache, tmp_path):
    cache, classes = demo_cache
    model, run = _fit(cache, classes, tmp_path / "tta", linear=True, val_tta_flip=True)
    _, val = _loaders(cache)
    tta, one = H.evaluate(model, val, "cpu", tta_flip=True), H.evaluate(model, val, "cpu")
    assert not np.allclose(tta["probs"], one["probs"])  # the mirror image really changes the prediction
    last = run["history"][-1]  # the last epoch's figures are those of the weights fit leaves in the model
    assert last["val_acc"] == pytest.approx(tta["acc"]) and last["val_acc_single"] == pytest.approx(one["acc"])
    assert run["val_tta_flip"] and H.load_checkpoint(tmp_path / "tta" / "last.pth")["val_tta_flip"]
    # resuming the folder with the other selection rule would mix two runs
    with pytest.raises(ValueError, match=r"other settings \(val_tta_flip\)"):
        _fit(cache, classes, tmp_path / "tta", linear=True, num_epochs=4)
    _, plain = _fit(cache, classes, tmp_path / "plain", linear=True)
    assert "val_acc_single" not in plain["history"][-1] and not plain["val_tta_flip"]


def test_model_ema_resumes_exactly_and_refuses_a_checkpoint_without_it(demo_cache, tmp_path):
    cache, classes = demo_cache
    _, full = _fit(cache, classes, tmp_path / "full", model_ema=0.8)

    with pytest.raises(KeyboardInterrupt):
        _fit(cache, classes, tmp_path / "cut", model_ema=0.8, on_epoch_end=_kill_after_epoch_2)
    _, resumed = _fit(cache, classes, tmp_path / "cut", model_ema=0.8)
    assert [h["val_acc"] for h in resumed["history"]] == pytest.approx([h["val_acc"] for h in full["history"]])
    a, b = (H.load_checkpoint(p / "last.pth")["ema"] for p in (tmp_path / "full", tmp_path / "cut"))
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match=r"other settings \(model_ema\)"):
        _fit(cache, classes, tmp_path / "cut", num_epochs=4)  # the same folder without the average
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="model_ema must be in"):
            _fit(cache, classes, tmp_path / "bad", model_ema=bad)


@pytest.mark.parametrize("batch", [0, -4, 2.5, True, "64"])
def test_pretraining_refuses_a_batch_that_is_not_a_positive_integer(tmp_path, batch):
    with pytest.raises(ValueError, match="pretrain_batch_size must be a positive integer"):
        H.pretrain_classifier(tmp_path / "missing.zip", tmp_path, {"batch_size": 16}, "cpu", 1, 3e-4, batch_size=batch)


def test_mixup_blends_each_image_with_its_mirror_in_the_batch_and_mixes_the_targets_by_the_same_share():
    """Pinned by value: image i of a batch of constant images (value i) becomes lam * i + (1 - lam) * (B - 1 - i),
    its target lam * own + (1 - lam) * partner's; the landmarks stay each sample's own, lam >= 0.5 (own image
    dominant), and a soft target (votes) mixes the same way."""
    torch.manual_seed(0)
    b, c = 4, 3
    x = torch.arange(b, dtype=torch.float32)[:, None, None, None].expand(b, 1, 8, 8).clone()
    points = torch.rand(b, 68, 2)
    mix = H.BatchMix(mixup=0.4)
    seen = set()
    for _ in range(20):
        (mixed, pts), lam = mix([x, points])
        assert 0.5 <= lam <= 1.0
        seen.add(round(lam, 6))
        want = lam * torch.arange(b) + (1 - lam) * torch.arange(b).flip(0)
        torch.testing.assert_close(mixed.amax((1, 2, 3)), want.float())
        torch.testing.assert_close(mixed.amin((1, 2, 3)), want.float())  # every pixel blended alike
        assert pts is points
        y = torch.tensor([0, 1, 2, 1])
        t = H.BatchMix.targets(y, lam, c)
        torch.testing.assert_close(t[0], torch.tensor([lam, 1 - lam, 0.0]))  # own 0, partner (sample 3) 1
        torch.testing.assert_close(t.sum(-1), torch.ones(b))
        votes = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.2, 0.0, 0.8]])
        torch.testing.assert_close(H.BatchMix.targets(votes, lam, c)[0], lam * votes[0] + (1 - lam) * votes[3])
    assert len(seen) > 10  # a new share every batch


def test_cutmix_pastes_a_box_of_the_partner_and_its_share_is_the_targets_weight():
    torch.manual_seed(1)
    b = 4
    x = torch.arange(b, dtype=torch.float32)[:, None, None, None].expand(b, 3, 16, 16).clone()
    mix = H.BatchMix(cutmix=1.0)
    for _ in range(20):
        (mixed,), lam = mix([x])
        assert 0.5 <= lam <= 1.0
        for i in range(b):
            own = mixed[i] == i
            pasted = mixed[i] == b - 1 - i
            assert bool((own | pasted).all())  # nothing blended: each pixel is one image's or the other's
            assert pasted.float().mean().item() == pytest.approx(1 - lam)  # lam: the share left of its own image
    assert torch.equal(x[:, 0, 0, 0], torch.arange(b, dtype=torch.float32))  # the input batch is not changed


@pytest.mark.parametrize("bad", [-0.1, "0.2", True, float("nan")])
def test_batch_mix_refuses_an_alpha_that_is_not_a_number_at_least_0(bad):
    with pytest.raises(ValueError, match="mixup must be a Beta"):
        H.check_batch_mix(bad, 0.0)
    with pytest.raises(ValueError, match="cutmix must be a Beta"):
        H.BatchMix(0.0, bad)


def test_mixup_trains_on_mixed_batches_resumes_exactly_and_refuses_a_checkpoint_of_another_mix(demo_cache, tmp_path):
    cache, classes = demo_cache
    _, plain = _fit(cache, classes, tmp_path / "plain")
    _, full = _fit(cache, classes, tmp_path / "full", mixup=0.4, cutmix=1.0)
    assert full["mixup"] == 0.4 and full["cutmix"] == 1.0
    # the mixed targets reach the loss: another training loss than the same run without them
    assert full["history"][0]["train_loss"] != pytest.approx(plain["history"][0]["train_loss"], rel=1e-3)
    with pytest.raises(KeyboardInterrupt):
        _fit(cache, classes, tmp_path / "cut", mixup=0.4, cutmix=1.0, on_epoch_end=_kill_after_epoch_2)
    _, resumed = _fit(cache, classes, tmp_path / "cut", mixup=0.4, cutmix=1.0)
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx([h["train_loss"] for h in full["history"]],
                                                                          rel=1e-5)
    with pytest.raises(ValueError, match=r"other settings \(mixup, cutmix\)"):
        _fit(cache, classes, tmp_path / "cut", num_epochs=4)  # the same folder without the mix
    assert H.load_checkpoint(tmp_path / "plain" / "last.pth")["mixup"] == 0.0


def test_sgd_is_nesterov_momentum_with_l2_on_weights_only_and_bad_names_are_refused():
    """By value: two SGD steps of build_optimizer("sgd") equal Nesterov's update written out, with the L2 term
    on the conv / linear weights and none on biases and norm weights; AdamW stays the default."""
    torch.manual_seed(0)
    model = TinyNet(3)
    opt = H.build_optimizer(model, 0.1, 5e-4, optimizer="sgd")
    assert isinstance(opt, torch.optim.SGD) and isinstance(H.build_optimizer(model, 1e-3, 0.05), torch.optim.AdamW)
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])
    model.eval()  # no dropout: the same gradient function both steps
    grads = []
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
    for n, p in model.named_parameters():
        wd = 0.0 if p.ndim <= 1 else 5e-4
        w0 = start[n]
        g0 = grads[0][n] + wd * w0
        w1 = w0 - 0.1 * (g0 + 0.9 * g0)  # buffer b1 = g0; Nesterov step g + momentum * b
        g1 = grads[1][n] + wd * w1
        b2 = 0.9 * g0 + g1
        torch.testing.assert_close(p.detach(), w1 - 0.1 * (g1 + 0.9 * b2), msg=n)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        H.build_optimizer(model, 0.1, 5e-4, optimizer="adam")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        H.check_optimizer("SGD")


def test_fit_with_sgd_records_it_and_refuses_to_resume_an_adamw_checkpoint(demo_cache, tmp_path):
    cache, classes = demo_cache
    _, run = _fit(cache, classes, tmp_path / "sgd", num_epochs=1, optimizer="sgd", lr=0.05)
    assert run["optimizer"] == "sgd" and run["epochs_run"] == 1
    assert H.load_checkpoint(tmp_path / "sgd" / "last.pth")["optimizer_kind"] == "sgd"
    _fit(cache, classes, tmp_path / "adamw", num_epochs=1)
    with pytest.raises(ValueError, match="other settings.*optimizer_kind"):
        _fit(cache, classes, tmp_path / "adamw", num_epochs=2, optimizer="sgd")
    _, same = _fit(cache, classes, tmp_path / "sgd", num_epochs=2, optimizer="sgd", lr=0.05)  # resumes its own
    assert same["epochs_run"] == 2


def test_settings_added_later_leave_run_keys_as_they_were_at_their_old_values():
    cfg = {"lr": 1e-3, "mixup": 0.0, "cutmix": 0.2, "monitor": "val_acc", "optimizer": "sgd"}
    assert H.unchanged_later_settings(cfg) == ("mixup", "monitor")
    assert H.unchanged_later_settings({"lr": 1e-3}) == tuple(H.SETTINGS_ADDED_LATER)  # absent: as before them
    old = {"lr": 1e-3}  # a run keyed before the settings existed keeps its key with them at their old values
    new = {**old, **H.SETTINGS_ADDED_LATER}
    assert H.config_fingerprint(new, exclude=H.unchanged_later_settings(new)) == H.config_fingerprint(old)
    sgd = {**new, "optimizer": "sgd"}
    assert H.config_fingerprint(sgd, exclude=H.unchanged_later_settings(sgd)) != H.config_fingerprint(old)
    seeds = {**new, "train_seed": None, "train_seeds": [42, 1]}  # a notebook's own, beside the engine's
    assert H.unchanged_later_settings(seeds, also={"train_seed": None, "train_seeds": None}) == (
        *H.SETTINGS_ADDED_LATER, "train_seed")
