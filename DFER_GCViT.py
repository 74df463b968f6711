# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # DFER-GCViT: driver facial expressions on KMU-FED
#
# KMU-FED holds near-infrared in-car frames of 12 drivers showing six expressions. This
# notebook finds the archive, crops the faces, caches them to HDF5, fine-tunes a timm GCViT
# under an honest protocol (subject-independent by default), evaluates it, and exports it for
# real-time use. Run it top to bottom; every expensive step (extraction, face boxes, cache,
# each fold's training) reuses its saved result when inputs and settings are unchanged, so
# single sections can be rerun.

# %% [markdown]
# ## Setup
# Imports, library versions and the device: CUDA, then Apple MPS, then CPU.

# %%
import copy
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
data_path = None               # archive, folder or annotation CSV to use | None: search workdir, else the generated demo
label_pattern = None           # regex naming classes in file names: (?P<label>..), optional (?P<subject>..), (?P<group>..)
labels_csv = None              # CSV with path,label[,subject,group,split] (paths relative to the dataset's root)
seed = 42                      # int, for splits and generated data
train_seed = None              # int: the folds' training seed (head initialisation, data order, augmentation) | None: seed
train_seeds = None             # list of ints, e.g. [42, 1, 2]: train every fold once per seed and use the mean of their probabilities (a seed ensemble: evaluation, cross-dataset, predict, export, video) | None: one model per fold (train_seed)
# data
image_size = None              # px, side of the cached face crops
channels = None                # 1 (near-infrared frames are gray) | 3
face_crop = None               # True: detect and crop faces | False: whole frame
face_margin = None             # fraction of the face box added on every side
no_face = None                 # frames without a face: "full" | "center" | "drop"
max_images = None              # int: stratified subset for quick runs | None: all
# protocol
protocol = None                # "given" (archive's splits or a random split) | "kfold" (image-level) | "subject"
num_folds = None               # folds for kfold/subject (subject: at most the number of subjects)
max_folds = None               # int: train only the first N folds (quick runs) | None: all
val_fraction = None            # share of the training side held out for model selection
# model
model_name = None              # timm variant: gcvit_xxtiny | gcvit_xtiny | gcvit_tiny | gcvit_small | gcvit_base
weights = None                 # "hub" (timm download) | "none" | path to a checkpoint (.pth/.safetensors)
allow_random_init = None       # True: if hub weights are unreachable, train from scratch (recorded) instead of stopping
finetune = None                # "full" | "head" (backbone frozen) | "partial" (freeze first frozen_stages stages)
frozen_stages = None           # int: stages frozen under finetune "partial"
layer_decay = None             # layer-wise lr decay when fine-tuning, e.g. 0.75: each backbone stage trains at this times the lr of the one above (the head at lr) | None: one lr
model_ema = None               # decay of a moving average of the weights, e.g. 0.99 (about the last 100 steps): validated, kept and tested instead of the last weights (averaged weights sit in flatter minima, which travel better to new drivers) | None: off
dropout = None                 # head dropout
augment = None                 # training augmentation: "seed" (the seed notebook's) | "nir" (in-car near-infrared)
augment_erasing = None         # probability of random erasing (occlusion by hands, glasses)
mixup = None                   # Beta(alpha, alpha) of mixup of the folds' training image pairs and their labels, e.g. 0.2 | 0: off (not in pre-training)
cutmix = None                  # Beta(alpha, alpha) of CutMix on the folds (a box of another frame pasted), e.g. 1.0 | 0: off
tta_flip = None                # True: validation and test predictions average each image and its mirror image (the epoch is chosen by the test's rule, so it is a training run of its own)
pretrain_data_path = None      # FER+ (any labelled faces) to train the GCViT on first | "auto": a *ferplus* archive in workdir | None: off
pretrain_epochs = None         # epochs of that pre-training
pretrain_lr = None             # its peak learning rate (FER+ from scratch: 3e-4; 1e-3 collapses to one class)
pretrain_augment = None        # its augmentation recipe: "seed" | "nir" | None: the run's `augment`
pretrain_batch_size = None     # its batch size | None: the run's `batch_size` (on a CPU a larger batch trains more images a second)
# optim
num_epochs = None              # epochs per fold
batch_size = None              # images per step
optimizer = None               # "adamw" | "sgd" (Nesterov momentum 0.9: give it SGD's lr and weight_decay as its L2 term); the folds' (pre-training: AdamW)
lr = None                      # peak learning rate
lr_scaling = None              # "none" | "sqrt" (AdamW) | "linear": scale lr from lr_reference_batch to batch_size
lr_reference_batch = None      # the batch size lr was chosen for | None: the profile's batch_size
weight_decay = None            # AdamW decoupled weight decay (SGD: the L2 term)
warmup_epochs = None           # linear warm-up, epochs
label_smoothing = None         # cross-entropy label smoothing
class_weighted = None          # True: inverse-frequency class weights in the loss | a power p of it, e.g. 0.5 (square root) | False
clip_grad = None               # max gradient norm | None: off
amp = None                     # "auto" (bf16/fp16 on CUDA, off on CPU/MPS) | "fp16" | "bf16" | "off" (cpu profile: H.cpu_amp())
early_stopping = None          # epochs without val improvement before stopping | None: never
monitor = None                 # the epoch kept and tested: "val_acc" | "val_f1_macro" (rare classes weigh as much as common ones) | "val_loss"
num_workers = None             # DataLoader worker processes (per training process)
data_on_device = None          # "auto" (CUDA: the training split on the GPU, augmented there in batches) | True | False
torch_compile = None           # torch.compile the training step: "auto" (CUDA only) | True | False
channels_last = None           # train in channels-last (NHWC) memory order, for convolutions on CUDA: True | False
nproc = None                   # int: train on this many local processes (GPUs) with torchrun | None: in this kernel
# evaluate
cross_data_path = None         # other archive(s) to test the fold models on (e.g. CK+48.zip), one or a list | None
# export
export = None                  # True: ONNX, TorchScript and int8 ONNX exports with parity checks
video_source = None            # video file or camera index for the video demo | None: a clip of test-fold frames
video_frames = None            # int: frames of the video demo | None: all
ema = None                     # smoothing of probabilities over frames, in [0, 1) (0: none)

