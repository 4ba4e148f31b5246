"""The training engine: normalisation, augmentation, bf16 weight copies, the CUDA graph's parts, and (on a GPU)
the CUDA graph itself against the eager engine."""
import collections
import copy
import dataclasses
import gc
import math
import weakref
from contextlib import nullcontext
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tune_cnn.config import InputShape, TrainConfig
from tune_cnn.data import channel_statistics
from tune_cnn.engine import (
    WHITEN_EPS,
    Bf16Weights,
    EpochTotals,
    StepGraph,
    augment_batch,
    build_engine,
    evaluate,
    normalise_pixels,
    pixel_normalisation,
    train_step,
)
from tune_cnn.optim import step_lr

from conftest import CUDA, synthetic_splits


def test_pixels_are_normalised_with_the_training_statistics():
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    x = torch.arange(256, dtype=torch.uint8).repeat(12).reshape(4, 3, 16, 16)  # every pixel value in every channel
    out = normalise_pixels(x, *pixel_normalisation(mean, std, torch.device("cpu")))
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, expected, rtol=0, atol=2e-6)


def test_augmentation_moves_pixels_within_the_padding_and_flips():
    generator = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).reshape(2, 3, 8, 8)
    assert augment_batch(x, "crop", generator).shape == x.shape
    flipped = augment_batch(x, "flip", generator)
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(2)) for f, o in zip(flipped, x))
    shifted = augment_batch(x, "crop", generator, pad=1)
    assert set(shifted.unique().tolist()) <= set(x.unique().tolist()) | {0}


def window_of(image: np.ndarray, padded: np.ndarray, flips: tuple[bool, ...]) -> tuple[int, int, bool]:
    """The one (dy, dx, flipped) at which `image` is exactly a window of `padded`, its input padded by 2 each way."""
    h, w = image.shape[1:]
    windows = {(dy, dx): padded[:, dy : dy + h, dx : dx + w] for dy in range(5) for dx in range(5)}
    matches = [(dy, dx, flip) for (dy, dx), window in windows.items() for flip in flips
               if np.array_equal(image, window[:, :, ::-1] if flip else window)]
    assert len(matches) == 1, matches
    return matches[0]


