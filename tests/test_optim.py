import io
import subprocess
import sys

import pytest
import torch

from tune_cnn.config import InputShape, ModelConfig, TrainConfig
from tune_cnn.engine import make_optimizer, optimizer_settings
from tune_cnn.models import build_model
from tune_cnn.optim import FusedAdamW, FusedSGD, per_step, scheduled_lr, step_lr

from conftest import CUDA, ROOT

SHAPE = InputShape(channels=3, height=20, width=20, classes=4)
SETTINGS = {
    "adam": {"optimizer": "adam", "lr": 3e-3, "weight_decay": 0.05},
    "sgd": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "sgd, no momentum": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0},
    "nesterov": {"optimizer": "nesterov", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
}


DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def twin_models(device: str = "cpu") -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two copies of a small seed-style model with the same weights, in channels_last as the engine keeps them."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(batch_norm=True), SHAPE).to(device, memory_format=torch.channels_last)
    twin = build_model(ModelConfig(batch_norm=True), SHAPE).to(device, memory_format=torch.channels_last)
    twin.load_state_dict(model.state_dict())
    return model, twin


def torch_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """torch.optim's fused optimizer as the engine's stands in for it (capturable AdamW on CUDA)."""
    if config.optimizer != "adam":
        return torch.optim.SGD(model.parameters(), **optimizer_settings(config), fused=True)
    capturable = next(model.parameters()).is_cuda
    return torch.optim.AdamW(model.parameters(), **optimizer_settings(config), fused=True, capturable=capturable)


def train_steps(model: torch.nn.Module, optimizer, steps: int, seed: int, skip_head_at: int | None = None) -> None:
    """`steps` steps on fixed random batches; at step `skip_head_at` the last layer gets no gradient."""
    generator = torch.Generator().manual_seed(seed)
    head, device = list(model.parameters())[-2:], next(model.parameters()).device
    for step in range(steps):
        x = torch.randn(8, 3, 20, 20, generator=generator).to(device, memory_format=torch.channels_last)
        y = torch.randint(0, 4, (8,), generator=generator).to(device)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if step == skip_head_at:
            for p in head:
                p.grad = None
        optimizer.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SETTINGS))
def test_steps_are_bit_for_bit_torch_optims(name, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # so that only the optimizers can differ
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    config = TrainConfig.from_flat(SETTINGS[name])
    ours, theirs = twin_models(device)
    train_steps(ours, make_optimizer(config, ours), steps=6, seed=1, skip_head_at=2)
    train_steps(theirs, torch_optimizer(config, theirs), steps=6, seed=1, skip_head_at=2)
    for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), key
    assert not torch.equal(next(ours.parameters()), next(twin_models(device)[0].parameters())), "the steps changed nothing"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["adam", "sgd", "nesterov"])
def test_a_new_learning_rate_steps_as_torch_optims_with_its_group_changed(name, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    config = TrainConfig.from_flat(SETTINGS[name])
    (ours, theirs), lr = twin_models(device), config.lr / 7
    ours_optimizer, theirs_optimizer = make_optimizer(config, ours), torch_optimizer(config, theirs)
    for model, optimizer in ((ours, ours_optimizer), (theirs, theirs_optimizer)):
        train_steps(model, optimizer, steps=2, seed=1)
    ours_optimizer.set_lr(lr)
    theirs_optimizer.param_groups[0]["lr"] = lr
    for model, optimizer in ((ours, ours_optimizer), (theirs, theirs_optimizer)):
        train_steps(model, optimizer, steps=2, seed=2)
    for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), key
    assert ours_optimizer.state_dict()["param_groups"][0]["lr"] == lr