# %% [markdown]
# ## Configuration
# Profile defaults merged with the parameters above into one `config` dict, which is saved
# with every cache, checkpoint and results file.

# %%
COMMON = dict(train_seed=None, train_seeds=None, export=True, video_source=None, video_frames=None, ema=0.6, channels=1, face_crop=True, face_margin=0.25, no_face="full", max_images=None, val_fraction=0.1,
              max_folds=None, nproc=None, allow_random_init=False, finetune="full", frozen_stages=0, layer_decay=None, model_ema=None, dropout=0.3,
              label_smoothing=0.0, class_weighted=False, clip_grad=1.0, amp="auto", early_stopping=None, monitor="val_acc",
              pretrain_data_path=None, pretrain_epochs=8, pretrain_lr=3e-4, pretrain_augment=None, pretrain_batch_size=None,
              augment="seed", augment_erasing=0.0, **H.BATCH_MIX_OFF,
              tta_flip=False, data_on_device="auto", torch_compile="auto", channels_last=False,
              lr_scaling="none", lr_reference_batch=None, optimizer="adamw")
PROFILES = {
    # minutes on 2 CPU cores: a tiny subset, one fold, two epochs; checks the plumbing, not accuracy
    "smoke": {**COMMON, "image_size": 64, "max_images": 120, "protocol": "subject", "num_folds": 3, "max_folds": 1,
              "val_fraction": 0.2, "video_frames": 12,
              "model_name": "gcvit_xxtiny", "weights": "none", "num_epochs": 2, "batch_size": 16, "lr": 1e-3,
              "weight_decay": 0.05, "warmup_epochs": 0, "num_workers": 0},
    # real results on this CPU: small faces, the smallest GCViT, from scratch (no ImageNet weights offline)
    # (subject protocol: validation = about 2 held-out training drivers, so model selection sees a new face)
    "cpu": {**COMMON, "image_size": 64, "protocol": "subject", "num_folds": 4, "val_fraction": 0.2,
            "model_name": "gcvit_xxtiny",
            "weights": "none", "num_epochs": 25, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.05,
            "warmup_epochs": 2, "label_smoothing": 0.1, "num_workers": 2, "pretrain_data_path": "auto",
            # 12 epochs of FER+ (~55 min here): FER2013Valid 76.2% vs 74.7%, folds' mean best validation 77.3% vs 77.0%
            "pretrain_epochs": 12,
            # fine-tuning from FER+: chosen on the folds' validation drivers (73.0% vs 70.9% with one lr; README)
            "layer_decay": 0.75,
            # near-infrared augmentation on the folds, the FER+ pre-training with the seed's (76.0% vs 73.0%
            # mean best validation over the folds; README ablation)
            "augment": "nir", "pretrain_augment": "seed",
            "model_ema": 0.99,  # weight average over ~100 steps: 77.0% vs 76.0% mean best validation (README)
            # tighter face crops, framed more like FER+'s (the pre-training's) faces: mean best validation 77.5% vs
            # 77.3%, and 79.7% vs 78.4% over three training seeds (README)
            "face_margin": 0.1,
            # three models per fold, by training seed, averaged: 80.6% vs 75.8-80.2% for one (README); 3x the folds'
            # training (~32 min here, with the pre-training ~85 min)
            "train_seeds": [42, 1, 2],
            "amp": H.cpu_amp()},  # bf16 where this CPU has it natively (1.6x here), else fp32
    "gpu": {**COMMON, "image_size": 224, "protocol": "subject", "num_folds": 6, "val_fraction": 0.2,
            "model_name": "gcvit_tiny",
            "weights": "hub", "num_epochs": 50, "batch_size": 32, "lr": 1e-4, "weight_decay": 1e-4,
            "warmup_epochs": 1, "num_workers": 4},
    # the seed notebook's settings (gcvit_small at 224 px) under the DFER-GCViT paper's 10-fold protocol
    "paper": {**COMMON, "image_size": 224, "protocol": "kfold", "num_folds": 10, "model_name": "gcvit_small",
              "weights": "hub", "num_epochs": 50, "batch_size": 32, "lr": 1e-4, "weight_decay": 1e-4,
              "warmup_epochs": 0, "num_workers": 4},
}
config = H.resolve_config(profile, PROFILES, dict(
    workdir=workdir, data_path=data_path, label_pattern=label_pattern, labels_csv=labels_csv, seed=seed,
    train_seed=train_seed, train_seeds=train_seeds,
    image_size=image_size, channels=channels,
    face_crop=face_crop, face_margin=face_margin, no_face=no_face, max_images=max_images, protocol=protocol,
    num_folds=num_folds, max_folds=max_folds, val_fraction=val_fraction, model_name=model_name, weights=weights,
    allow_random_init=allow_random_init, finetune=finetune, frozen_stages=frozen_stages, layer_decay=layer_decay, model_ema=model_ema,
    dropout=dropout,
    pretrain_data_path=pretrain_data_path, pretrain_epochs=pretrain_epochs, pretrain_lr=pretrain_lr,
    pretrain_augment=pretrain_augment, pretrain_batch_size=pretrain_batch_size,
    augment=augment, augment_erasing=augment_erasing, mixup=mixup, cutmix=cutmix, tta_flip=tta_flip,
    num_epochs=num_epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, lr_scaling=lr_scaling,
    lr_reference_batch=lr_reference_batch, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
    label_smoothing=label_smoothing, class_weighted=class_weighted, clip_grad=clip_grad, amp=amp,
    early_stopping=early_stopping, monitor=monitor, num_workers=num_workers, data_on_device=data_on_device, torch_compile=torch_compile, channels_last=channels_last, nproc=nproc, cross_data_path=cross_data_path, export=export,
    video_source=video_source, video_frames=video_frames, ema=ema))
