"""Pilot of GReFEL's `backbone` ablation row on FER+: which CNN input size / width / stages learn best.

Every row of issue 12's ablation sits on the same CNN, so the CNN is chosen first. This trains the
`backbone` row's CNN as the notebook builds it (``H.create_feature_pyramid`` -> the coarsest grid's map,
1x1 projection, average pool, LayerNorm; then dropout and a linear head where the notebook has its MLP
head) with the cpu profile's recipe (AdamW, cosine with warm-up, label smoothing 0.1, the ``grefel``
augmentation with random erasing on the device, bf16 autocast, clipped gradients, flip TTA) for several
candidate settings, one after the other, and prints per setting: FER2013Valid accuracy per epoch, the
best epoch and its accuracy, and training images/s. FER2013Test is not read: a pilot chooses settings,
and chooses them on validation. Rows are written to ``--json``
as soon as each finishes, so a killed run keeps what it measured.

It runs where the notebook's FER+ archive cannot go (the GPU machine takes 64 MiB): ``pack`` turns a
FER+ archive into one .npz of its training and validation faces (48x48 grayscale, lossless WebP) with
majority-vote labels (the rows that ``H.read_ferplus`` labels; unknown/not-a-face majorities are left
out, as the notebook does).

    python bench/backbone_pilot.py pack ../shared/data/ferplus/FERPlus.zip .gpu/data/ferplus48.npz
    python bench/backbone_pilot.py train .gpu/data/ferplus48.npz --json out.json            # all candidates
    python bench/backbone_pilot.py train data.npz --only r18_64 --epochs 2 --limit 512      # a dry run

A pilot on another device (bf16 on a GPU) ranks settings; the figures that count are the notebook's.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.utils.flop_counter
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helpers as H  # noqa: E402

HALF = {"channels": [32, 64, 128, 256], "stem_width": 32}
# name: (image size, pyramid grids finest first, backbone args); the cpu profile today is r18_64
CANDIDATES = {
    "r18_64": (64, [16, 8, 4], None),            # stages 1-3 (strides 4/8/16), as the cpu profile
    "r18_64_s4": (64, [8, 4, 2], None),          # stages 2-4: the last stage too
    "half_96": (96, [24, 12, 6], HALF),          # half width, 1.5x the grid of every stage
    "half_96_s4": (96, [12, 6, 3], HALF),        # half width, stages 2-4
    "r18_96": (96, [24, 12, 6], None),           # full width at 96 px: ~2.25x the cpu profile's cost
    "half_128_s4": (128, [16, 8, 4], HALF),      # half width at 128 px, stages 2-4
}


def _encode(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 48, 48) uint8 -> one byte string of lossless WebPs and their N + 1 offsets (WebP: ~30% smaller than
    zlib on these noisy faces, and the device's 64 MiB must hold them with the wheels)."""
    from PIL import Image

    parts = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="WEBP", lossless=True, quality=100, method=6)
        parts.append(np.frombuffer(buf.getvalue(), np.uint8))
    return np.concatenate(parts), np.cumsum([0] + [len(p) for p in parts])


def _decode(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    import cv2

    return np.stack([cv2.imdecode(blob[a:b], cv2.IMREAD_GRAYSCALE) for a, b in zip(offsets[:-1], offsets[1:])])


def pack(archive: str, out: str) -> None:
    """FER+ archive -> .npz of the training and validation faces (48x48 grayscale, lossless) and their
    majority-vote class indices. FER2013Test stays out: a pilot chooses settings, so it reads validation only."""
    with tempfile.TemporaryDirectory() as tmp:
        root = H.prepare_ferplus(archive, tmp, verbose=False)
        index, _ = H.read_ferplus(root, verbose=False)
        index = index[index["label"] != ""]
        arrays = {}
        for split in ("train", "val"):
            rows = index[index["split"] == split]
            if rows.empty:
                raise SystemExit(f"{archive}: no {split} split in the FER+ tree")
            faces = np.stack([H.load_image(p, channels=1).reshape(48, 48) for p in rows["path"]])
            arrays[f"blob_{split}"], arrays[f"offsets_{split}"] = _encode(faces)
            arrays[f"y_{split}"] = np.array([H.FERPLUS_CLASSES.index(c) for c in rows["label"]], np.int64)
            print(f"{split}: {len(rows)} images")
    np.savez(out, classes=np.array(H.FERPLUS_CLASSES), **arrays)
    print(f"wrote {out} ({Path(out).stat().st_size / 2**20:.1f} MiB)")


class BackboneRow(nn.Module):
    """GReFEL's `backbone` row, a linear head for its MLP head: the pyramid's coarsest map, projected, pooled,
    normalised, classified."""

    def __init__(self, size: int, grids: list[int], backbone_args: dict | None, embed_dim: int = 96,
                 num_classes: int = 8, dropout: float = 0.1):
        super().__init__()
        self.cnn, self.info = H.create_feature_pyramid("resnet18", size, grids, backbone_args=backbone_args)
        self.proj = nn.Conv2d(self.info["channels"][-1], embed_dim, 1)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, num_classes))

    def forward(self, x):
        return self.head(self.norm(self.proj(self.cnn(x)[-1]).mean((2, 3))))


