"""The GPU data path (helpers/device_data.py), checked on CPU tensors: the batched recipes match the
albumentations ones in distribution, batches match their labels, and fit trains on them reproducibly."""

import numpy as np
import pytest
import torch

import helpers as H
from helpers.demo import draw_face, make_subjects

N = 2000


@pytest.fixture(scope="module")
def face():
    return draw_face("happy", make_subjects(1, 0)[0], np.random.default_rng(0), 64, 64, crop=True)  # 64 x 64 uint8


@pytest.mark.parametrize("kind", ["seed", "nir"])
def test_batched_recipes_match_the_albumentations_pipelines_in_distribution(face, kind):
    t = H.build_transform(kind, 64, channels=1, erasing=0.25)
    t.set_random_seed(0)
    cpu = torch.stack([t(image=face[..., None])["image"] for _ in range(N)])
    torch.manual_seed(0)
    batch = torch.from_numpy(face[None, None]).expand(N, 1, -1, -1).contiguous()
    dev = H.BatchAugment(kind, 64, erasing=0.25)(batch)
    assert dev.shape == cpu.shape == (N, 3, 64, 64) and dev.dtype == torch.float32
    # where the pixels go (flips, rotations, shifts, erasing): the average image
    assert (cpu.mean(0) - dev.mean(0)).abs().mean() < 0.05
    # how much they vary (brightness, contrast, gamma, blur, noise): per-pixel spread and per-image brightness
    assert dev.std(0).mean().item() == pytest.approx(cpu.std(0).mean().item(), rel=0.05)
    means_c, means_d = cpu.mean((1, 2, 3)), dev.mean((1, 2, 3))
    assert abs(means_c.mean() - means_d.mean()).item() < 4 * means_c.std().item() / N ** 0.5
    assert means_d.std().item() == pytest.approx(means_c.std().item(), rel=0.08)
    # half the images mirrored: the face's brighter side swaps
    side = lambda x: (x[:, 0, :, :32].mean((1, 2)) > x[:, 0, :, 32:].mean((1, 2))).float().mean().item()  # noqa: E731
    assert side(dev) == pytest.approx(side(cpu), abs=0.05)


def test_eval_recipe_is_resize_and_normalise_only(face):
    x = torch.from_numpy(face[None, None]).repeat(3, 1, 1, 1)
    ref = H.build_transform("eval", 64, channels=1)(image=face[..., None])["image"]
    out = H.BatchAugment("eval", 64)(x)
    torch.testing.assert_close(out, ref.expand(3, -1, -1, -1), atol=1e-5, rtol=0)


def test_unknown_recipe_is_refused():
    with pytest.raises(ValueError, match="BatchAugment has the recipes"):
        H.BatchAugment("strong", 64)
    with pytest.raises(ValueError, match="call it with \\(images, landmarks\\)"):
        H.BatchAugment("grefel", 64)(torch.zeros(2, 1, 64, 64, dtype=torch.uint8))


@pytest.fixture(scope="module")
def face_landmarks(face):
    """The face's 68 landmarks from dlib, normalised as the cache stores them."""
    points, ok = H.LandmarkDetector()(face)
    assert ok
    return points / face.shape[0]


@pytest.mark.parametrize("recipe", ["grefel", "shift"])
def test_batched_landmark_recipes_match_albumentations_for_images_and_landmarks(face, face_landmarks, recipe):
    """GReFEL's recipes ("grefel": resize and random crop, flip with mirrored landmark indices, colour jitter,
    rotation; "shift": flip, shift and rotation) with erasing, in batches against the albumentations
    KeypointCompose: images and landmarks alike."""
    size = face.shape[0]
    t = H.build_transform(recipe, size, (0.5,) * 3, (0.5,) * 3, channels=1, keypoints=True, erasing=0.25)
    t.compose.set_random_seed(0)
    outs = [t(image=face[..., None], keypoints=face_landmarks * size) for _ in range(N)]
    cpu = torch.stack([o["image"] for o in outs])
    cpu_lm = torch.as_tensor(np.stack([o["keypoints"] for o in outs]) / size, dtype=torch.float32)
    torch.manual_seed(0)
    batch = torch.from_numpy(face[None, None]).expand(N, 1, -1, -1).contiguous()
    lm = torch.as_tensor(face_landmarks, dtype=torch.float32).expand(N, -1, -1)
    dev, dev_lm = H.BatchAugment(recipe, size, (0.5,) * 3, (0.5,) * 3, erasing=0.25)(batch, lm)
    assert dev.shape == cpu.shape == (N, 3, size, size) and dev_lm.shape == cpu_lm.shape == (N, 68, 2)
    assert (cpu.mean(0) - dev.mean(0)).abs().mean() < 0.05
    assert dev.std(0).mean().item() == pytest.approx(cpu.std(0).mean().item(), rel=0.05)
    means_c, means_d = cpu.mean((1, 2, 3)), dev.mean((1, 2, 3))
    assert means_d.std().item() == pytest.approx(means_c.std().item(), rel=0.08)
    # landmarks: the same average position and spread of every point (to a tenth of a pixel: 0.1 / 64)
    assert (cpu_lm.mean(0) - dev_lm.mean(0)).abs().max() < 0.1 / size * 20
    assert (cpu_lm.std(0) - dev_lm.std(0)).abs().mean() < 0.1 / size * 5
    # mirrored indices: the left eye's outer corner (36) stays left of the right eye's (45) in every sample
    for points in (cpu_lm, dev_lm):
        assert (points[:, 36, 0] < points[:, 45, 0]).all()


