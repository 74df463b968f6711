"""Models: a timm backbone with the seed's classification head, weight sources and freezing.

``TimmClassifier`` = ``timm.create_model(variant, num_classes=0)`` (pooled features) +
Linear(num_features -> 256) -> BatchNorm1d -> ReLU -> Dropout -> Linear(256 -> classes),
with timm's ``forward_features`` / ``forward_head`` split. gcvit_small with a 7-class head
has 50,522,348 parameters, the seed notebook's reported count.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .data import file_sha256

WEIGHT_SOURCES = ("hub", "none")  # or a path to a local checkpoint


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were requested but could not be loaded."""


class TimmClassifier(nn.Module):
    """A timm backbone and the seed's MLP head.

    Args:
        variant: timm model name, e.g. ``"gcvit_xxtiny"`` .. ``"gcvit_base"``.
        num_classes: output classes.
        img_size: input side in pixels (GCViT: a multiple of 32).
        hidden: width of the head's hidden layer.
        dropout: dropout before the last linear layer.
        pretrained: ask timm for its hub weights (needs internet).
        in_chans: input channels.
    """

    def __init__(self, variant: str, num_classes: int, img_size: int = 224, hidden: int = 256,
                 dropout: float = 0.3, pretrained: bool = False, in_chans: int = 3):
        super().__init__()
        import timm

        kwargs = {"img_size": img_size} if variant.startswith("gcvit") else {}
        self.backbone = timm.create_model(variant, pretrained=pretrained, num_classes=0, in_chans=in_chans, **kwargs)
        self.num_features = self.backbone.num_features
        self.head = nn.Sequential(nn.Linear(self.num_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        self.variant, self.num_classes, self.img_size = variant, num_classes, img_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, num_features) pooled features."""
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, num_features) -> (B, num_classes) logits."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh last layer for ``num_classes`` (e.g. after loading weights from another dataset)."""
        last = self.head[-1]
        self.head[-1] = nn.Linear(last.in_features, num_classes)
        self.num_classes = num_classes

    def data_config(self) -> dict:
        """Mean and std the backbone was trained with (timm's pretrained config)."""
        cfg = self.backbone.pretrained_cfg
        return {"mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))), "std": tuple(cfg.get("std", (0.229, 0.224, 0.225)))}


class EnsembleClassifier(nn.Module):
    """Several classifiers of the same classes as one: the mean of their probabilities.

    ``forward`` returns the log of that mean, so that softmax (as :class:`~helpers.Predictor`, ``Backend`` and the
    exports apply to a classifier's logits) gives the mean probability exactly: ``softmax(log p) = p`` when
    ``p`` sums to one. A seed ensemble of one fold (``train_seeds``) is exported and streamed as one model this way.

    Args:
        models: classifiers returning ``(B, num_classes)`` logits, with the same ``data_config()``.
    """

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (M, B, C) probabilities of the M members, in fp32 (members may run under autocast) -> (B, C) log mean
        probs = torch.stack([m(x).float().softmax(-1) for m in self.members])
        return probs.mean(0).clamp_min(1e-12).log()

    def data_config(self) -> dict:
        return self.members[0].data_config()


def validate_gcvit_size(variant: str, img_size: int, weights: str) -> None:
    """Explain GCViT's input-size constraints before timm fails deep inside.

    GCViT downsamples by 32 and its windows tile every stage, so the input side must be a
    multiple of 32; its pretrained relative-position-bias tables are sized for 224 px, so
    hub weights load only at 224.
    """
    if not variant.startswith("gcvit"):
        return
    if img_size % 32:
        lo, hi = img_size // 32 * 32, (img_size // 32 + 1) * 32
        raise ValueError(f"{variant}: image_size must be a multiple of 32 (GCViT windows tile each stage); "
                         f"got {img_size}, use {lo or 32} or {hi}")
    if weights == "hub" and img_size != 224:
        raise ValueError(f"{variant}: timm's pretrained weights are for 224 px (relative position bias tables "
                         f"change shape at other sizes); use image_size=224 with weights='hub', or weights='none' "
                         f"or a checkpoint trained at {img_size} px")


def count_parameters(model: nn.Module) -> dict:
    """Total and trainable parameter counts."""
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def create_classifier(variant: str, num_classes: int, img_size: int, weights: str = "none",
                      allow_random_init: bool = False, dropout: float = 0.3, hidden: int = 256,
                      class_names: list[str] | None = None) -> tuple[TimmClassifier, dict]:
    """Build a :class:`TimmClassifier` and load its weights from the requested source.

    Args:
        variant: timm model name.
        num_classes: classes of the new head.
        img_size: input side in pixels.
        weights: ``"hub"`` (timm download), ``"none"`` (random init) or a path to a local
            checkpoint: a timm/backbone state dict, or a checkpoint written by this pipeline
            (e.g. trained on FER+); its classification layer is reset when the class
            count differs, or when the checkpoint's class names are not ``class_names``.
        allow_random_init: if hub weights cannot be fetched, continue from random weights
            (recorded in the returned info) instead of stopping.
        dropout, hidden: head settings.
        class_names: the new head's classes, in order (to compare with a pipeline checkpoint's).

    Returns:
        ``(model, info)``; info records the weights source actually used (and a file's
        SHA-256), missing and unexpected keys, and any fallback.

    Raises:
        WeightsUnavailableError: hub weights requested, unreachable, and no fallback allowed.
    """
    validate_gcvit_size(variant, img_size, weights)
    info = {"requested": weights, "source": weights, "missing_keys": [], "unexpected_keys": []}
    if weights == "hub":
        try:
            model = TimmClassifier(variant, num_classes, img_size, hidden, dropout, pretrained=True)
        except Exception as e:  # noqa: BLE001 - any download/cache failure lands here
            msg = (f"could not fetch timm's pretrained {variant} weights ({type(e).__name__}: {str(e)[:200]}). "
                   "Without internet, download them elsewhere (timm.create_model(..., pretrained=True) "
                   "caches them under ~/.cache/torch/hub/checkpoints or ~/.cache/huggingface) and pass the file as weights='/path/to/file', "
                   "or set allow_random_init=True to train from scratch.")
            if not allow_random_init:
                raise WeightsUnavailableError(msg) from e
            print("WARNING:", msg, "\nContinuing from RANDOM initialisation, as allowed.")
            info.update(source="none (hub unavailable)", error=str(e)[:300])
            model = TimmClassifier(variant, num_classes, img_size, hidden, dropout)
        return model, info
    model = TimmClassifier(variant, num_classes, img_size, hidden, dropout)
    if weights == "none":
        return model, info
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weights file not found (weights must be 'hub', 'none' or a file)")
    state, source_classes = _read_weights_file(path)
    reset = class_names is not None and source_classes is not None and list(source_classes) != list(class_names)
    info.update(load_weights(model, state, reset_head=reset))
    info.update(source=str(path), sha256=file_sha256(path), source_class_names=source_classes)
    return model, info


def load_state_dict_file(path: str | Path) -> dict:
    """A state dict from a ``.pth``/``.pt``/``.bin`` (safely, ``weights_only``) or ``.safetensors`` file."""
    return _read_weights_file(path)[0]


def _read_weights_file(path: str | Path) -> tuple[dict, list[str] | None]:
    """(state dict, the class names a pipeline checkpoint records, else None)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsUnavailableError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    if isinstance(ckpt, dict) and ckpt.get("train_seeds"):  # DFER_GCViT's final model of a seed ensemble
        raise WeightsUnavailableError(
            f"{path}: an ensemble of {len(ckpt['train_seeds'])} models (train_seeds {ckpt['train_seeds']}), not one "
            "set of weights; start from one member's fold_k/best_model.pth (its run folders: "
            f"{', '.join(ckpt.get('member_runs', []))})")
    for key in ("model", "state_dict", "model_state"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            return ckpt[key], ckpt.get("class_names")
    return ckpt, None


def load_weights(model: TimmClassifier, state: dict, reset_head: bool = False) -> dict:
    """Load a backbone or full-model state dict, dropping a last layer of the wrong size.

    Keys of a bare timm model (``stem.``, ``stages.``) are mapped under ``backbone.``; timm's
    own classifier (``head.fc``) is ignored, as our head replaces it. ``reset_head`` drops the
    file's last layer even when its size fits (other classes, or another order).

    Returns:
        missing_keys, unexpected_keys and whether the head was reset.
    """
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DistributedDataParallel's prefix
    if not any(k.startswith("backbone.") for k in state):
        state = {f"backbone.{k}": v for k, v in state.items() if not k.startswith(("head.fc", "fc.", "classifier."))}
    backbone_keys = [k for k in own if k.startswith("backbone.")]
    matched = sum(k in state for k in backbone_keys)
    if matched < 0.9 * len(backbone_keys):  # another architecture: a load of (almost) nothing is no load
        raise WeightsUnavailableError(
            f"only {matched} of the {len(backbone_keys)} backbone weights of {model.variant} are in the file "
            f"(file keys: {list(state)[:3]}...); is it a checkpoint of this model?")
    head_reset = False
    last = f"head.{len(model.head) - 1}."
    for k in list(state):
        if reset_head and k.startswith(last):
            del state[k]
            head_reset = True
        elif k in own and state[k].shape != own[k].shape:
            if k.startswith("head."):
                del state[k]  # the classification layer of another dataset: start it afresh
                head_reset = True
            else:
                raise WeightsUnavailableError(
                    f"weight {k} has shape {tuple(state[k].shape)} in the file but {tuple(own[k].shape)} in "
                    f"{model.variant} at {model.img_size} px (GCViT weights only load at the size they were trained at)")
    result = model.load_state_dict(state, strict=False)
    print(f"Loaded {len(own) - len(result.missing_keys)}/{len(own)} weights; {len(result.missing_keys)} missing "
          f"{list(result.missing_keys)[:4]}, {len(result.unexpected_keys)} unused"
          + ("; classification layer reset" if head_reset else ""))
    return {"missing_keys": list(result.missing_keys), "unexpected_keys": list(result.unexpected_keys),
            "head_reset": head_reset}


def set_finetune_strategy(model: TimmClassifier, strategy: str = "full", frozen_stages: int = 0) -> dict:
    """Freeze parts of the backbone.

    Args:
        model: the classifier.
        strategy: ``"full"`` (train everything, as the seed), ``"head"`` (backbone frozen) or
            ``"partial"`` (stem and the first ``frozen_stages`` stages frozen).
        frozen_stages: stages to freeze under ``"partial"``.

    Returns:
        Parameter counts after freezing.
    """
    for p in model.parameters():
        p.requires_grad = True
    if strategy == "head":
        for p in model.backbone.parameters():
            p.requires_grad = False
    elif strategy == "partial":
        stages = getattr(model.backbone, "stages", None)
        if stages is None or not 0 <= frozen_stages <= len(stages):
            raise ValueError(f"{model.variant}: cannot freeze {frozen_stages} stages")
        frozen = [getattr(model.backbone, n) for n in ("stem", "patch_embed") if hasattr(model.backbone, n)]
        for module in frozen + list(stages[:frozen_stages]):
            for p in module.parameters():
                p.requires_grad = False
    elif strategy != "full":
        raise ValueError(f"strategy must be 'full', 'head' or 'partial', not {strategy!r}")
    return count_parameters(model)


def create_feature_pyramid(backbone: str, img_size: int, grid_sizes: list[int], in_chans: int = 3,
                           weights: str = "none", backbone_args: dict | None = None) -> tuple[nn.Module, dict]:
    """Stages of a timm CNN whose feature maps have the requested grid sizes (a feature pyramid).

    ``timm.create_model(backbone, features_only=True, out_indices=...)``, where the stages are
    chosen by the side of their output at ``img_size``: e.g. resnet18 at 112 px has stages of
    56/28/14/7/4 cells (strides 2..32), so ``grid_sizes=[28, 14, 7]`` takes stages 2-4.

    Args:
        backbone: a timm model that supports ``features_only`` (ResNets, ConvNeXts, RegNets, ...).
        img_size: input side in pixels.
        grid_sizes: wanted sides of the feature maps, finest first.
        in_chans: input channels.
        weights: ``"hub"`` (timm's download), ``"none"`` (random init) or a path to a file of
            that model's weights (:func:`load_matching_weights`: entries matched by name and
            shape, so the classifier and unused stages are skipped; refused when few match).
        backbone_args: extra ``timm.create_model`` arguments (e.g. ``channels``, ``stem_width``).

    Returns:
        ``(pyramid, info)``: the module returns a list of (B, C_i, g_i, g_i) maps; info records
        the stages, their channels and grid sizes, and the weights source (a file's SHA-256).

    Raises:
        ValueError: an unknown backbone, one without ``features_only``, or grid sizes that the
            backbone does not produce at ``img_size`` (the message lists the sizes that work).
        WeightsUnavailableError: hub weights unreachable or a weights file missing or unreadable.
    """
    import timm

    kwargs = dict(backbone_args or {})
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('_')[0][:6]}*")[:12]
        raise ValueError(f"timm has no model {backbone!r}; similar names: {close}")
    try:
        probe = timm.create_model(backbone, features_only=True, in_chans=in_chans, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm raises several types for models without feature extraction
        raise ValueError(f"{backbone}: cannot be used as a feature pyramid (features_only): {e}") from e
    with torch.no_grad():
        probe.eval()
        sides = [f.shape[-1] for f in probe(torch.zeros(1, in_chans, img_size, img_size))]
    reductions = probe.feature_info.reduction()
    wanted = list(grid_sizes)
    if any(g not in sides for g in wanted) or wanted != sorted(wanted, reverse=True):
        hints = sorted({r * g for g in wanted for r in reductions  # padded convolutions round sides up
                        if all(any(-(-r * g // rr) == gg for rr in reductions) for gg in wanted)})
        raise ValueError(f"{backbone} at {img_size} px gives feature maps of {sides} cells (strides {reductions}); "
                         f"grid sizes {wanted} (finest first) are not among them. Choose grid sizes from {sides}, "
                         f"or an image size that gives {wanted}: {hints or 'none with these strides'}")
    out_indices = tuple(sides.index(g) for g in wanted)
    info = {"backbone": backbone, "backbone_args": kwargs, "out_indices": list(out_indices), "grid_sizes": wanted,
            "requested": weights, "source": weights}
    if weights == "hub":
        try:
            model = timm.create_model(backbone, features_only=True, out_indices=out_indices, in_chans=in_chans,
                                      pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - any download/cache failure lands here
            raise WeightsUnavailableError(
                f"could not fetch timm's pretrained {backbone} weights: {type(e).__name__}: {str(e)[:300]}. Without "
                "internet, download them elsewhere (timm caches them under ~/.cache/huggingface), pass the file as "
                "weights='/path/to/file', or use weights='none' to train from scratch.") from e
        print(f"{backbone}: timm's pretrained weights")
    else:
        model = timm.create_model(backbone, features_only=True, out_indices=out_indices, in_chans=in_chans, **kwargs)
    if weights not in ("hub", "none"):
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailableError(f"{path}: weights file not found (weights must be 'hub', 'none' or a file)")
        info.update(source=str(path), sha256=file_sha256(path), **load_matching_weights(model, path))
    info["channels"] = model.feature_info.channels()
    return model, info


def load_matching_weights(model: nn.Module, path: str | Path, min_share: float = 0.9) -> dict:
    """Load the entries of a weights file whose names and shapes match the model's, loudly.

    A ``module.`` prefix (DistributedDataParallel's) is removed; entries the model does not
    have (a classifier, stages past the pyramid) are skipped and counted.

    Args:
        model: e.g. a timm feature pyramid.
        path: a state dict file (``.pth``, ``.safetensors``, or a pipeline checkpoint).
        min_share: refuse the file when fewer than this share of the model's entries match.

    Raises:
        WeightsUnavailableError: the file is unreadable or matches too few entries (the wrong
            architecture or width): nothing is loaded then.
    """
    state = {k.removeprefix("module."): v for k, v in _read_weights_file(path)[0].items()}
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing = [k for k in own if k not in matched]
    unexpected = [k for k in state if k not in matched]
    if len(matched) < min_share * len(own):
        raise WeightsUnavailableError(
            f"{path}: only {len(matched)} of the model's {len(own)} weights match the file by name and shape "
            f"(file: {list(state)[:3]}..., model: {list(own)[:3]}...); is it the same architecture and width?")
    model.load_state_dict(matched, strict=False)
    print(f"Loaded {len(matched)}/{len(own)} weights from {path}; {len(missing)} missing, "
          f"{len(unexpected)} in the file unused")
    return {"loaded_keys": len(matched), "missing_keys": missing, "unexpected_keys": unexpected[:50],
            "num_unexpected_keys": len(unexpected)}