if train_seed is not None and train_seeds is None:  # an explicit train_seed wins over the profile's train_seeds
    config["train_seeds"] = None
H.check_train_seeds(config["train_seeds"], config["train_seed"])
# Fail here, not deep inside timm, if the model cannot take this input size or these weights.
H.validate_gcvit_size(config["model_name"], config["image_size"], config["weights"])
H.check_model_ema(config["model_ema"])
H.check_monitor(config["monitor"])
H.check_optimizer(config["optimizer"])
H.class_weight_power(config["class_weighted"])
H.check_batch_mix(config["mixup"], config["cutmix"])
# the learning-rate rule for other batch sizes (recorded in config): lr was chosen at the profile's batch
config["lr_reference_batch"] = config["lr_reference_batch"] or PROFILES[profile]["batch_size"]
workdir = Path(config["workdir"])
out_dir = H.output_folder(workdir, "DFER_GCViT")  # stops here if the working directory cannot be written
print(json.dumps(config, indent=1))

# %% [markdown]
# ## Find and extract the archive
# `archive.zip` (the Kaggle download's name) or any archive with "kmu" in its name in the
# working directory, or `data_path`. Without one, a generated demo dataset in the same
# layout is used, and the results say so. Extraction refuses unsafe paths and is atomic.
# Other datasets work too: class folders (CK+, AffectNet-style), with or without split
# folders, and FERPlus (e.g. to train a GCViT on FER+ whose weights then initialise a
# KMU-FED run: `weights = "<that run>/DFER_GCViT/best_model.pth"`; the head is reset).
# Any other naming takes one parameter: `label_pattern` (a regular expression over the file
# names, e.g. `r"^(?P<subject>[A-Z]{2})\.(?P<label>[A-Z]{2})\d+\.\d+$"` for JAFFE's
# `KA.AN1.39.tiff`), or an annotation CSV (`labels_csv`, or as `data_path`: `path,label` and
# optional `subject`, `group`/`sequence`, `split` columns, like the `annotations.csv` written
# below). Subject ids from either make the subject protocol possible.

# %%
source, data_kind = H.locate_dataset(workdir, config["data_path"], ("archive.zip", "*kmu*"), "KMU-FED",
                                     H.make_demo_kmufed, "kmu-fed-demo.zip", seed=config["seed"],
                                     also_files=(".csv",))
labels_csv = config["labels_csv"]
if source.suffix.lower() == ".csv":  # data_path is an annotation CSV: its paths are relative to its folder
    source, labels_csv = source.parent, source
data_root = H.extract_archive(source, workdir / "extracted")

# %% [markdown]
# ## Explore
# Layout, class mapping, per-class and per-subject counts, duplicates and a sample grid.
# KMU-FED has no split: frames come in short sequences per subject, so honest test
# numbers need subject-independent splits (see Protocols). FERPlus keeps its own
# train/valid/test splits and its vote-majority labels (unknown/not-a-face left out).

# %%
index, report = H.index_dataset(data_root, label_pattern=config["label_pattern"], labels_csv=labels_csv)
if config["max_images"] and len(index) > config["max_images"]:
    # Stratified subset for quick runs: the same share of every class.
    frac = config["max_images"] / len(index)
    index = index.groupby("label", group_keys=False).sample(frac=frac, random_state=config["seed"])
    index = index.sort_values("rel_path").reset_index(drop=True)
    print(f"Using a stratified subset of {len(index)} images (max_images={config['max_images']})")
class_names = sorted(index["label"].unique())
H.write_annotations(index, out_dir)
H.plot_class_distribution(index["label"].value_counts().to_dict(), save_path=out_dir / "class_distribution.png")
pd.crosstab(index["subject"] if report["num_subjects"] else index["split"], index["label"], margins=True)

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
# Datasets of face crops already (FERPlus) skip detection, and the results say so.