@pytest.mark.parametrize("recipe", ["grefel", "shift"])
def test_batched_landmarks_follow_the_image(face_landmarks, recipe):
    """A bright 3x3 dot drawn at each of a few landmarks ends up where the returned landmarks say."""
    size, pick = 64, [30, 36, 45, 48, 54]  # inner points: the zoom of the crop can push the jaw out
    img = torch.zeros(1, 1, size, size, dtype=torch.uint8)
    pts = torch.as_tensor(face_landmarks, dtype=torch.float32)
    torch.manual_seed(1)
    aug = H.BatchAugment(recipe, size, (0.0,), (1.0,))
    for i in pick:
        one = img.clone()
        x, y = (pts[i] * size).round().long()
        one[0, 0, y - 1:y + 2, x - 1:x + 2] = 255  # a 3x3 dot centred on the landmark
        out, moved = aug(one.expand(64, -1, -1, -1).contiguous(), pts.expand(64, -1, -1))
        # where the dot went (brightest pixel) vs where landmark i went (its own or its mirror's index)
        flat = out[:, 0].reshape(64, -1).argmax(1)
        found = torch.stack([flat % size, flat // size], -1).float()
        mirrored = torch.as_tensor(H.augment.FLIP_PERMUTATION_68)
        at = torch.where(((moved[:, i] * size - found).norm(dim=-1) <
                          (moved[:, mirrored[i]] * size - found).norm(dim=-1))[:, None],
                         moved[:, i], moved[:, mirrored[i]]) * size
        visible = out[:, 0].amax((1, 2)) > 0.3  # rotated or cropped out of the frame: nothing to find
        assert visible.float().mean() > 0.8
        assert (at - found).norm(dim=-1)[visible].median() < 1.5


def test_device_batches_keep_images_with_their_labels_and_replay_under_the_same_seed(demo_cache):
    cache, classes = demo_cache
    ds = H.H5Dataset(cache, in_memory=True)
    batches = H.DeviceBatches(ds, H.BatchAugment("eval", 32, mean=(0.0,), std=(1.0,)), 16, drop_last=True,
                              device="cpu")
    assert len(batches) == len(ds) // 16 and batches.nbytes == ds._images.nbytes
    # eval recipe: the image back in [0, 1]; find it in the dataset and compare labels
    flat = torch.from_numpy(ds._images.reshape(len(ds), -1)).float() / 255
    torch.manual_seed(3)
    first = [(x.clone(), y.clone()) for x, y in batches]
    for x, y in first[:3]:
        rows = torch.cdist(x.reshape(len(x), -1), flat).argmin(1)
        assert (torch.as_tensor(ds.labels)[rows] == y).all()
    torch.manual_seed(3)
    again = list(batches)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert sum(len(y) for _, y in first) == len(batches) * 16


def test_fit_trains_on_device_batches_and_resumes_to_the_same_result(demo_cache, tmp_path):
    cache, classes = demo_cache

    def run(out, **kw):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, len(classes)))
        ds = H.H5Dataset(cache, in_memory=True)
        train = H.DeviceBatches(ds, H.BatchAugment("seed", 32, erasing=0.25), 32, drop_last=True, device="cpu")
        val = H.make_loader(H.H5Dataset(cache, transform=H.build_transform("eval", 32, channels=1)), 64, False)
        return model, H.fit(model, train, val, out, num_epochs=5, lr=1e-2, weight_decay=1e-4, device="cpu",
                            seed=7, progress=False, **kw)

    full_model, full = run(tmp_path / "full")
    assert full["history"][-1]["val_acc"] > 1.2 / len(classes)  # it learns (chance: 1 / 6)

    def crash(row):
        if row["epoch"] == 3:
            raise KeyboardInterrupt("simulated kill after epoch 3")

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", on_epoch_end=crash)
    resumed_model, resumed = run(tmp_path / "cut")  # resumes after epoch 3: same permutations, same augmentation
    assert [h["val_acc"] for h in resumed["history"]] == [h["val_acc"] for h in full["history"]]
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_data_on_device_auto_is_off_on_cpu_and_true_says_why_it_cannot(demo_cache):
    cache, _ = demo_cache
    ds = H.H5Dataset(cache, in_memory=True)
    assert H.use_device_data("auto", "cpu", ds, "nir") == (False, "auto: cpu (the CPU path: DataLoader workers)")
    assert H.use_device_data(True, "cpu", ds, "nir")[0] is True  # asked for: it works on any device
    with pytest.raises(ValueError, match="no batched version"):
        H.use_device_data(True, "cpu", ds, "strong")
    with pytest.raises(ValueError, match="needs the landmarks"):
        H.use_device_data(True, "cpu", ds, "grefel")
    with pytest.raises(ValueError, match="not held in memory"):
        H.use_device_data(True, "cpu", H.H5Dataset(cache), "nir")