@pytest.mark.parametrize("kind", ["translate", "flip_translate"])
def test_translation_shifts_each_image_by_up_to_two_pixels_over_its_reflected_border(kind):
    """airbench94's translation, checked against NumPy's reflect padding (the border mirrored, its edge not repeated)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (400, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=torch.channels_last)  # as the engine keeps the images
    out = augment_batch(x, kind, generator)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    flips = (False, True) if kind == "flip_translate" else (False,)
    moves = [window_of(image, pad, flips) for image, pad in zip(out.numpy(), padded)]
    assert {(dy, dx) for dy, dx, _ in moves} == {(dy, dx) for dy in range(5) for dx in range(5)}  # all 25 offsets
    assert {flip for _, _, flip in moves} == set(flips)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_the_training_loss_is_cross_entropy_with_the_label_smoothing_asked_for(smoothing):
    """0 is the plain loss bit for bit (the default trains as before); otherwise F.cross_entropy's smoothed loss, which
    is (1 - s) times the cross-entropy plus s times the mean over the classes of -log p, and its gradients."""
    data = synthetic_splits(train=32, val=10, test=10)
    engine = build_engine(TrainConfig.from_flat({"device": "cpu", "precision": "fp32", "label_smoothing": smoothing}), data.shape,
                          data.mean, data.std)
    twin = copy.deepcopy(engine.model)
    x, y = torch.from_numpy(data.train.x).contiguous(memory_format=torch.channels_last), torch.from_numpy(data.train.y)
    normalise = partial(normalise_pixels, scale=engine.scale, shift=engine.shift)
    logits = twin(normalise(x))
    reference = F.cross_entropy(logits, y, label_smoothing=smoothing) if smoothing else F.cross_entropy(logits, y)
    reference.backward()
    totals = EpochTotals(engine.device)
    train_step(engine.model, engine.optimizer, normalise, x, y, engine.autocast, totals, engine.config.label_smoothing)
    assert torch.equal(totals.loss / 32, reference.detach())
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(engine.model.parameters(), twin.parameters()))
    log_p = logits.detach().log_softmax(1)
    by_hand = (1 - smoothing) * F.nll_loss(log_p, y) - smoothing * log_p.mean(1).mean()
    assert reference.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert torch.equal(reference, F.cross_entropy(logits, y)) == (smoothing == 0)


def test_evaluation_reports_plain_cross_entropy_whatever_the_training_smoothing():
    data = synthetic_splits(train=64, val=50, test=10)
    engine = build_engine(TrainConfig.from_flat({"device": "cpu", "label_smoothing": 0.3}), data.shape, data.mean, data.std)
    engine.train_epoch(engine.put(data.train))
    val = engine.put(data.val)
    engine.model.eval()
    with torch.no_grad():
        plain = F.cross_entropy(engine.model(val.normalise(val.x)), val.y).item()
    assert engine.evaluate(val)["loss"] == pytest.approx(plain, rel=1e-5)


def test_a_per_step_schedule_sets_each_steps_rate_where_its_epoch_falls_in_the_run(monkeypatch):
    """100 images in batches of 32: 4 steps an epoch (the last short), 12 in the run. Epoch 2 is skipped, as a run
    resumed after it skips it: the rates of epoch 3 come from the epoch alone."""
    data = synthetic_splits(train=100, val=10, test=10)
    config = TrainConfig.from_flat({"device": "cpu", "batch_size": 32, "epochs": 3, "schedule": "triangular", "warmup": 0.25, "lr": 0.01})
    engine = build_engine(config, data.shape, data.mean, data.std)
    used, step = [], engine.optimizer.step
    monkeypatch.setattr(engine.optimizer, "step", lambda: (used.append(engine.optimizer.lr.item()), step()))  # the rate each step reads
    train = engine.put(data.train)
    for epoch in (1, 3):
        engine.start_epoch(epoch)
        engine.train_epoch(train)
        assert engine.optimizer.group["lr"] == used[-1]  # the epoch's reported rate: its last step's
    assert used == [step_lr("triangular", 0.01, 0.25, s, 12) for s in (0, 1, 2, 3, 8, 9, 10, 11)]
    assert used[:4] == pytest.approx([0.0, 0.01 / 3, 0.02 / 3, 0.01]) and used[-1] == pytest.approx(0.01 / 9)


def test_a_per_epoch_schedule_sets_no_rate_during_the_epoch(small_data, monkeypatch):
    engine = build_engine(TrainConfig.from_flat({"device": "cpu", "batch_size": 100, "schedule": "cosine", "epochs": 4}), small_data.shape,
                          small_data.mean, small_data.std)
    engine.start_epoch(3)
    monkeypatch.setattr(engine.optimizer, "set_lr", lambda lr: pytest.fail(f"set_lr({lr}) during the epoch"))
    engine.train_epoch(engine.put(small_data.train))
    assert engine.optimizer.group["lr"] == pytest.approx(0.0005)


def bf16_steps(settings: dict, weight_copies: bool, steps: int = 3, mode=None) -> tuple[list[torch.Tensor], float]:
    """`steps` bf16 training steps on the CPU, under autocast alone or with Bf16Weights and a bf16 input, as the
    CUDA graph's step runs them: the parameters after them and the summed loss."""
    data = synthetic_splits(train=32 * steps, val=10, test=10)
    engine = build_engine(TrainConfig.from_flat({"device": "cpu", "precision": "bf16", **settings}), data.shape, data.mean, data.std)
    forward = Bf16Weights(engine.model) if weight_copies else engine.model
    normalise = partial(normalise_pixels, scale=engine.scale, shift=engine.shift, dtype=torch.bfloat16 if weight_copies else None)
    x, y = torch.from_numpy(data.train.x).contiguous(memory_format=torch.channels_last), torch.from_numpy(data.train.y)
    totals = EpochTotals(engine.device)
    with mode or nullcontext():
        for start in range(0, len(y), 32):
            train_step(forward, engine.optimizer, normalise, x[start : start + 32], y[start : start + 32], engine.autocast, totals)
    return [p.detach().clone() for p in engine.model.parameters()], totals.loss.item()


