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
# # DFER-GCViT: driver facial expressions on KMU-FED
#
# KMU-FED holds near-infrared in-car frames of 12 drivers showing six expressions. This
# notebook finds the archive, crops the faces, caches them to HDF5 and (next sections)
# fine-tunes a timm GCViT on them. Run it top to bottom; every expensive step reuses its
# saved result when inputs and settings are unchanged, so single sections can be rerun.

# %% [markdown]
# ## Setup
# Imports, library versions and the device: CUDA, then Apple MPS, then CPU.

# %%
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import helpers as H

device = H.select_device()
print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads")

# %% [markdown]
# ## Parameters
# One cell, tagged `parameters`, so papermill can override any knob (`-p image_size 128`).
# `None` means "the profile's default"; anything set explicitly wins over the profile.

# %% tags=["parameters"]
# run
profile = "smoke"              # "smoke" (minutes, CI) | "cpu" (real results on CPU) | "gpu" | "paper"
workdir = "data-exploration"   # where archives are looked for and outputs land
data_path = None               # archive or folder to use | None: search workdir, else the generated demo
seed = 42                      # int, for splits and generated data
# data
image_size = None              # px, side of the cached face crops
channels = None                # 1 (near-infrared frames are gray) | 3
face_crop = None               # True: detect and crop faces | False: whole frame
face_margin = None             # fraction of the face box added on every side
no_face = None                 # frames without a face: "full" | "center" | "drop"
max_images = None              # int: stratified subset for quick runs | None: all

# %% [markdown]
# ## Configuration
# Profile defaults merged with the parameters above into one `config` dict, which is saved
# with every cache, checkpoint and results file.

# %%
PROFILES = {
    "smoke": dict(image_size=64, channels=1, face_crop=True, face_margin=0.25, no_face="full", max_images=120),
    "cpu": dict(image_size=112, channels=1, face_crop=True, face_margin=0.25, no_face="full", max_images=None),
    "gpu": dict(image_size=224, channels=1, face_crop=True, face_margin=0.25, no_face="full", max_images=None),
    "paper": dict(image_size=224, channels=1, face_crop=True, face_margin=0.25, no_face="full", max_images=None),
}
config = H.resolve_config(profile, PROFILES, dict(
    workdir=workdir, data_path=data_path, seed=seed, image_size=image_size, channels=channels,
    face_crop=face_crop, face_margin=face_margin, no_face=no_face, max_images=max_images))
workdir = Path(config["workdir"])
out_dir = workdir / "DFER_GCViT"
out_dir.mkdir(parents=True, exist_ok=True)
print(json.dumps(config, indent=1))

# %% [markdown]
# ## Find and extract the archive
# `archive.zip` (the Kaggle download's name) or any archive with "kmu" in its name in the
# working directory, or `data_path`. Without one, a generated demo dataset in the same
# layout is used, and the results say so. Extraction refuses unsafe paths and is atomic.

# %%
source = Path(config["data_path"]) if config["data_path"] else H.find_archive(
    workdir, patterns=("archive.zip", "*kmu*"), any_archive=False)
data_kind = "real" if source else "generated demo"
if source is None:
    source = H.make_demo_kmufed(workdir / "demo" / "kmu-fed-demo.zip", seed=config["seed"])
    print("=" * 72 + "\nNO KMU-FED ARCHIVE FOUND in", workdir.resolve(),
          "\nUsing the GENERATED DEMO dataset: the numbers below say nothing about real faces.\n"
          "Put archive.zip in data-exploration/ (or set data_path) for real results.\n" + "=" * 72)
data_root = H.extract_archive(source, workdir / "extracted")

# %% [markdown]
# ## Explore
# Layout, class mapping, per-class and per-subject counts, duplicates and a sample grid.
# KMU-FED has no split: frames come in short sequences per subject, so honest test
# numbers need subject-independent splits (see Protocols).

# %%
index, report = H.discover_dataset(data_root)
if config["max_images"] and len(index) > config["max_images"]:
    # Stratified subset for quick runs: the same share of every class.
    frac = config["max_images"] / len(index)
    index = index.groupby("label", group_keys=False).sample(frac=frac, random_state=config["seed"])
    index = index.sort_values("rel_path").reset_index(drop=True)
    print(f"Using a stratified subset of {len(index)} images (max_images={config['max_images']})")
class_names = sorted(index["label"].unique())
H.write_annotations(index, out_dir)
H.plot_class_distribution(index["label"].value_counts().to_dict(), save_path=out_dir / "class_distribution.png")
pd.crosstab(index["subject"], index["label"], margins=True)

# %%
samples = index.groupby("label").head(6)
H.plot_sample_grid([H.load_image(p, 1) for p in samples["path"]], list(samples["label"]),
                   save_path=out_dir / "samples.png");

# %% [markdown]
# ## Preprocess: face crops and the HDF5 cache
# KMU-FED frames show the whole car interior; the face covers about a third of the width.
# dlib's HOG detector finds it (boxes cached by content hash, so reruns are instant), the
# shared `crop_face` cuts a square with a margin, and the crops are stored in one HDF5 file
# that training reads far faster than the JPEGs. Frames without a face follow `no_face`.

# %%
if config["face_crop"]:
    index = H.detect_faces(index, workdir / "cache" / "kmu_faces.csv")
    face_stats = {"frames": len(index), "found": int(index["face_found"].sum()),
                  "rate": float(index["face_found"].mean())}
    print(f"Faces found in {face_stats['found']}/{face_stats['frames']} frames ({face_stats['rate']:.1%}); "
          f"the others follow no_face={config['no_face']!r}")
else:
    face_stats = {"frames": len(index), "found": None, "rate": None, "note": "face_crop disabled"}
cache_name = f"kmu_{data_kind.split()[-1]}_{config['image_size']}px_{config['channels']}ch.h5"
cache_path = H.build_hdf5_cache(index, workdir / "cache" / cache_name, class_names, config["image_size"],
                                channels=config["channels"], face_crop=config["face_crop"],
                                margin=config["face_margin"], no_face=config["no_face"])
meta, cache_attrs = H.read_cache_meta(cache_path)
crops = H.H5Dataset(cache_path)
picks = meta.groupby("label").head(6).index
H.plot_sample_grid([crops.image(i) for i in picks], [class_names[meta.label[i]] for i in picks],
                   save_path=out_dir / "face_crops.png");

# %% [markdown]
# ## Save results
# What this run produced so far, with the config that produced it. Model training and
# evaluation are added by the next stage of the pipeline (issue "DFER_GCViT.ipynb end to end").

# %%
results = {
    "notebook": "DFER_GCViT", "data": data_kind, "source": str(source), "config": config,
    "dataset": {k: report[k] for k in ("layout", "num_images", "counts", "num_subjects", "duplicates", "skipped")},
    "face_detection": face_stats, "cache": {"path": str(cache_path), **cache_attrs},
    "environment": H.environment_info(),
}
H.save_json(results, out_dir / "final_results.json")
print("Wrote", out_dir / "final_results.json")
