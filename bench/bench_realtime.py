"""Real-time benchmark: per-frame latency (decode, face detection, preprocessing, model) and
end-to-end FPS at batch 1 for PyTorch eager, TorchScript, onnxruntime fp32 and int8, side by side.

Prints figures; asserts nothing. Usage (repo root, venv, nothing else running):
    python bench/bench_realtime.py [--checkpoint data-exploration/DFER_GCViT/best_model.pth] [--frames 60]
Without a checkpoint, a randomly initialised model of the cpu profile's shape is timed (same speed,
no accuracy). The clip is made of real KMU-FED frames resized to 640x480.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import cv2
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import helpers as H  # noqa: E402


def make_clip(shared: Path, out: Path, frames: int) -> Path:
    root = H.extract_archive(shared / "kmu-fed" / "archive.zip", out.parent / "ex", verbose=False)
    paths = sorted(root.rglob("*.jpg"))[:: max(1, 1106 // frames)][:frames]
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), 15, (640, 480))
    for p in paths:
        writer.write(cv2.resize(cv2.imread(str(p)), (640, 480)))
    writer.release()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="best_model.pth of DFER_GCViT")
    ap.add_argument("--results", type=Path, help="final_results.json of the same run (for its accuracy)")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--detect-every", type=int, default=1, help="run face detection every k-th frame")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        ckpt = H.load_checkpoint(args.checkpoint)
        cfg, classes, pre, norm = ckpt["config"], ckpt["class_names"], ckpt["preprocess"], ckpt["norm"]
        members = [H.create_classifier(cfg["model_name"], len(classes), cfg["image_size"], dropout=cfg["dropout"])[0]
                   for _ in ckpt.get("train_seeds") or [None]]  # a seed ensemble's final model: its members as one
        model = members[0] if len(members) == 1 else H.EnsembleClassifier(members)
        model.load_state_dict(ckpt["model"])
    else:
        cfg = {"model_name": "gcvit_xxtiny", "image_size": 64}
        classes = ["angry", "disgust", "fear", "happy", "sad", "surprise"]
        pre = {"image_size": 64, "channels": 1, "margin": 0.25, "square": True, "no_face": "full"}
        norm = {"mean": H.IMAGENET_MEAN, "std": H.IMAGENET_STD}
        model, _ = H.create_classifier("gcvit_xxtiny", 6, 64)
    model.eval()
    accuracy = "n/a (no --results)" if args.checkpoint else "n/a (untrained)"
    if args.results:
        r = json.loads(args.results.read_text())
        acc = r["metrics"]["mean_std"]["accuracy"]
        accuracy = f"{acc['mean']:.3f} +- {acc['std']:.3f} ({r['protocol']['name']} protocol)"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip = make_clip(args.shared, tmp / "clip.avi", args.frames)
        meta = H.export_metadata(classes, pre, norm["mean"], norm["std"])
        example = torch.zeros(1, 3, cfg["image_size"], cfg["image_size"])
        onnx = H.export_onnx(model, tmp / "m.onnx", (example,), meta)
        backends = {"pytorch eager": H.Backend("torch", model),
                    "torchscript": H.Backend("torchscript", H.export_torchscript(model, tmp / "m.pt", (example,), meta)),
                    "onnxruntime fp32": H.Backend("onnx", onnx, threads=args.threads),
                    "onnxruntime int8": H.Backend("onnx", H.quantize_onnx_int8(onnx, tmp / "m8.onnx"),
                                                  threads=args.threads)}
        detector = H.FaceDetector()
        print(f"{cfg['model_name']} at {cfg['image_size']} px, {args.frames} frames 640x480, batch 1, "
              f"{args.threads} threads, face detection every {args.detect_every} frame(s); model accuracy {accuracy}")
        print(f"{'backend':<18}{'decode':>9}{'detect':>9}{'preproc':>9}{'model':>9}{'FPS':>8}   (ms per frame)")
        rows = {}
        for name, backend in backends.items():
            backend(example.numpy())  # warm-up
            s = H.run_video(clip, backend, classes, pre, norm["mean"], norm["std"], detector=detector,
                            detect_every=args.detect_every, progress=False)
            rows[name] = s
            print(f"{name:<18}{s['mean_decode_ms']:9.1f}{s['mean_detect_ms']:9.1f}"
                  f"{s['mean_preprocess_ms_face_frames']:9.1f}{s['mean_model_ms_face_frames']:9.1f}"
                  f"{s['fps_end_to_end']:8.1f}")
        eager = rows["pytorch eager"]["mean_model_ms_face_frames"]
        for name in ("onnxruntime fp32", "onnxruntime int8"):
            print(f"model speed-up of {name} over eager: {eager / rows[name]['mean_model_ms_face_frames']:.2f}x")


if __name__ == "__main__":
    main()