# %%
face_crop = config["face_crop"] and not report["pre_cropped"]
if face_crop:
    index = H.detect_faces(index, workdir / "cache" / "kmu_faces.csv")
    face_stats = {"frames": len(index), "found": int(index["face_found"].sum()),
                  "rate": float(index["face_found"].mean())}
    print(f"Faces found in {face_stats['found']}/{face_stats['frames']} frames ({face_stats['rate']:.1%}); "
          f"the others follow no_face={config['no_face']!r}")
else:
    note = "images are face crops already" if config["face_crop"] else "face_crop disabled"
    face_stats = {"frames": len(index), "found": None, "rate": None, "note": note}
    print(f"No face detection: {note}")
dataset_tag = "ferplus" if report["layout"].startswith("FERPlus") else "kmu"
# the crop settings in the name: runs with other margins in one working directory keep a cache each, not one rebuilt
# under the other's folds
crop_tag = f"_margin{config['face_margin']}_{config['no_face']}" if face_crop else ""
cache_name = (f"{dataset_tag}_{data_kind.split()[-1]}_{len(index)}img_"
              f"{config['image_size']}px_{config['channels']}ch{crop_tag}.h5")
cache_path = H.build_hdf5_cache(index, workdir / "cache" / cache_name, class_names, config["image_size"],
                                channels=config["channels"], face_crop=face_crop,
                                margin=config["face_margin"], no_face=config["no_face"])
meta, cache_attrs = H.read_cache_meta(cache_path)
crops = H.H5Dataset(cache_path)
picks = meta.groupby("label").head(6).index
H.plot_sample_grid([crops.image(i) for i in picks], [class_names[meta.label[i]] for i in picks],
                   save_path=out_dir / "face_crops.png");

# %% [markdown]
# ## Protocol: folds
# `given` uses the archive's splits (or one stratified random split), `kfold` is the
# DFER-GCViT paper's image-level 10-fold cross-validation, `subject` keeps every driver on
# one side (leave-subjects-out). Image-level folds put near-identical frames of one sequence
# on both sides, so only `subject` says how the model does on a new driver. In every
# protocol the epoch is chosen on a validation split carved from the training side; the
# test fold is touched once, at the end.

# %%
folds = H.make_folds(meta, config["protocol"], num_folds=config["num_folds"], val_fraction=config["val_fraction"],
                     seed=config["seed"])
if config["max_folds"]:
    folds = folds[: config["max_folds"]]
for k, f in enumerate(folds):
    subjects = {part: set(meta["subject"].to_numpy()[f[part]]) for part in ("train", "val", "test")}
    shared = (subjects["train"] | subjects["val"]) & subjects["test"]
    print(f"fold {k + 1}: train {len(f['train'])}, val {len(f['val'])}, test {len(f['test'])} images; "
          f"test subjects {sorted(subjects['test'])}" + (f"; subjects on both sides: {len(shared)}" if shared else ""))

# %% [markdown]
# ## Pre-training on FER+
# Without ImageNet weights (offline, or on a CPU), the GCViT learns the drivers more than their
# expressions; trained first on FER+'s 28k faces it generalises to new drivers far better
# (README: 37.7% -> 69.3% subject accuracy from a 4-epoch FER+ model). With
# `pretrain_data_path` (the `cpu` profile: `"auto"`, any `*ferplus*` archive in the working
# directory), the same model trains on that data first, at this run's size and channels, with
# FER+'s own splits (its validation split selects the epoch; its test accuracy is recorded),
# and every fold starts from it (head reset). An unchanged pre-training is reused.

# %%
pretraining = None
pretrain_source = config["pretrain_data_path"]
if pretrain_source == "auto":
    pretrain_source = H.find_archive(workdir, patterns=("*ferplus*", "*fer2013*"), any_archive=False)
    if pretrain_source is None:
        print("=" * 72 + f"\nNO FER+ ARCHIVE FOUND in {workdir.resolve()} for pre-training: the folds start from "
              f"weights={config['weights']!r}.\nPut FERPlus.zip there (or set pretrain_data_path) for the "
              "profile's recipe; subject accuracy is far lower without it.\n" + "=" * 72)
if pretrain_source:
    pretraining = H.pretrain_classifier(pretrain_source, workdir, config, device, config["pretrain_epochs"],
                                        config["pretrain_lr"], augment=config["pretrain_augment"],
                                        batch_size=config["pretrain_batch_size"])
    config["weights"] = pretraining["checkpoint"]
    print(f"pre-trained on {pretrain_source}: test accuracy {pretraining['test']['accuracy']:.4f} "
          f"({pretraining['epochs']} epochs, batch {pretraining['batch_size']}, {pretraining['epochs_s'] / 60:.1f} min of "
          f"training{', reused' if pretraining['wall_s'] < 0.5 * pretraining['epochs_s'] else ''}); "
          "the folds start from it")

# %% [markdown]
# ## Model
# A timm GCViT without its classifier (`num_classes=0`, pooled features) and the seed's head:
# Linear(num_features -> 256) -> BatchNorm -> ReLU -> Dropout -> Linear(256 -> classes).
# Weights come from timm's hub (internet), a local checkpoint (e.g. a GCViT this pipeline
# trained on FER+; its head is reset), or nowhere (`"none"`); the source is recorded.