def saved_and_loaded(state: dict) -> dict:
    """Through torch.save and torch.load(weights_only=True), as a checkpoint goes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("direction", ["ours to torch.optim", "torch.optim to ours"])
def test_a_checkpoint_moves_between_ours_and_torch_optim_and_training_goes_on_the_same(name, direction):
    config = TrainConfig.from_flat(SETTINGS[name])
    first, second = twin_models()
    make_first, make_second = (make_optimizer, torch_optimizer) if direction == "ours to torch.optim" else (torch_optimizer, make_optimizer)
    optimizer = make_first(config, first)
    train_steps(first, optimizer, steps=3, seed=2)
    second.load_state_dict(first.state_dict())
    moved = make_second(config, second)
    moved.load_state_dict(saved_and_loaded(optimizer.state_dict()))
    train_steps(first, optimizer, steps=3, seed=3)
    train_steps(second, moved, steps=3, seed=3)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key


def test_a_state_for_another_model_is_refused():
    small, _ = twin_models()
    optimizer = FusedAdamW(small.parameters(), lr=1e-3, eps=1e-7, weight_decay=0.0)
    other = FusedSGD(list(small.parameters())[:2], lr=0.1, momentum=0.9, weight_decay=0.0)
    with pytest.raises(ValueError, match="for 2 parameters, this model has"):
        optimizer.load_state_dict(other.state_dict())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_never_imports_torch_dynamo(optimizer):
    """The reason for tune_cnn.optim: torch.optim.Optimizer imports torch._dynamo (about a second) on first use."""
    code = ("import sys; sys.path.insert(0, 'tests'); from conftest import synthetic_splits; "
            "from tune_cnn.config import TrainConfig; from tune_cnn.train import train; "
            f"train(TrainConfig.from_flat({{'epochs': 2, 'optimizer': {optimizer!r}}}), synthetic_splits(100, 20, 20), "
            "lambda metrics, folder: None); print('torch._dynamo' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_nesterov_is_torch_optims_sgd_with_nesterov_momentum():
    """The group says so, as a checkpoint keeps it; that its steps are torch's: test_steps_are_bit_for_bit_torch_optims."""
    model, _ = twin_models()
    group = make_optimizer(TrainConfig.from_flat(SETTINGS["nesterov"]), model).state_dict()["param_groups"][0]
    assert (group["nesterov"], group["momentum"], group["dampening"], group["fused"]) == (True, 0.9, 0.0, True)
    plain = make_optimizer(TrainConfig.from_flat(SETTINGS["sgd"]), model).state_dict()["param_groups"][0]
    assert plain["nesterov"] is False


def test_triangular_and_warm_up_schedules_are_the_hand_computed_rates():
    """10 steps, warm-up 0.2: up over steps 0..2, then down by lr / 8 a step, to reach 0 at step 10, one past the last."""
    assert [step_lr("triangular", 0.4, 0.2, step, 10) for step in range(10)] == pytest.approx(
        [0.0, 0.2, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05], abs=1e-15)
    assert [step_lr("triangular", 0.4, 0.0, step, 4) for step in range(4)] == pytest.approx([0.4, 0.3, 0.2, 0.1], abs=1e-15)
    assert [step_lr("constant", 0.4, 0.25, step, 12) for step in range(12)] == pytest.approx([0.0, 0.4 / 3, 0.8 / 3] + [0.4] * 9, abs=1e-15)
    assert step_lr("triangular", 0.4, 0.3, 3, 100) == pytest.approx(0.4 * 3 / 30)  # a warm-up that ends between steps
    assert step_lr("triangular", 0.4, 0.3, 50, 100) == pytest.approx(0.4 * 50 / 70)


@pytest.mark.parametrize("warmup, steps", [(0.3, 50), (0.25, 37), (0.1, 23), (0.0, 20), (0.5, 7)])
def test_onecycle_is_torchs_one_cycle_lr_step_by_step(warmup, steps):
    lr = 0.08
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=warmup, anneal_strategy="cos",
                                                   cycle_momentum=False)
    theirs = []
    for _ in range(steps):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    ours = [step_lr("onecycle", lr, warmup, step, steps) for step in range(steps)]
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-18)
    assert ours[0] == pytest.approx(lr / 25 if warmup else lr, rel=0.01) and ours[-1] == pytest.approx(lr / 25 / 1e4)


def test_onecycle_peaks_at_the_first_step_where_torchs_divides_zero_by_zero():
    """A warm-up of one step (pct_start * total_steps == 1): OneCycleLR raises ZeroDivisionError; here the run starts at its peak."""
    assert step_lr("onecycle", 0.08, 0.05, 0, 20) == pytest.approx(0.08)
    assert step_lr("onecycle", 0.08, 0.05, 19, 20) == pytest.approx(0.08 / 25 / 1e4)


def test_which_schedules_set_the_rate_every_step():
    assert [per_step(s, 0.0) for s in ("constant", "cosine", "triangular", "onecycle")] == [False, False, True, True]
    assert per_step("constant", 0.1)
    assert [scheduled_lr("constant", 0.1, e, 4) for e in (1, 4)] == [0.1, 0.1]  # the per-epoch schedules, as they were
