"""The Apple MPS path, kept honest on a CPU: no float64 anywhere in a step (MPS has none).

One training step, one evaluation and one prediction of each notebook's model run under
:func:`helpers.mps_dtype_guard`, which fails on any operation that takes or makes a float64
tensor, as an MPS run would.
"""

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

import helpers as H
from conftest import ROOT

GUARDED = "one training step, one evaluation and one prediction"


def test_the_guard_catches_a_float64_tensor_and_names_the_operation():
    with pytest.raises(TypeError, match="float64 tensor in a check: Apple MPS has no float64"):
        with H.mps_dtype_guard("a check"):
            torch.ones(2) + torch.as_tensor(np.ones(2))  # NumPy's float64 reaching a tensor


def _step_eval(model, dataset, loss_fn):
    loader = H.make_loader(dataset, 8, shuffle=True)
    opt = H.build_optimizer(model, 1e-3, 0.01)
    sched = H.build_scheduler(opt, 1, len(loader))
    H.train_one_epoch(model, loader, opt, sched, loss_fn, "cpu", 0, 1, progress=False)
    return H.evaluate(model, H.make_loader(dataset, 8, shuffle=False), "cpu", loss_fn, tta_flip=False)


def test_dfer_gcvit_step_evaluation_and_prediction_make_no_float64(demo_kmu_zip, tmp_path):
    root = H.extract_archive(demo_kmu_zip, tmp_path / "ex", verbose=False)
    index, report = H.discover_dataset(root, verbose=False)
    classes = sorted(report["counts"])
    index = index.groupby("label").head(3).reset_index(drop=True)
    cache = H.build_hdf5_cache(index, tmp_path / "c.h5", classes, 64, face_crop=False, progress=False)
    config = {"model_name": "gcvit_xxtiny", "image_size": 64, "channels": 1, "weights": "none", "dropout": 0.1,
              "allow_random_init": False, "finetune": "full", "frozen_stages": 0, "augment": "nir",
              "augment_erasing": 0.25}
    model, _, _ = H.build_classifier(config, classes)
    train_tf, eval_tf = H.classifier_transforms(config, model.data_config())
    with H.mps_dtype_guard(GUARDED):
        out = _step_eval(model, H.H5Dataset(cache, transform=train_tf), H.cross_entropy_loss(0.1))
        _, attrs = H.read_cache_meta(cache)
        norm = model.data_config()
        pred = H.Predictor(model, classes, attrs["preprocess"], norm["mean"], norm["std"])(index["path"][0])
    assert np.isfinite(out["loss"]) and set(pred["probabilities"]) == set(classes)


def test_grefel_step_evaluation_and_prediction_make_no_float64(tmp_path):
    nb = nbformat.read(ROOT / "GReFEL.ipynb", as_version=4)
    g = {"torch": torch, "np": np, "pd": pd, "H": H}
    for c in nb.cells:
        if "grefel-model" in c.metadata.get("tags", []):
            exec(compile(c.source, "GReFEL.ipynb", "exec"), g)
    index, _ = H.read_ferplus(H.prepare_ferplus(H.make_demo_ferplus(tmp_path / "ferplus-demo.zip"), tmp_path / "ex",
                                                verbose=False), verbose=False)
    index = index[index["label"] != ""].head(16).reset_index(drop=True)
    cache = H.build_hdf5_cache(index, tmp_path / "lm.h5", list(H.FERPLUS_CLASSES), 48, face_crop=False,
                               extra_columns=("votes",), landmarker=H.LandmarkDetector(), progress=False)
    config = {"embed_dim": 32, "num_heads": 4, "depth": 1, "patch_sizes": [12, 6, 3], "num_anchors_per_class": 3,
              "image_size": 48, "window": 3, "dropout": 0.1, "backbone": "resnet18", "components": "full",
              "backbone_args": {"channels": [8, 16, 32, 64], "stem_width": 8}}
    model = g["build_grefel"](config, 8)
    norm = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    t = H.build_transform("grefel", 48, norm["mean"], norm["std"], channels=1, keypoints=True, erasing=0.25)
    soft = H.H5Dataset(cache, transform=t, landmarks=True, soft_labels=True)
    votes = soft[0][2]  # the eight emotions' vote shares (it was all ten columns: soft labels could not train)
    assert votes.shape == (8,) and votes.dtype == np.float32 and votes.sum() == pytest.approx(1.0)
    with H.mps_dtype_guard(GUARDED):
        out = _step_eval(model, soft, g["grefel_loss"](model, label_smoothing=0.1))
    H.save_checkpoint(tmp_path / "m.pth", model=model.state_dict(), config=config,
                      class_names=list(H.FERPLUS_CLASSES), norm=norm, temperature=1.5)
    evaluator = g["GReFELEvaluator"](tmp_path / "m.pth")
    eval_ds = H.H5Dataset(cache, transform=evaluator.transform, landmarks=True)
    with H.mps_dtype_guard(GUARDED):
        pred = evaluator.predict_single_image(index["path"][0])
        views = evaluator.outputs(H.make_loader(eval_ds, 8, shuffle=False), tta_flip=True, tta_shift=2)  # 10 views
    assert np.isfinite(out["loss"]) and sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert views["final_probs"].shape == (len(eval_ds), 8) and views["final_probs"].dtype == np.float32