# %%
def build_model():
    return H.build_classifier(config, class_names)  # the same builder the training job uses


model, weights_info, param_counts = build_model()
print(f"{config['model_name']} + head: {param_counts['total']:,} parameters, {param_counts['trainable']:,} trainable "
      f"({config['finetune']}); weights: {weights_info['source']}")
if weights_info["source"].startswith("none"):
    print("NOTE: training from RANDOM initialisation (no pretrained weights): expect lower accuracy than "
          "ImageNet-pretrained results.")
    if config["layer_decay"]:  # a fine-tuning setting: from scratch every layer learns at lr (recorded in config)
        print(f"NOTE: layer_decay={config['layer_decay']} is for fine-tuning; with no pretrained weights it is "
              "turned off (layer_decay=None) and every layer trains at lr.")
        config["layer_decay"] = None

# %% [markdown]
# ## Training configuration
# Normalisation follows the backbone's timm data config; 1-channel crops are repeated to 3.

# %%
norm = model.data_config()
train_tf, eval_tf = H.classifier_transforms(config, norm)  # what each fold's training uses
amp_dtype = H.resolve_amp(config["amp"], device)
print(f"device {device}, AMP {amp_dtype}, protocol {config['protocol']} ({len(folds)} folds), "
      f"{config['num_epochs']} epochs x batch {config['batch_size']}, AdamW lr {H.fold_lr(config):.3g} "
      f"({config['lr']} at batch {config['lr_reference_batch']}, lr_scaling {config['lr_scaling']!r}) wd {config['weight_decay']}, "
      f"cosine with {config['warmup_epochs']} warm-up epochs, clip {config['clip_grad']}, "
      f"label smoothing {config['label_smoothing']}, class weights {config['class_weighted']}, "
      f"layer-wise lr decay {config['layer_decay'] or 'off'}, weight average (EMA) {config['model_ema'] or 'off'}")
print("train transform:", train_tf)

# %% [markdown]
# ## Train
# One model per fold, from the same initial weights. Each fold writes `last.pth` every epoch
# and `best_model.pth` on the best validation accuracy under `runs/<run>/fold_k/`; an
# interrupted run resumes where it stopped when this section is rerun with the same settings.
#
# With `train_seeds`, every fold trains once per seed (initial head, data order, augmentation)
# and the fold's prediction is the mean of their probabilities: a seed ensemble. On unseen
# drivers one model's accuracy moves by several points with the seed alone (README); the mean
# of three moves far less and is higher. Each seed's folds are a run of their own (the run
# `train_seed` would train alone, reused either way); the ensemble's results, plots and exports
# go to a folder of their own.
#
# First each run's spec, `run.json`: what `python -m helpers train` needs to train the same
# folds in other processes (README: several GPUs or machines).

# %%
# One folder per training setting: rerunning with the same settings resumes, new settings start afresh
# (new data, or a new weights file at the same path, count as new settings).
H.require(globals(), config="Configuration", cache_attrs="Preprocess: face crops and the HDF5 cache",
          folds="Protocol: folds", weights_info="Model")


def run_key_of(cfg):
    # tta_flip also validates with flip TTA (the epoch is chosen by the test's rule): a setting of its own when on
    return H.config_fingerprint(cfg, exclude=("workdir", "max_folds", "nproc", "export", "video_source",
                                              "video_frames", "ema", "cross_data_path", "torch_compile", "channels_last")
                                + (() if cfg["tta_flip"] else ("tta_flip",))
                                # the engine's H.SETTINGS_ADDED_LATER (mixup, cutmix, monitor, optimizer), train_seed and
                                # train_seeds joined later: at their old values, they leave the run folders of before
                                # them their names
                                + H.unchanged_later_settings(cfg, also={"train_seed": None, "train_seeds": None}),
                                contents={"data": cache_attrs["fingerprint"], "weights": weights_info.get("sha256")})


def run_dir_of(key):
    return out_dir / "runs" / f"{config['protocol']}_{config['model_name']}_{config['image_size']}px_{key}"


specs = []  # one per training seed
for member_config in H.member_configs(config):
    member_key = run_key_of(member_config)
    spec_path = H.write_run_spec(run_dir_of(member_key) / "run.json", config=member_config, cache_path=cache_path,
                                 class_names=class_names, folds=folds, run_dir=run_dir_of(member_key),
                                 run_key=member_key)
    specs.append(H.read_run_spec(spec_path))
    print(f"run spec: {spec_path}")
spec = specs[0]
# the run's folder: its one model's, or a seed ensemble's own (results, plots, exports; the members' folds stay in theirs)
run_key = spec["run_key"] if len(specs) == 1 else run_key_of(config)
run_dir = run_dir_of(run_key)
print(f"elsewhere: torchrun --standalone --nproc_per_node <GPUs> -m helpers train --config <run spec>\n"
      "(then rerun the next cell: finished folds are loaded, not trained again)")

# %% [markdown]
# With `nproc` set, the folds train in `nproc` torchrun processes (one per GPU; batch size
# per process, lr unchanged) and this kernel then loads them; otherwise they train here.

