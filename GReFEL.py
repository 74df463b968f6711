# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # GReFEL on FER+
#
# FER+ relabels the FER2013 faces with ten annotators each. This notebook reads the
# FERPlus archive, takes the majority-vote labels (keeping the votes for soft labels),
# computes 68 facial landmarks once and caches images, votes and landmarks to HDF5; the
# GReFEL model (geometry-aware anchors, reliability balancing) trains on that cache.

# %% [markdown]
# ## Setup

# %%
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

import helpers as H

device = H.select_device()
print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads")

# %% [markdown]
# ## Parameters
# Tagged `parameters` for papermill; `None` takes the profile's default.

# %% tags=["parameters"]
# run
profile = "smoke"              # "smoke" | "cpu" | "gpu" | "paper"
workdir = "data-exploration"   # where archives are looked for and outputs land
data_path = None               # FERPlus archive or folder | None: search workdir, else the generated demo
seed = 42                      # int
# data
image_size = None              # px, side of the cached crops (FER+ images are 48 px)
landmarks = None               # True: compute 68 dlib landmarks per image and cache them
max_per_split = None           # int: first N images of each split for quick runs | None: all

# %% [markdown]
# ## Configuration

# %%
PROFILES = {
    "smoke": dict(image_size=48, landmarks=True, max_per_split=200),
    "cpu": dict(image_size=64, landmarks=True, max_per_split=None),
    "gpu": dict(image_size=224, landmarks=True, max_per_split=None),
    "paper": dict(image_size=224, landmarks=True, max_per_split=None),
}
config = H.resolve_config(profile, PROFILES, dict(
    workdir=workdir, data_path=data_path, seed=seed, image_size=image_size, landmarks=landmarks,
    max_per_split=max_per_split))
workdir = Path(config["workdir"])
out_dir = workdir / "GReFEL"
out_dir.mkdir(parents=True, exist_ok=True)
print(json.dumps(config, indent=1))

# %% [markdown]
# ## Find and extract FERPlus
# Any archive or folder with "ferplus" in its name in the working directory, or `data_path`.
# Without one, a generated demo in the FERPlus layout is used, and the results say so.

# %%
source = Path(config["data_path"]) if config["data_path"] else H.find_archive(
    workdir, patterns=("*ferplus*", "*fer2013*"), any_archive=False)
data_kind = "real" if source else "generated demo"
if source is None:
    source = H.make_demo_ferplus(workdir / "demo" / "ferplus-demo.zip", seed=config["seed"])
    print("=" * 72 + "\nNO FERPLUS ARCHIVE FOUND in", workdir.resolve(),
          "\nUsing the GENERATED DEMO dataset: the numbers below say nothing about real faces.\n"
          "Put FERPlus.zip in data-exploration/ (or set data_path) for real results.\n" + "=" * 72)
data_root = H.extract_archive(source, workdir / "extracted")

# %% [markdown]
# ## Labels and counts
# Majority vote over the ten annotators; images whose majority is "unknown" or "not a
# face" are excluded, as in the standard FER+ protocol. Class order is FER+'s.

# %%
index, report = H.read_ferplus(data_root)
index = index[index["label"] != ""]
if config["max_per_split"]:
    index = index.groupby("split", group_keys=False).head(config["max_per_split"]).reset_index(drop=True)
    print(f"Using the first {config['max_per_split']} labelled images of each split")
class_names = list(H.FERPLUS_CLASSES)
counts = index.groupby(["split", "label"]).size().unstack(fill_value=0).reindex(columns=class_names, fill_value=0)
H.plot_class_distribution({s: row.to_dict() for s, row in counts.iterrows()}, title="FER+ majority labels",
                          save_path=out_dir / "class_distribution.png")
counts

# %%
samples = index[index["split"] == "train"].groupby("label").head(6)
H.plot_sample_grid([H.load_image(p, 1) for p in samples["path"]], list(samples["label"]),
                   save_path=out_dir / "samples.png");

# %% [markdown]
# ## Landmarks and the HDF5 cache
# 68 landmarks per face from dlib's shape predictor (weights in the `face_recognition_models`
# wheel, so it works offline; the model's licence is non-commercial, as it was trained on
# iBUG 300-W). FER+ images are already face crops, so the predictor runs with a fixed box
# on the whole crop: it always answers, in a few ms, and crops where the points collapse
# are flagged as failures. Images, votes and landmarks go to one HDF5 file.

# %%
landmarker = H.LandmarkDetector() if config["landmarks"] else None
cache_name = f"ferplus_{data_kind.split()[-1]}_{config['image_size']}px" + ("_lm" if landmarker else "") + ".h5"
cache_path = H.build_hdf5_cache(index, workdir / "cache" / cache_name, class_names, config["image_size"],
                                channels=1, face_crop=False, extra_columns=("votes",), landmarker=landmarker)
meta, cache_attrs = H.read_cache_meta(cache_path)
with h5py.File(cache_path, "r") as f:
    landmark_ok = f["landmarks_ok"][:] if "landmarks_ok" in f else None
if landmark_ok is not None:
    print(f"Landmarks: {int(landmark_ok.sum())}/{len(landmark_ok)} ok, {int((~landmark_ok).sum())} flagged")
meta.groupby("split").size()

# %% [markdown]
# ## Save results
# What this run produced so far, with its config. The GReFEL model, training and the
# reliability analyses are added by the next stage of the pipeline (issue "GReFEL.ipynb end to end").

# %%
results = {
    "notebook": "GReFEL", "data": data_kind, "source": str(source), "config": config,
    "dataset": {"splits": report["splits"], "excluded_unknown_or_nf": report["excluded_unknown_or_nf"],
                "counts": {s: {c: int(v) for c, v in row.items()} for s, row in counts.iterrows()}},
    "landmarks": None if landmark_ok is None else {"ok": int(landmark_ok.sum()), "failed": int((~landmark_ok).sum())},
    "cache": {"path": str(cache_path), **cache_attrs},
    "environment": H.environment_info(),
}
H.save_json(results, out_dir / "final_results.json")
print("Wrote", out_dir / "final_results.json")
