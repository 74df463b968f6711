"""The toolbox both notebooks share, in pipeline order.

0. setup    profiles -> config, device selection, environment versions, atomic writes,
            inter-process locks, publishing a run's files
1. data     find and safely extract archives, discover layouts (split/class folders,
            class folders, KMU-FED file names, a label pattern, FERPlus), load images,
            annotation CSVs (written and read)
2. demo     a generated demo dataset in the KMU-FED and FERPlus layouts
3. faces    dlib face detection with a resumable box cache; the shared face crop
4. cache    the fingerprinted, atomic HDF5 cache and a PyTorch Dataset over it
5. splits   evaluation protocols: given, image-level k-fold, subject-independent k-fold
6. augment  albumentations pipelines (seed, NIR, GReFEL, eval), landmark-aware flips
7. models   timm backbone + the seed's head, a timm CNN feature pyramid (GReFEL), weight
            sources (hub, file, none), freezing
8. train    the engine: AdamW, cosine, AMP, clipping, checkpoints, resume, early stopping
   distributed  the same engine under torchrun: process group, sharded loaders, reductions
9. metrics  accuracy, precision/recall/F1, confusion matrix, calibration error, sequence votes
10. plots   class distribution, sample grid, confusion matrix, training curves
11. export  Predictor (one image, training preprocessing), ONNX/TorchScript/int8 export, backends
12. recipes the DFER_GCViT fold as a job from a run spec (run.json), shared by the notebook and
            ``python -m helpers train`` (see __main__.py); pre-training on another dataset

Notebooks import this package; it never reads notebook globals.
"""

from .setup import (atomic_write, config_fingerprint, environment_info, output_folder, output_lock, publish_run,
                    mps_dtype_guard, remove_stale_temps, require, resolve_config, save_json, select_device,
                    temp_path)
from .data import (CLASS_ALIASES, FERPLUS_CLASSES, FERPLUS_COLUMNS, VOTE_COLUMNS, DatasetError,
                   discover_dataset, extract_archive, file_sha256, find_archive, find_ferplus_root, index_dataset,
                   infer_naming, locate_dataset, load_image, normalise_class, prepare_ferplus, print_report,
                   read_annotations_csv, read_ferplus, read_labelled_faces, render_fer2013_csv,
                   write_annotations)
from .demo import make_demo_ferplus, make_demo_kmufed
from .faces import FaceDetector, LandmarkDetector, crop_face, detect_faces, dlib_model_path
from .cache import H5Dataset, build_hdf5_cache, cache_fingerprint, read_cache_meta, read_cache_votes, stored_fingerprint
from .splits import PROTOCOLS, make_folds
from .augment import FLIP_PERMUTATION_68, IMAGENET_MEAN, IMAGENET_STD, KeypointCompose, build_transform
from .models import (EnsembleClassifier, TimmClassifier, WeightsUnavailableError, count_parameters, create_classifier,
                     create_feature_pyramid, load_matching_weights, load_weights, set_finetune_strategy,
                     validate_gcvit_size)
from .distributed import (ShardedBatchSampler, barrier, get_rank, get_world_size, init_distributed, is_distributed,
                          is_main, shutdown)
from .train import (BATCH_MIX_OFF, MONITORS, OPTIMIZERS, SETTINGS_ADDED_LATER, BatchMix, best_fold, best_index, build_optimizer, build_scheduler, plan_epochs, check_time_budget, channels_last_layout, check_batch_mix,
                    check_logit_adjusted_loss, check_model_ema, check_monitor, check_optimizer, class_weight_power, class_weights_for,
                    class_weights_from_labels, compile_for_training, cpu_amp, cross_entropy_loss, evaluate, fit,
                    logit_adjustment_shift, scaled_lr, shifted_views, check_tta_shift,
                    load_checkpoint, make_loader, output_probs, resolve_amp, save_checkpoint, seed_everything,
                    time_left, train_one_epoch, unchanged_later_settings)
from .metrics import (FERPLUS_PAPER_RULE, adjust_logits, class_log_prior, compute_metrics, expected_calibration_error,
                      ferplus_paper_accuracy, ferplus_paper_subset, fit_logit_adjustment, fit_temperature, fold_summary,
                      macro_f1, never_predicted, sequence_metrics)
from .plots import (plot_class_distribution, plot_confidence_histograms, plot_confusion_matrix, plot_metric_summary,
                    plot_reliability_diagram, plot_sample_grid, plot_training_curves)