# %%
if config["nproc"]:
    for s in specs:
        H.launch_torchrun(Path(s["run_dir"]) / "run.json", config["nproc"])
member_runs = []  # [seed][fold]: fit's result
for m, s in enumerate(specs):
    member_runs.append([])
    for k in range(len(folds)):
        print(f"--- fold {k + 1}/{len(folds)}"
              + (f", train seed {H.training_seed(s['config'])} ({m + 1}/{len(specs)})" if len(specs) > 1 else "")
              + " ---")
        member_runs[-1].append(H.train_fold(s, k, device))
fold_runs = member_runs[0]  # the first seed's (plots, training data, compile)
checkpoints = [[runs[k]["best_path"] for runs in member_runs] for k in range(len(folds))]  # [fold][seed]

# %% [markdown]
# ## Evaluate
# Each fold's best checkpoint (chosen on its validation split) on its test fold: accuracy,
# macro and weighted precision/recall/F1, per-class report and confusion matrix, then the
# mean and standard deviation across folds. Frame accuracy is the headline (comparable with
# the literature); where frames come in sequences (KMU-FED's `group`: one driver, one
# expression), one decision per test sequence is reported beside it, separately labelled:
# the majority of its frames' predictions, and the argmax of their mean probability.
# A seed ensemble is scored as one model (its mean probability), each seed's figures beside
# it, and its validation figure is measured too: it chooses the fold deployed below.

# %%
H.require(globals(), checkpoints="Train")
fold_metrics = [H.evaluate_members(specs, k, checkpoints[k], "test", device) for k in range(len(folds))]
val_metrics = ([H.evaluate_members(specs, k, checkpoints[k], "val", device) for k in range(len(folds))]
               if len(specs) > 1 else None)
keys = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted", "recall_weighted",
        "f1_weighted", "ece") + (("single_view_accuracy",) if config["tta_flip"] and len(specs) == 1 else ())
summary = {k: H.fold_summary([m[k] for m in fold_metrics]) for k in keys}  # mean, std, 95% interval over folds
total_cm = np.sum([m["confusion_matrix"] for m in fold_metrics], axis=0)
seq_keys = ("accuracy_majority_vote", "accuracy_mean_probability")
sequence_summary = ({k: H.fold_summary([m["sequence"][k] for m in fold_metrics]) for k in seq_keys}
                    if all(m.get("sequence") for m in fold_metrics) else None)
pd.DataFrame({k: [m[k] for m in fold_metrics] for k in keys[:4]}, index=[f"fold {i + 1}" for i in range(len(folds))])

# %%
acc = summary["accuracy"]
print(f"{config['protocol']} protocol, {len(folds)} fold(s): accuracy {acc['mean']:.4f} +- {acc['std']:.4f}"
      + (f" (95% interval over folds {acc['ci95'][0]:.4f}-{acc['ci95'][1]:.4f})" if acc["ci95"] else "")
      + f", macro F1 {summary['f1_macro']['mean']:.4f} +- {summary['f1_macro']['std']:.4f}")
never_predicted = H.never_predicted(total_cm, class_names)  # in no fold: recall and F1 0 for each
if never_predicted:
    print(f"never predicted in any fold: {', '.join(never_predicted)}")
if len(specs) > 1:
    for m, s in enumerate(specs):
        member = H.fold_summary([f["members"][m]["accuracy"] for f in fold_metrics])
        print(f"  train seed {H.training_seed(s['config'])} alone: {member['mean']:.4f} +- {member['std']:.4f}")
    print(f"  the ensemble's validation accuracy {np.mean([v['accuracy'] for v in val_metrics]):.4f} (each seed's "
          "epoch chosen on the same split: a little optimistic)")
if "single_view_accuracy" in keys:
    print(f"(with test-time flip; one view: {summary['single_view_accuracy']['mean']:.4f} "
          f"+- {summary['single_view_accuracy']['std']:.4f})")
if sequence_summary:
    print(f"sequence level (one decision per test sequence, not comparable with frame figures): majority vote "
          f"{sequence_summary['accuracy_majority_vote']['mean']:.4f} +- {sequence_summary['accuracy_majority_vote']['std']:.4f}, "
          f"mean probability {sequence_summary['accuracy_mean_probability']['mean']:.4f}")
pd.DataFrame({c: {k: np.mean([m["per_class"][c][k] for m in fold_metrics]) for k in ("precision", "recall", "f1-score")}
              for c in class_names}).T

# %% [markdown]
# ## Visualise
# Confusion matrix summed over the test folds (every image is tested once under kfold and
# subject), per-fold metrics, and the training curves of each fold.

# %%
H.plot_confusion_matrix(total_cm, class_names, title=f"{config['protocol']} test folds",
                        save_path=run_dir / "confusion_matrix.png")
H.plot_metric_summary(fold_metrics, save_path=run_dir / "performance_summary.png")
H.plot_training_curves(fold_runs[0]["history"], save_path=run_dir / "training_curve.png");

# %% [markdown]
# ## Cross-dataset check
# The trained fold models, and their ensemble (mean probability), on other datasets, e.g. CK+
# (posed, frontal, 48-px crops): `cross_data_path` is one archive or a list. Each is scored
# over the classes it shares with the training set (printed); a large drop says how much the
# model learned the KMU-FED drivers and cabin rather than expressions.