@pytest.mark.parametrize("settings", [{}, {"batch_norm": True, "dropout": 0.3}])
def test_bf16_weight_copies_and_input_train_bit_for_bit_as_autocast_alone(settings):
    (plain, plain_loss), (copied, copied_loss) = (bf16_steps(settings, weight_copies) for weight_copies in (False, True))
    assert copied_loss == plain_loss and all(torch.equal(a, b) for a, b in zip(plain, copied))


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_bf16_weight_copies_replace_autocasts_casts_by_two_multi_tensor_copies():
    plain, copied = CountOps(), CountOps()
    bf16_steps({}, False, steps=1, mode=plain), bf16_steps({}, True, steps=1, mode=copied)
    # Autocast: 10 parameters there and back, the input, the logits there and back (23 with torch 2.14).
    assert plain.counts["_to_copy"] >= 21 and plain.counts["_foreach_copy_"] == 0
    assert copied.counts["_to_copy"] == 2 and copied.counts["_foreach_copy_"] == 2  # the logits to float32 for the loss, and back


def test_a_batch_gathers_straight_into_a_channels_last_buffer_as_indexing_gathers_it():
    """What StepGraph.step_at relies on: index_select into the graph's input keeps its layout and gathers as x[index]."""
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    out = torch.zeros((16, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    strides, pointer = out.stride(), out.data_ptr()
    index = torch.randperm(50)[:16]
    torch.index_select(x, 0, index, out=out)
    assert torch.equal(out, x[index]) and out.stride() == strides and out.data_ptr() == pointer


def test_a_step_graph_refers_to_nothing_that_holds_it(small_data):
    """An engine with its CUDA graph is freed as soon as it is dropped, with no garbage collection (a trial that reuses
    its process frees the last trial's graph memory at once): the graph holds the parts of the step, not the engine."""
    engine = build_engine(TrainConfig.from_flat({"device": "cpu"}), small_data.shape, small_data.mean, small_data.std)
    graph = StepGraph(engine.step, engine.optimizer, engine.autocast, engine.scale, engine.shift, (32, 3, 20, 20))
    engine = dataclasses.replace(engine, graph=graph)
    model, graph = weakref.ref(engine.model), weakref.ref(graph)
    gc.disable()
    try:
        del engine
        assert model() is None and graph() is None
    finally:
        gc.enable()


def reference_diagnostics(logits: np.ndarray, y: np.ndarray, previous: np.ndarray) -> dict:
    """The prediction diagnostics computed plainly, in float64 NumPy, from a split's logits: the definitions."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    confidence, right = p.max(1), p.argmax(1) == y
    loss = -np.log(p[np.arange(len(y)), y])
    bins = np.clip(np.ceil(confidence * 15).astype(int), 1, 15) - 1  # bin m holds ((m - 1) / 15, m / 15]
    in_bin = [bins == m for m in range(15)]
    return {
        "loss": loss.mean(), "acc": right.mean(), "loss_right": loss[right].mean(), "loss_wrong": loss[~right].mean(),
        "conf_right": confidence[right].mean(), "conf_wrong": confidence[~right].mean(),
        "ece": sum(abs(right[b].mean() - confidence[b].mean()) * b.mean() for b in in_bin if b.any()),
        "forgotten": (previous & ~right).sum(), "learned": (~previous & right).sum(),
        "calibration": [[b.sum(), confidence[b].mean(), right[b].mean()] if b.any() else [0, math.nan, math.nan] for b in in_bin],
        "right": right,
    }


def test_prediction_diagnostics_are_their_definitions_computed_plainly():
    data = synthetic_splits(train=64, val=400, test=10, seed=3)  # two steps an epoch: still learning
    data.val.y[:100] = (data.val.y[:100] + 1) % 4  # labels no model gets right, so that both groups always hold images
    engine = build_engine(TrainConfig.from_flat({"device": "cpu", "batch_size": 32, "eval_batch_size": 64, "lr": 2e-4}), data.shape, data.mean, data.std)
    train, val = engine.put(data.train), engine.put(data.val)
    previous, moved = np.zeros(len(val), dtype=bool), []  # before the first evaluation every image counts as wrong
    for _ in range(4):  # untrained, then after each of three epochs
        engine.model.eval()
        with torch.no_grad():
            logits = engine.model(val.normalise(val.x)).numpy()
        expected = reference_diagnostics(logits, data.val.y, previous)
        measured = engine.evaluate(val)
        assert 0 < measured["acc"] < 1  # both groups hold images
        for name in ("loss", "acc", "loss_right", "loss_wrong", "conf_right", "conf_wrong", "ece"):
            assert measured[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
        assert (measured["forgotten"], measured["learned"]) == (expected["forgotten"], expected["learned"])
        np.testing.assert_allclose(np.array(measured["calibration"], dtype=float), np.array(expected["calibration"], dtype=float),
                                   rtol=1e-5, atol=1e-6)
        # The identity the overfitting finding rests on, to rounding.
        identity = measured["acc"] * measured["loss_right"] + (1 - measured["acc"]) * measured["loss_wrong"]
        assert measured["loss"] == pytest.approx(identity, rel=1e-6)
        previous = expected["right"]
        moved.append(expected["forgotten"] + expected["learned"])
        engine.train_epoch(train)
    assert all(n > 0 for n in moved), moved  # every epoch moved some images: the counts were tested on real changes


def floating_state(model: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of a model's parameters and floating-point buffers (batch norm's running statistics), in float64."""
    return [t.detach().double().clone() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]


def test_the_weight_average_is_the_closed_form_of_the_raw_weights_after_each_step(monkeypatch):
    """After k steps, average = ema^k w_0 + (1 - ema) * sum over j of ema^(k - j) w_j, w_j the raw weights (and batch
    norm statistics) after step j; training runs on the raw weights, bit for bit as without the average, and
    evaluation runs the average. 106 images in batches of 32: three full steps and a short one an epoch."""
    data = synthetic_splits(train=106, val=50, test=10)
    settings = {"device": "cpu", "batch_size": 32, "batch_norm": True, "dropout": 0.2, "lr": 3e-3}
    ema = 0.8
    engine = build_engine(TrainConfig.from_flat({**settings, "ema": ema}), data.shape, data.mean, data.std)
    raw, step = [floating_state(engine.model)], engine.optimizer.step
    monkeypatch.setattr(engine.optimizer, "step", lambda: (step(), raw.append(floating_state(engine.model))))
    train = engine.put(data.train)
    losses = [engine.train_epoch(train) for _ in range(2)]
    k = len(raw) - 1
    assert k == 8
    closed_form = [ema**k * w0 + sum((1 - ema) * ema ** (k - j) * raw[j][i] for j in range(1, k + 1)) for i, w0 in enumerate(raw[0])]
    averaged = floating_state(engine.average.model)
    assert len(averaged) == len(closed_form) > len(list(engine.model.parameters()))  # the running statistics too
    for a, b in zip(averaged, closed_form):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    plain = build_engine(TrainConfig.from_flat(settings), data.shape, data.mean, data.std)
    assert plain.average is None and [plain.train_epoch(plain.put(data.train)) for _ in range(2)] == losses
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), engine.model.parameters()))
    val = engine.put(data.val)
    by_average, by_raw = evaluate(engine.average.model, val, 1000), evaluate(engine.model, val, 1000)
    assert engine.evaluate(val)["loss"] == by_average["loss"] != by_raw["loss"]