def _batches(x: torch.Tensor, size: int):
    for i in range(0, len(x), size):
        yield x[i:i + size]


@torch.no_grad()
def accuracy(model, x, y, prep, amp_dtype, batch: int = 512) -> float:
    model.eval()
    correct = 0
    for xb, yb in zip(_batches(x, batch), _batches(y, batch)):
        img = prep(xb)
        with torch.autocast(img.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            p = model(img).float().softmax(1) + model(img.flip(-1)).float().softmax(1)  # flip TTA
        correct += int((p.argmax(1) == yb).sum())
    return correct / len(y)


def train_one(name: str, data: dict, args, device) -> dict:
    size, grids, bargs = CANDIDATES[name]
    H.seed_everything(args.seed)
    model = BackboneRow(size, grids, bargs).to(device)
    params = sum(p.numel() for p in model.parameters())
    model.eval()  # counted without touching BatchNorm's running statistics
    with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as flops:  # the cost on any device
        model(torch.zeros(1, 3, size, size, device=device))
    amp_dtype = H.resolve_amp(args.amp, device)
    norm = dict(mean=H.IMAGENET_MEAN, std=H.IMAGENET_STD)
    augment = H.BatchAugment("grefel", size, erasing=args.erasing, **norm).to(device)
    prep = H.BatchAugment("eval", size, **norm).to(device)
    x_tr, y_tr = data["train"]
    steps = len(y_tr) // args.batch
    opt = H.build_optimizer(model, args.lr, args.weight_decay)
    sched = H.build_scheduler(opt, args.epochs, steps, warmup_epochs=1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    no_landmarks = torch.zeros(args.batch, 68, 2, device=device)  # the recipe moves landmarks: none here
    history, seen, train_s = [], 0, 0.0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_tr), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k in range(steps):
            idx = order[k * args.batch:(k + 1) * args.batch]
            with torch.no_grad():
                img, _ = augment(x_tr[idx], no_landmarks)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(model(img).float(), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            seen += len(idx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s += time.perf_counter() - t0
        val = accuracy(model, *data["val"], prep, amp_dtype)
        history.append({"epoch": epoch + 1, "loss": loss.item(), "val_acc": val})
        print(f"  {name} epoch {epoch + 1}: loss {loss.item():.3f} val {val:.4f}", flush=True)
    best = max(history, key=lambda r: (r["val_acc"], -r["epoch"]))  # chosen on validation, earliest on ties
    return {"name": name, "image_size": size, "grids": grids, "backbone_args": bargs, "params": params,
            "gflops_forward": flops.get_total_flops() / 1e9, "channels": model.info["channels"],
            "epochs": args.epochs, "best_epoch": best["epoch"], "val_acc": best["val_acc"],
            "train_images_per_s": seen / train_s, "train_s": train_s, "history": history}


def train(args) -> None:
    device = H.select_device(args.device or "auto")
    npz = np.load(args.data)
    data = {}
    for split in ("train", "val"):
        x, y = _decode(npz[f"blob_{split}"], npz[f"offsets_{split}"]), npz[f"y_{split}"]
        if args.limit:
            x, y = x[:args.limit], y[:args.limit]
        data[split] = (torch.from_numpy(x).unsqueeze(1).expand(-1, 3, -1, -1).contiguous().to(device),
                       torch.from_numpy(y).to(device))
    print(f"device {device}; train/val {[len(data[s][1]) for s in data]}", flush=True)
    rows = []
    for name in args.only or list(CANDIDATES):
        t0 = time.perf_counter()
        try:
            rows.append(train_one(name, data, args, device))
        except Exception as e:  # noqa: BLE001 - one candidate that cannot be built must not cost the others
            rows.append({"name": name, "error": f"{type(e).__name__}: {e}"})
            print(f"{name}: FAILED {rows[-1]['error']}", flush=True)
            continue
        r = rows[-1]
        print(f"{name}: {r['params'] / 1e6:.2f} M params, {r['gflops_forward']:.3f} GFLOPs, best epoch {r['best_epoch']} val {r['val_acc']:.4f}, "
              f"{r['train_images_per_s']:.0f} img/s, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        if args.json:
            H.save_json({"device": str(device), "args": vars(args), "rows": rows}, args.json)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="FER+ archive -> .npz of 48x48 faces")
    p.add_argument("archive")
    p.add_argument("out")
    t = sub.add_parser("train", help="train the candidates one after the other")
    t.add_argument("data")
    t.add_argument("--only", nargs="+", choices=list(CANDIDATES))
    t.add_argument("--epochs", type=int, default=24)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--erasing", type=float, default=0.25)
    t.add_argument("--amp", default="auto")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--limit", type=int, help="first N images of each split (dry runs)")
    t.add_argument("--device")
    t.add_argument("--json")
    args = ap.parse_args(argv)
    pack(args.archive, args.out) if args.cmd == "pack" else train(args)


if __name__ == "__main__":
    main()