# %%
cross_sources = config["cross_data_path"] or []
cross_sources = [cross_sources] if isinstance(cross_sources, (str, Path)) else list(cross_sources)
cross = [H.cross_dataset(src, workdir, spec, checkpoints, device) for src in cross_sources]
for c in cross:
    print(f"{Path(c['source']).name}: {c['num_samples']} images of the shared classes {c['classes']} "
          f"(not shared: {c['not_shared']}); accuracy per fold model "
          f"{[round(m['accuracy'], 4) for m in c['folds']]}, ensemble {c['ensemble']['accuracy']:.4f}")
if not cross:
    print("No cross_data_path set: skipped (e.g. -p cross_data_path ../shared/data/ck-plus/CK+48.zip, or a list)")
pd.DataFrame([{"dataset": Path(c["source"]).name, "images": c["num_samples"], "classes": len(c["classes"]),
               **{f"fold {k + 1}": m["accuracy"] for k, m in enumerate(c["folds"])},
               "ensemble": c["ensemble"]["accuracy"], "ensemble macro F1": c["ensemble"]["f1_macro"]} for c in cross])

# %% [markdown]
# ## Predict
# `predict(path)` runs the full training preprocessing on one image (a full in-car frame or a
# face crop): face detection, the same crop, the evaluation transform, the model (the fold
# with the best validation figure; a seed ensemble: its seeds' models as one, their mean).

# %%
if val_metrics is None:
    best_fold = H.best_fold([r["best"] for r in fold_runs])  # by its validation split, the run's monitor
else:  # by the ensemble's own figure on the validation split, of the run's monitor
    monitored = {"val_acc": "accuracy", "val_f1_macro": "f1_macro", "val_loss": "nll"}[config["monitor"]]
    best_fold = H.best_index([v[monitored] for v in val_metrics], config["monitor"])
best_ckpts = [H.load_checkpoint(p) for p in checkpoints[best_fold]]
models = []
for ckpt in best_ckpts:
    models.append(build_model()[0])
    models[-1].load_state_dict(ckpt["model"])
model = models[0] if len(models) == 1 else H.EnsembleClassifier(models)
best_ckpt = best_ckpts[0] if len(models) == 1 else {
    **best_ckpts[0], "model": model.state_dict(), "config": config, "train_seeds": config["train_seeds"],
    "member_runs": [s["run_dir"] for s in specs]}
predict = H.Predictor(model, class_names, cache_attrs["preprocess"], norm["mean"], norm["std"], device)
example = index.iloc[0]
print(example["rel_path"], "(true:", example["label"] + ")", "->", predict(example["path"]))

# %% [markdown]
# ## Save results
# Into the run's own folder, `DFER_GCViT/runs/<settings>_<key>/` (runs with other settings,
# even at the same time, never overwrite each other): `final_model.pth` (the fold with the
# best validation accuracy, with config, class names and preprocessing; a seed ensemble's
# holds `H.EnsembleClassifier`'s weights) and
# `final_results.json` (config, protocol, metrics per fold and aggregated, parameter counts,
# wall time, environment, data fingerprint, face detection, weights source), beside the plots
# and exports. `DFER_GCViT/best_model.pth`, `final_results.json` and the plots are atomic
# copies of the latest finished run, with its `run_key` inside.

# %%
H.require(globals(), fold_metrics="Evaluate", best_ckpt="Predict", cross="Cross-dataset check")
H.save_checkpoint(run_dir / "final_model.pth", **{**best_ckpt, "run_key": run_key})
results = {
    "notebook": "DFER_GCViT", "run_key": run_key, "run_dir": str(run_dir), "data": data_kind, "source": str(source), "config": config,
    "protocol": {"name": config["protocol"], "folds": len(folds),
                 "sizes": [{p: int(len(f[p])) for p in ("train", "val", "test")} for f in folds],
                 "model_selection": f"best {config['monitor']} on a validation split carved from the training side"},
    "metrics": {"per_fold": fold_metrics, "mean_std": summary, "confusion_matrix_total": total_cm.tolist(),
                "sequence_mean_std": sequence_summary,
                "val_per_fold": val_metrics,  # a seed ensemble's validation figures (None: one model, see best_epochs)
                "val_accuracy_mean_std": val_metrics and H.fold_summary([v["accuracy"] for v in val_metrics])},
    "cross_dataset": cross,
    "pretraining": pretraining,
    "model": {"name": config["model_name"], "parameters": param_counts, "weights": weights_info,
              "best_fold": best_fold + 1, "best_epochs": [r["best"] for r in fold_runs],
              "train_seeds": [H.training_seed(s["config"]) for s in specs],  # one per model of a fold
              "members": [{"train_seed": H.training_seed(s["config"]), "run_dir": s["run_dir"], "run_key": s["run_key"],
                           "best_epochs": [r["best"] for r in runs], "wall_s": [r["wall_s"] for r in runs],
                           "epochs_s": [r["epochs_s"] for r in runs]}
                          for s, runs in zip(specs, member_runs)]},
    # a fold's training: all its seeds' models
    "wall_time_s": {"train_per_fold": [sum(runs[k]["wall_s"] for runs in member_runs) for k in range(len(folds))],
                    "train_total": sum(r["wall_s"] for runs in member_runs for r in runs),
                    # the epochs' own time, also of folds this run reused (trained before, train_per_fold near 0)
                    "epochs_total": sum(r["epochs_s"] for runs in member_runs for r in runs)},
    "training_data": fold_runs[0].get("training_data"),  # DataLoader or on the device (data_on_device), and why
    "compile": [r.get("compile") for r in fold_runs],  # torch.compile per fold: used, compile time, or why not
    "channels_last": [r.get("channels_last") for r in fold_runs],
    "lr_effective": H.fold_lr(config),  # config lr scaled by lr_scaling from lr_reference_batch to the batch
    "dataset": {k: report.get(k) for k in ("layout", "num_images", "counts", "splits", "num_subjects", "duplicates",
                                           "skipped", "pre_cropped", "inferred_naming")},
    "face_detection": face_stats, "cache": {"path": str(cache_path), **cache_attrs},
    "device": str(device), "environment": H.environment_info(),
}
H.save_json(results, run_dir / "final_results.json")
H.publish_run(run_dir, out_dir, {"final_model.pth": "best_model.pth", "final_results.json": "final_results.json",
                                 **{f: f for f in ("confusion_matrix.png", "performance_summary.png",
                                                   "training_curve.png")}})