def shifted_views(x: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """airbench94's six views of TTA level 2, weighted: the images and their mirror images, a quarter each; the images
    shifted by one pixel down and right and up and left over NumPy's reflected border, and their mirror images, an
    eighth each."""
    h, w = x.shape[2:]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    views = [x, padded[:, :, :h, :w], padded[:, :, 2:, 2:]]
    return [(weight, image) for weight, view in zip((0.25, 0.125, 0.125), views) for image in (view, view[:, :, :, ::-1])]


@pytest.mark.parametrize("tta", ["none", "flip", "flip_translate"])
def test_test_time_augmentation_reports_the_diagnostics_of_the_averaged_logits(tta):
    """Against a plain reference: the model run on each view of the whole split at once, its logits averaged."""
    data = synthetic_splits(train=64, val=150, test=10, seed=2)
    data.val.y[:40] = (data.val.y[:40] + 1) % 4  # wrong answers, so that every diagnostic has images
    engine = build_engine(TrainConfig.from_flat({"device": "cpu", "batch_size": 32, "eval_batch_size": 64, "tta": tta}), data.shape,
                          data.mean, data.std)
    engine.train_epoch(engine.put(data.train))
    val = engine.put(data.val)
    views = {"none": [(1.0, data.val.x)], "flip": [(0.5, data.val.x), (0.5, data.val.x[:, :, :, ::-1])], "flip_translate": shifted_views(data.val.x)}[tta]
    engine.model.eval()
    with torch.no_grad():
        logits = sum(weight * engine.model(val.normalise(torch.from_numpy(view.copy()))).double() for weight, view in views)
    expected = reference_diagnostics(logits.numpy(), data.val.y, np.zeros(len(val), dtype=bool))
    measured = engine.evaluate(val)
    for name in ("loss", "acc", "loss_right", "loss_wrong", "conf_right", "conf_wrong", "ece"):
        assert measured[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    assert measured["learned"] == expected["learned"] and 0 < measured["acc"] < 1
    if tta != "none":
        assert measured["loss"] != evaluate(engine.model, val, 64)["loss"]  # the views changed the prediction


# --- On a CUDA GPU (the device machine; skipped elsewhere) ------------------------------------------------


def correlated_images(n: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 NCHW images whose neighbouring pixels and channels are correlated, as a photograph's are: noise summed
    over 4x4 windows, plus a part shared by every channel."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(n, channels + 1, size + 3, size + 3))
    smooth = sum(noise[:, :, dy : dy + size, dx : dx + size] for dy in range(4) for dx in range(4))
    x = smooth[:, :channels] + smooth[:, channels:]
    return np.clip(128 + 12 * x, 0, 255).astype(np.uint8)


def patch_covariance(x: np.ndarray, k: int) -> np.ndarray:
    """The covariance (about zero) of every k x k patch of float NCHW images, each patch's values in (c, kh, kw) order."""
    n, c, h, w = x.shape
    windows = np.stack([x[:, :, i : i + h - k + 1, j : j + w - k + 1] for i in range(k) for j in range(k)], 2)
    patches = windows.reshape(n, c * k * k, -1).transpose(0, 2, 1).reshape(-1, c * k * k)
    return patches.T @ patches / len(patches)


@pytest.mark.parametrize("model, channels, filters, whitened", [("seed_cnn", 3, 32, 32), ("seed_cnn", 1, 32, 18), ("fast_resnet", 3, 24, 24)])
def test_whiten_sets_the_first_filters_to_opposite_pairs_that_whiten_the_training_patches(model, channels, filters, whitened):
    """Pair i's filter v has v C v^T = lambda_i / (lambda_i + eps), C the normalised patches' covariance (computed
    plainly here) and lambda_i its i-th largest eigenvalue; distinct pairs are uncorrelated; filters beyond twice a
    patch's values keep the same seed's initialisation."""
    images = correlated_images(200, channels, 20)
    mean, std = channel_statistics(images)
    settings = {"device": "cpu", "model": model, **({"width_multiplier": 0.25} if model == "fast_resnet" else {})}
    shape = InputShape(channels, 20, 20, 10)
    plain = build_engine(TrainConfig.from_flat(settings), shape, mean, std)
    engine = build_engine(TrainConfig.from_flat({**settings, "whiten": True}), shape, mean, std, train_images=images)
    weight = next(m for m in engine.model.modules() if isinstance(m, torch.nn.Conv2d)).weight
    assert weight.shape[0] == filters and not weight.requires_grad
    normalised = (images / 255 - np.array(mean).reshape(1, -1, 1, 1)) / np.array(std).reshape(1, -1, 1, 1)
    covariance = patch_covariance(normalised, weight.shape[-1])
    eigenvalues = np.linalg.eigvalsh(covariance)[::-1][: whitened // 2]
    v = weight.detach().double().numpy().reshape(filters, -1)
    np.testing.assert_allclose(v[1:whitened:2], -v[0:whitened:2], rtol=0, atol=0)
    np.testing.assert_allclose(v[0:whitened:2] @ covariance @ v[0:whitened:2].T, np.diag(eigenvalues / (eigenvalues + WHITEN_EPS)),
                               rtol=0, atol=1e-4)
    plain_weight = next(m for m in plain.model.modules() if isinstance(m, torch.nn.Conv2d)).weight
    assert torch.equal(weight[whitened:], plain_weight[whitened:])


def test_whitened_filters_stay_fixed_while_everything_else_trains():
    data = synthetic_splits(train=120, val=20, test=20)
    config = TrainConfig.from_flat({"device": "cpu", "batch_size": 40, "whiten": True, "optimizer": "nesterov", "lr": 0.05,
                                    "weight_decay": 5e-4})
    engine = build_engine(config, data.shape, data.mean, data.std, train_images=data.train.x)
    before = dict((name, p.detach().clone()) for name, p in engine.model.named_parameters())
    engine.train_epoch(engine.put(data.train))
    first = next(name for name, m in engine.model.named_modules() if isinstance(m, torch.nn.Conv2d))
    changed = {name for name, p in engine.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(before) - {f"{first}.weight"} and f"{first}.bias" in changed
    with pytest.raises(ValueError, match="train_images"):
        build_engine(config, data.shape, data.mean, data.std)


@CUDA
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_replays_every_full_batch_after_warm_up(small_data, compile):
    """With compile, the graph holds torch.compile's fused kernels: the short last batch recompiles, outside it."""
    config = TrainConfig.from_flat({"batch_size": 64, "device": "cuda", "cuda_graph": True, "dropout": 0.3, "compile": compile})
    engine = build_engine(config, small_data.shape, small_data.mean, small_data.std)
    data = engine.put(small_data.train)
    losses = [engine.train_epoch(data)[0] for _ in range(4)]
    assert engine.graph.eager_steps == 3 and engine.graph.replays == 4 * 9 - 3
    assert losses[-1] < losses[0] / 2  # bf16 with dropout in the graph still learns
    assert not torch.backends.cudnn.benchmark  # cuDNN's heuristics: timing its algorithms cost more than it saved


@CUDA
@pytest.mark.parametrize("settings", [{}, {"batch_norm": True}])
def test_the_bf16_cuda_graph_runs_on_weight_copies_and_trains_as_the_eager_engine(small_data, settings):
    """Without dropout, whose masks the graph draws from other offsets of the generator than eager steps do. Dropout
    on the weight copies: test_cuda_graph_replays_every_full_batch_after_warm_up, and bit for bit on the CPU."""
    base = {"batch_size": 64, "device": "cuda", "precision": "bf16", **settings}
    runs = []
    for graph in (False, True):
        engine = build_engine(TrainConfig.from_flat({**base, "cuda_graph": graph}), small_data.shape, small_data.mean, small_data.std)
        data = engine.put(small_data.train)
        runs.append([engine.train_epoch(data) for _ in range(3)])
    assert isinstance(engine.graph.forward, Bf16Weights) and engine.graph.replays == 3 * 9 - 3
    for (loss_a, acc_a), (loss_b, acc_b) in zip(*runs):
        assert loss_b == pytest.approx(loss_a, rel=2e-2) and abs(acc_a - acc_b) <= 0.03
    assert runs[1][-1][0] < runs[1][0][0] / 2


@CUDA
def test_a_learning_rate_set_between_epochs_reaches_the_cuda_graphs_captured_step(small_data):
    """The graph's optimizer step reads the learning rate from a tensor: the rate set after capture is the one used."""
    runs = []
    for graph in (False, True):
        engine = build_engine(TrainConfig.from_flat({"batch_size": 64, "device": "cuda", "cuda_graph": graph, "precision": "fp32"}),
                              small_data.shape, small_data.mean, small_data.std)
        data = engine.put(small_data.train)
        losses = []
        for lr in (1e-3, 1e-2, 0.0):
            engine.optimizer.set_lr(lr)
            losses.append(engine.train_epoch(data)[0])
        frozen = [p.detach().clone() for p in engine.model.parameters()]
        engine.train_epoch(data)  # at lr 0 the steps leave the weights as they are
        assert all(torch.equal(a, b) for a, b in zip(frozen, engine.model.parameters()))
        runs.append(losses)
    assert runs[1] == pytest.approx(runs[0], rel=2e-2)


@CUDA
def test_per_step_rates_label_smoothing_and_translation_reach_the_cuda_graphs_captured_step(small_data):
    """Each step's rate is filled into the tensor the captured step reads, outside the capture: the graph trains as
    the eager engine does, step for step."""
    base = {"batch_size": 64, "device": "cuda", "precision": "fp32", "epochs": 3, "schedule": "onecycle", "warmup": 0.3,
            "label_smoothing": 0.1, "augment": "flip_translate", "optimizer": "nesterov", "lr": 0.05}
    runs = []
    for graph in (False, True):
        engine = build_engine(TrainConfig.from_flat({**base, "cuda_graph": graph}), small_data.shape, small_data.mean, small_data.std)
        data = engine.put(small_data.train)
        losses = []
        for epoch in (1, 2, 3):
            engine.start_epoch(epoch)
            losses.append(engine.train_epoch(data)[0])
        runs.append(losses)
    assert engine.graph.replays == 3 * 9 - 3 and engine.optimizer.group["lr"] == pytest.approx(0.05 / 25 / 1e4)
    assert runs[1] == pytest.approx(runs[0], rel=2e-2) and runs[1][-1] < runs[1][0]


@CUDA
@pytest.mark.parametrize("settings", [{"precision": "fp32"}, {"compile": True}])
def test_the_cuda_graph_keeps_the_model_itself_in_fp32_or_compiled(small_data, settings):
    config = TrainConfig.from_flat({"batch_size": 64, "device": "cuda", "cuda_graph": True, **settings})
    engine = build_engine(config, small_data.shape, small_data.mean, small_data.std)
    assert engine.graph.forward is engine.step


@CUDA
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_batches_gathered_into_the_cuda_graph_train_bit_for_bit_as_copied_in(small_data, precision, monkeypatch):
    """With cuDNN's deterministic algorithms: its default fp32 ones made two runs of the same graph differ in the
    fifth digit of the loss on an H100."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    config = TrainConfig.from_flat({"batch_size": 64, "device": "cuda", "cuda_graph": True, "precision": precision, "dropout": 0.3})

    def copied_in(graph: StepGraph, data, index):
        graph.step(data.x[index], data.y[index])

    runs = []
    for step_at in (StepGraph.step_at, copied_in):
        monkeypatch.setattr(StepGraph, "step_at", step_at)
        engine = build_engine(config, small_data.shape, small_data.mean, small_data.std)
        data = engine.put(small_data.train)
        runs.append([engine.train_epoch(data) for _ in range(3)])
        assert engine.graph.replays == 3 * 9 - 3
    assert runs[0] == runs[1]  # the same batches into the same captured step


@CUDA
def test_the_cuda_graphs_replays_update_the_weight_average(small_data):
    """The average's update is captured with the step: after three eager warm-up steps, the capture (replayed at once)
    and four more replays, the average is the closed form of the raw weights after each of the eight steps."""
    ema = 0.9
    engine = build_engine(TrainConfig.from_flat({"batch_size": 64, "device": "cuda", "precision": "fp32", "batch_norm": True, "ema": ema}),
                          small_data.shape, small_data.mean, small_data.std)
    data = engine.put(small_data.train)
    raw = [floating_state(engine.model)]
    for start in range(0, 8 * 64, 64):
        engine.graph.step(data.x[start : start + 64], data.y[start : start + 64])
        raw.append(floating_state(engine.model))
    assert engine.graph.eager_steps == 3 and engine.graph.replays == 5
    closed_form = [ema**8 * w0 + sum((1 - ema) * ema ** (8 - j) * raw[j][i] for j in range(1, 9)) for i, w0 in enumerate(raw[0])]
    for a, b in zip(floating_state(engine.average.model), closed_form):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