from .export import (Backend, Predictor, ProbabilityModel, export_metadata, export_onnx, export_torchscript,
                     quantize_onnx_int8, read_onnx_metadata, run_video)
from .device_data import BatchAugment, DeviceBatches, training_batches, use_device_data
from .recipes import (build_classifier, check_train_seeds, classifier_transforms, cross_dataset, evaluate_fold,
                      evaluate_members, fold_lr, fold_outputs, launch_torchrun, mean_outputs, member_configs,
                      members_outputs, outputs_metrics, pretrain_classifier, read_run_spec, run_spec, train_fold,
                      training_seed, write_run_spec)

__all__ = [
    # setup
    "resolve_config", "config_fingerprint", "select_device", "mps_dtype_guard", "environment_info", "save_json", "atomic_write", "output_folder",
    "remove_stale_temps",
    "temp_path", "output_lock", "publish_run", "require",
    # data
    "CLASS_ALIASES", "FERPLUS_CLASSES", "FERPLUS_COLUMNS", "VOTE_COLUMNS", "DatasetError", "find_archive",
    "locate_dataset",
    "extract_archive", "file_sha256", "load_image", "normalise_class", "discover_dataset", "infer_naming",
    "print_report", "write_annotations", "read_annotations_csv", "find_ferplus_root", "read_ferplus", "render_fer2013_csv",
    "prepare_ferplus", "read_labelled_faces",
    # demo
    "make_demo_kmufed", "make_demo_ferplus",
    # faces
    "FaceDetector", "LandmarkDetector", "detect_faces", "crop_face", "dlib_model_path",
    # cache
    "cache_fingerprint", "build_hdf5_cache", "read_cache_meta", "read_cache_votes", "stored_fingerprint", "H5Dataset",
    # splits
    "PROTOCOLS", "make_folds",
    # augment
    "IMAGENET_MEAN", "IMAGENET_STD", "FLIP_PERMUTATION_68", "KeypointCompose", "build_transform",
    # models
    "TimmClassifier", "EnsembleClassifier", "WeightsUnavailableError", "create_classifier", "create_feature_pyramid", "load_weights",
    "load_matching_weights", "validate_gcvit_size", "count_parameters", "set_finetune_strategy",
    # train
    "seed_everything", "make_loader", "build_optimizer", "check_optimizer", "OPTIMIZERS", "build_scheduler", "plan_epochs", "check_time_budget", "cross_entropy_loss",
    "class_weights_from_labels", "class_weight_power", "class_weights_for", "check_logit_adjusted_loss",
    "logit_adjustment_shift", "output_probs", "resolve_amp", "train_one_epoch", "time_left", "check_tta_shift", "shifted_views", "evaluate",
    "save_checkpoint", "load_checkpoint", "fit", "best_index", "best_fold", "check_model_ema", "check_monitor", "MONITORS", "BATCH_MIX_OFF", "SETTINGS_ADDED_LATER", "unchanged_later_settings", "BatchMix", "check_batch_mix", "compile_for_training", "channels_last_layout",
    "cpu_amp", "scaled_lr",
    # distributed
    "init_distributed", "shutdown", "is_distributed", "get_rank", "get_world_size", "is_main", "barrier",
    "ShardedBatchSampler",
    # metrics
    "compute_metrics", "never_predicted", "FERPLUS_PAPER_RULE", "ferplus_paper_subset", "ferplus_paper_accuracy", "macro_f1", "fold_summary", "sequence_metrics", "expected_calibration_error", "fit_temperature",
    "class_log_prior", "adjust_logits", "fit_logit_adjustment",
    # plots
    "plot_class_distribution", "plot_sample_grid", "plot_confusion_matrix", "plot_training_curves",
    "plot_metric_summary", "plot_reliability_diagram", "plot_confidence_histograms",
    # export
    "Predictor", "ProbabilityModel", "export_metadata", "export_onnx", "export_torchscript", "quantize_onnx_int8",
    "read_onnx_metadata", "Backend", "run_video",
    # recipes
    "BatchAugment", "DeviceBatches", "use_device_data", "training_batches",
    "build_classifier", "classifier_transforms", "write_run_spec", "read_run_spec", "train_fold", "training_seed", "check_train_seeds", "member_configs", "evaluate_fold", "fold_outputs", "outputs_metrics",
    "members_outputs", "mean_outputs", "evaluate_members", "fold_lr",
    "launch_torchrun", "pretrain_classifier", "cross_dataset", "run_spec",
]