print("Wrote", run_dir, "and its latest copies", out_dir / "final_results.json", "and", out_dir / "best_model.pth")

# %% [markdown]
# ## Export
# The best model as ONNX (opset 17, dynamic batch), TorchScript and dynamically quantised
# int8 ONNX, each carrying its preprocessing (input size, channels, mean/std, class names)
# so a consumer needs nothing else. Parity with PyTorch is checked on the validation images
# of the best fold, with accuracy and batch-1 latency per format (figures on this machine;
# `bench/bench_realtime.py` measures the full frame pipeline).

# %%
export_report = None
if config["export"]:
    export_dir = run_dir / "export"
    export_meta = H.export_metadata(class_names, cache_attrs["preprocess"], norm["mean"], norm["std"],
                                    model=config["model_name"], protocol=config["protocol"])
    cpu_model = copy.deepcopy(model).cpu().eval()  # the trained model stays where it is, for predict()
    example = torch.zeros(1, 3, config["image_size"], config["image_size"])
    files = {"onnx": H.export_onnx(model, export_dir / "model.onnx", (example,), export_meta),
             "torchscript": H.export_torchscript(model, export_dir / "model.torchscript.pt", (example,), export_meta)}
    files["onnx_int8"] = H.quantize_onnx_int8(files["onnx"], export_dir / "model.int8.onnx")
    val_ds = H.H5Dataset(cache_path, folds[best_fold]["val"], eval_tf)
    x = torch.stack([val_ds[i][0] for i in range(len(val_ds))]).numpy()
    y = val_ds.labels
    backends = {"pytorch": H.Backend("torch", cpu_model), "torchscript": H.Backend("torchscript", files["torchscript"]),
                "onnx": H.Backend("onnx", files["onnx"]), "onnx_int8": H.Backend("onnx", files["onnx_int8"])}
    ref = backends["pytorch"](x)
    export_report = {"files": {k: str(v) for k, v in files.items()}, "validation_images": int(len(y)), "formats": {}}
    for name, backend in backends.items():
        probs = backend(x)
        times = []
        for i in range(min(20, len(x))):
            t0 = time.perf_counter()
            backend(x[i:i + 1])
            times.append(time.perf_counter() - t0)
        export_report["formats"][name] = {"max_abs_diff_vs_pytorch": float(np.abs(probs - ref).max()),
                                          "val_accuracy": float((probs.argmax(1) == y).mean()),
                                          "batch1_ms_median": 1e3 * float(np.median(times))}
    H.save_json(export_report, export_dir / "export_report.json")
    display(pd.DataFrame(export_report["formats"]).T)
    for name in ("torchscript", "onnx"):
        assert export_report["formats"][name]["max_abs_diff_vs_pytorch"] <= 1e-4, f"{name} export differs from PyTorch"

# %% [markdown]
# ## Video
# Frame-by-frame driver monitoring: face detection, the training crop, the ONNX model, and an
# exponential moving average of the probabilities (`ema`), written as an annotated video and a
# per-frame CSV. Set `video_source` to a file or a camera index; without one, a clip is made
# from the first test fold's frames (there is no camera here).

# %%
video_summary = None
if config["export"]:
    import cv2

    source_video = config["video_source"]
    if source_video is None:
        clip = index.set_index("rel_path").loc[meta["rel_path"].to_numpy()[folds[0]["test"]], "path"]
        source_video = export_dir / "test_clip.avi"
        writer = cv2.VideoWriter(str(source_video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
        for p in list(clip)[: config["video_frames"] or len(clip)]:
            writer.write(cv2.resize(cv2.imread(p), (640, 480)))
        writer.release()
    video_summary = H.run_video(source_video, H.Backend("onnx", files["onnx"]), class_names,
                                cache_attrs["preprocess"], norm["mean"], norm["std"],
                                out_video=export_dir / "annotated.avi", out_csv=export_dir / "frames.csv",
                                ema=config["ema"], max_frames=config["video_frames"])
    H.save_json(video_summary, export_dir / "video_summary.json")
    print(json.dumps(video_summary, indent=1))
