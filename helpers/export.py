"""Inference and export: predict one image with exactly the training preprocessing."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from .augment import build_transform
from .data import load_image
from .faces import FaceDetector, crop_face
from .setup import atomic_write


class Predictor:
    """Image path -> emotion, confidence and all class probabilities.

    Applies the training pipeline: load, detect the face (when training cropped faces),
    :func:`crop_face` with the same margin and no-face policy, the evaluation transform.
    A face crop given as input simply yields a box covering (most of) the image, or the
    no-face policy, which for ``"full"`` keeps the whole crop.

    Args:
        model: a trained classifier returning logits (or a dict with ``final_probs``).
        class_names: label order of the model's outputs.
        preprocess: the cache's preprocessing parameters (``image_size``, ``channels``,
            ``face_crop``, ``margin``, ``square``, ``no_face``).
        mean, std: normalisation used in training.
        device: where the model runs.
    """

    def __init__(self, model: torch.nn.Module, class_names: list[str], preprocess: dict,
                 mean: tuple, std: tuple, device="cpu"):
        self.model = model.to(device).eval()
        self.class_names = list(class_names)
        self.pre = dict(preprocess)
        self.device = device
        self.transform = build_transform("eval", self.pre["image_size"], mean, std, channels=self.pre["channels"])
        self.detector = FaceDetector() if self.pre.get("face_crop") else None

    def crop(self, path: str | Path) -> tuple[np.ndarray | None, tuple | None]:
        """The preprocessed uint8 crop of an image and the face box used (None if none found).

        Without a face, the training policy decides: ``"full"`` / ``"center"`` crop as in
        training; ``"drop"`` (no such frame was trained on) gives no crop (None).
        """
        image = load_image(path, self.pre["channels"])
        found = self.detector.detect_file(path) if self.detector is not None else None
        box = found[0] if found else None
        crop = crop_face(image, box, self.pre["image_size"], margin=self.pre.get("margin", 0.25),
                         square=self.pre.get("square", True), no_face=self.pre.get("no_face", "full"))
        return (None if crop is None else crop.reshape(crop.shape[0], crop.shape[1], -1)), box

    @torch.no_grad()
    def __call__(self, path: str | Path) -> dict:
        """``{"emotion", "confidence", "probabilities": {class: p}, "face_box"}`` for one image; with no
        face found and a model trained with ``no_face="drop"``, emotion and probabilities are None."""
        crop, box = self.crop(path)
        if crop is None:
            return {"emotion": None, "confidence": None, "probabilities": None, "face_box": None,
                    "note": "no face found; the model was trained without such frames (no_face='drop')"}
        x = self.transform(image=crop)["image"][None].to(self.device)
        out = self.model(x)
        probs = (out["final_probs"] if isinstance(out, dict) else out.float().softmax(-1))[0].cpu().numpy()
        k = int(probs.argmax())
        return {"emotion": self.class_names[k], "confidence": float(probs[k]),
                "probabilities": {c: float(p) for c, p in zip(self.class_names, probs)},
                "face_box": None if box is None else [float(v) for v in box]}


# ----------------------------------------------------------------------------- export

class ProbabilityModel(torch.nn.Module):
    """Export wrapper: plain tensors in, class probabilities out.

    For a classifier returning logits this is softmax(logits); for a model returning a dict
    (GReFEL) it returns ``final_probs`` (pass ``outputs`` to expose more, in that order).

    Args:
        model: the trained model.
        outputs: dict keys to return when the model returns a dict.
    """

    def __init__(self, model: torch.nn.Module, outputs: tuple[str, ...] = ("final_probs",)):
        super().__init__()
        self.model, self.outputs = model, tuple(outputs)

    def forward(self, *inputs):
        out = self.model(*inputs)
        if isinstance(out, dict):
            values = tuple(out[k] for k in self.outputs)
            return values[0] if len(values) == 1 else values
        return out.float().softmax(-1)


def export_metadata(class_names: list[str], preprocess: dict, mean: tuple, std: tuple, **extra) -> dict:
    """What a consumer needs besides the graph: input size and channels, normalisation, classes."""
    size = preprocess["image_size"]
    return {"input_size": [3, size, size], "stored_channels": preprocess.get("channels", 3),
            "mean": list(mean), "std": list(std), "class_names": list(class_names),
            "preprocess": preprocess, "output": "class probabilities (softmax)", **extra}


def _export_copy(model: torch.nn.Module, example_inputs) -> tuple[ProbabilityModel, tuple[torch.Tensor, ...]]:
    """An fp32, CPU, eval-mode copy of the model, wrapped, and the example inputs to match: exporting
    never moves, casts or switches the caller's model (which a Predictor or evaluator on CUDA may
    still be using)."""
    return (ProbabilityModel(copy.deepcopy(model).float().cpu()).eval(),
            tuple(x.float().cpu() for x in example_inputs))


def export_onnx(model: torch.nn.Module, path: str | Path, example_inputs: tuple[torch.Tensor, ...],
                metadata: dict, input_names: tuple[str, ...] = ("image",), output_names: tuple[str, ...] = ("probs",),
                opset: int = 17) -> Path:
    """Export ``ProbabilityModel(model)`` to ONNX with a dynamic batch axis and metadata.

    The metadata (JSON under the key ``fer_metadata``) carries the input size, channels,
    mean/std and class names, so a consumer needs nothing else.

    Args:
        model: the trained model, on any device (a CPU fp32 eval copy is exported; the model is unchanged).
        path: ``.onnx`` file (written atomically).
        example_inputs: one batch of inputs in the order the model takes them.
        metadata: from :func:`export_metadata`.
        input_names, output_names: graph names.
        opset: ONNX opset (17 or newer).
    """
    import json

    import onnx

    wrapped, example_inputs = _export_copy(model, example_inputs)
    axes = {n: {0: "batch"} for n in (*input_names, *output_names)}
    path = Path(path)

    def write(tmp):
        # The TorchScript-based exporter: one self-contained file, dynamic batch via dynamic_axes.
        torch.onnx.export(wrapped, tuple(example_inputs), str(tmp), input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes, opset_version=opset, dynamo=False)
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = "fer_metadata", json.dumps(metadata)
        onnx.save(proto, str(tmp))

    return atomic_write(path, write)


def export_torchscript(model: torch.nn.Module, path: str | Path, example_inputs: tuple[torch.Tensor, ...],
                       metadata: dict) -> Path:
    """Trace ``ProbabilityModel(model)`` to TorchScript; metadata travels as ``meta.json`` extra file."""
    import json

    wrapped, example_inputs = _export_copy(model, example_inputs)
    with torch.no_grad():
        traced = torch.jit.trace(wrapped, tuple(example_inputs), check_trace=False)
    return atomic_write(Path(path), lambda tmp: torch.jit.save(traced, str(tmp),
                                                          _extra_files={"meta.json": json.dumps(metadata)}))


def quantize_onnx_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantisation of an ONNX model's MatMul/Gemm weights (onnxruntime's tool)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    return atomic_write(Path(dst), lambda tmp: quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8,
                                                           op_types_to_quantize=["MatMul", "Gemm"]))


def read_onnx_metadata(path: str | Path) -> dict:
    """The ``fer_metadata`` an exported ONNX file carries."""
    import json

    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props["fer_metadata"])


class Backend:
    """One inference interface over PyTorch, TorchScript and onnxruntime models.

    ``backend(*inputs)`` takes float32 numpy arrays (batch first) and returns probabilities.

    Args:
        kind: ``"torch"``, ``"torchscript"`` or ``"onnx"``.
        model_or_path: a module (torch) or a file (torchscript, onnx).
        threads: intra-op threads (onnxruntime / torch).
    """

    def __init__(self, kind: str, model_or_path, threads: int | None = None):
        self.kind = kind
        if kind == "torch":
            self.model = ProbabilityModel(model_or_path).eval()
        elif kind == "torchscript":
            self.model = torch.jit.load(str(model_or_path)).eval()
        elif kind == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(model_or_path), opts, providers=["CPUExecutionProvider"])
            self.input_names = [i.name for i in self.session.get_inputs()]
        else:
            raise ValueError(f"kind must be 'torch', 'torchscript' or 'onnx', not {kind!r}")

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        if self.kind == "onnx":
            return self.session.run(None, {n: np.ascontiguousarray(x, np.float32)
                                           for n, x in zip(self.input_names, inputs)})[0]
        with torch.no_grad():
            out = self.model(*(torch.from_numpy(np.ascontiguousarray(x, np.float32)) for x in inputs))
        return (out[0] if isinstance(out, tuple) else out).numpy()


# ----------------------------------------------------------------------------- video

def run_video(source: str | Path | int, backend: "Backend", class_names: list[str], preprocess: dict,
              mean: tuple, std: tuple, out_video: str | Path | None = None, out_csv: str | Path | None = None,
              ema: float = 0.6, detector: FaceDetector | None = None, detect_every: int = 1,
              landmarker=None, max_frames: int | None = None, progress: bool = True) -> dict:
    """Classify a video (or a camera index) frame by frame, as training preprocessed faces.

    decode -> face detection -> :func:`crop_face` -> evaluation transform -> model ->
    exponential moving average of the probabilities (``smoothed = ema * smoothed + (1 - ema) * p``)
    -> an annotated video (box, label, confidence, FPS) and a per-frame CSV. Frames without a
    face are marked (``face_found = 0``, empty probabilities) and leave the smoothed state as it was.

    Args:
        source: video file or camera index.
        backend: a :class:`Backend` taking (1, 3, S, S) float32 images.
        class_names: output order.
        preprocess: the cache's preprocessing parameters (image_size, channels, margin, ...).
        mean, std: training normalisation.
        out_video: annotated video to write (``.mp4``/``.avi``), or None.
        out_csv: per-frame CSV to write, or None.
        ema: weight of the past in the smoothing, in [0, 1) (0: no smoothing).
        detector: defaults to :class:`FaceDetector()`.
        detect_every: run the detector on every k-th frame and reuse its box in between
            (drivers move little between frames; detection is the costliest stage).
        landmarker: for models that also take landmarks (GReFEL): a function crop ->
            ``(points (68, 2) in crop pixels, ok)``; the backend is then called with
            ``(image, landmarks in [0, 1])``.
        max_frames: stop after this many frames.
        progress: tqdm bar.

    Returns:
        frames, frames_with_face, end-to-end FPS, and mean milliseconds per stage.
    """
    import time

    import cv2
    import pandas as pd
    from tqdm.auto import tqdm

    if not 0 <= ema < 1:
        raise ValueError(f"ema must be in [0, 1), not {ema}")
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise FileNotFoundError(f"{source}: cannot open video or camera")
    fps_in = cap.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    detector = detector or FaceDetector()
    size, channels = preprocess["image_size"], preprocess.get("channels", 3)
    transform = build_transform("eval", size, mean, std, channels=channels, keypoints=landmarker is not None)
    if detect_every < 1:
        raise ValueError(f"detect_every must be >= 1, not {detect_every}")
    writer, rows, smoothed, found = None, [], None, None
    bar = tqdm(total=max_frames or total, desc="video", disable=not progress)
    t_start = time.perf_counter()
    i = 0
    while max_frames is None or i < max_frames:
        t0 = time.perf_counter()
        ok, frame = cap.read()
        if not ok:
            break
        t1 = time.perf_counter()
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        if i % detect_every == 0:
            found = detector.detect(gray)
        t2 = time.perf_counter()
        row = {"frame": i, "timestamp_s": i / fps_in, "face_found": int(found is not None),
               "detected": int(i % detect_every == 0)}
        row.update(dict.fromkeys(["box_x", "box_y", "box_w", "box_h"], np.nan))
        probs = None
        if found is not None:
            box = found[0]
            image = gray if channels == 1 else cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            crop = crop_face(image, box, size, margin=preprocess.get("margin", 0.25),
                             square=preprocess.get("square", True), no_face="full")
            if landmarker is None:
                inputs = (transform(image=crop.reshape(size, size, -1))["image"][None].numpy(),)
            else:
                out = transform(image=crop.reshape(size, size, -1), keypoints=landmarker(crop)[0])
                inputs = (out["image"][None].numpy(), (out["keypoints"] / size)[None].astype(np.float32))
            t3 = time.perf_counter()
            probs = backend(*inputs)[0].astype(np.float64)
            t4 = time.perf_counter()
            smoothed = probs if smoothed is None else ema * smoothed + (1 - ema) * probs
            row.update(zip(["box_x", "box_y", "box_w", "box_h"], box))
        else:
            t3 = t4 = t2
        row.update({f"p_{c}": (probs[k] if probs is not None else np.nan) for k, c in enumerate(class_names)})
        row["label"] = class_names[int(probs.argmax())] if probs is not None else ""
        row["confidence"] = float(probs.max()) if probs is not None else np.nan
        row["smoothed_label"] = class_names[int(smoothed.argmax())] if smoothed is not None else ""
        row["smoothed_confidence"] = float(smoothed.max()) if smoothed is not None else np.nan
        row.update({"decode_ms": (t1 - t0) * 1e3, "detect_ms": (t2 - t1) * 1e3, "preprocess_ms": (t3 - t2) * 1e3,
                    "model_ms": (t4 - t3) * 1e3})
        rows.append(row)
        if out_video is not None:
            fps_now = (i + 1) / (time.perf_counter() - t_start)
            if found is not None:
                x0, y0, w, h = (int(round(v)) for v in found[0])
                cv2.rectangle(frame, (x0, y0), (x0 + w, y0 + h), (0, 255, 0), 2)
            text = (f"{row['smoothed_label']} {row['smoothed_confidence']:.2f}" if smoothed is not None else "no face") \
                if found is not None else "no face"
            cv2.putText(frame, text, (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 255, 0), 2, cv2.LINE_AA)
            cv2.putText(frame, f"{fps_now:.1f} FPS", (10, 60), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 255, 255), 1,
                        cv2.LINE_AA)
            if writer is None:
                fourcc = cv2.VideoWriter_fourcc(*("mp4v" if str(out_video).endswith(".mp4") else "MJPG"))
                Path(out_video).parent.mkdir(parents=True, exist_ok=True)
                writer = cv2.VideoWriter(str(out_video), fourcc, fps_in, (frame.shape[1], frame.shape[0]))
            writer.write(frame)
        i += 1
        bar.update(1)
    wall = time.perf_counter() - t_start
    bar.close()
    cap.release()
    if writer is not None:
        writer.release()
    table = pd.DataFrame(rows)
    if out_csv is not None:
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out_csv, index=False)
    faces = table[table["face_found"] == 1] if len(table) else table
    stages = ("decode_ms", "detect_ms", "preprocess_ms", "model_ms")
    return {"frames": len(table), "frames_with_face": int(len(faces)), "fps_end_to_end": len(table) / max(wall, 1e-9),
            **{f"mean_{s}": float(table[s].mean()) if len(table) else float("nan") for s in stages},
            **{f"mean_{s}_face_frames": float(faces[s].mean()) if len(faces) else float("nan") for s in stages[2:]}}
