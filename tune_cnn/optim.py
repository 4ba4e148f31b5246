"""The engine's optimizers: torch's fused AdamW and SGD kernels, called without torch.optim.Optimizer, whose first
use imports torch._dynamo, most of a trial's start-up (benchmarks/README.md).

The update here is the functional call that torch.optim.AdamW(fused=True) and SGD(fused=True) make themselves,
so the numbers are bit for bit theirs, and state_dict() has torch.optim's layout, so a checkpoint loads into
either (tests/test_optim.py). Fused kernels: one launch per step for all parameters on CUDA, and faster than
foreach on the CPU. Their hyperparameters are torch.optim's defaults except where the config sets them. The
learning rate is a tensor on the parameters' device, so that a step captured in a CUDA graph reads the value that
the schedule set last (a float would be frozen into the graph), and a schedule may set it every step.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

ParamState = dict[str, Any]
# The rest of a torch.optim param group, so that torch.optim reads a saved group as the update made here.
TORCH_FLAGS = {"maximize": False, "foreach": None, "differentiable": False, "fused": True}


def scheduled_lr(schedule: str, lr: float, epoch: int, epochs: int) -> float:
    """The learning rate for `epoch` (from 1) of `epochs`: `lr` throughout, or annealed from `lr` towards 0 on a half
    cosine, one value per epoch, since a rate that ends small settles the weights where a constant one keeps them moving."""
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))
    return lr


def per_step(schedule: str, warmup: float) -> bool:
    """Whether the learning rate changes at every optimizer step (step_lr) rather than once an epoch (scheduled_lr)."""
    return schedule in ("triangular", "onecycle") or warmup > 0


def step_lr(schedule: str, lr: float, warmup: float, step: int, steps: int) -> float:
    """The learning rate of optimizer step `step` (from 0) of a run's `steps`, for a per-step schedule:

    - constant with `warmup`: rising linearly from 0 over the first warmup * steps steps, then `lr`;
    - triangular: rising so (from `lr` at once with no warm-up), then falling linearly to reach 0 as the run ends:
      the piecewise-linear schedule of David Page's and airbench's CIFAR-10 runs read at the start of each step, so
      the first step of a warm-up runs at 0 and the last step at lr / (steps - warmup * steps);
    - onecycle: onecycle_lr, torch's OneCycleLR with pct_start `warmup` (0: no rising phase, only the cosine fall
      from `lr`; torch's own default would be 0.3, but warmup means the same for every schedule).

    Per step because a run of few epochs has too few of them to warm up or anneal in: a large rate at the first steps
    throws an untrained network off course, and one that ends small settles the weights.
    """
    rise = warmup * steps
    if schedule == "onecycle":
        return onecycle_lr(lr, rise - 1, step, steps)
    warm = min(1.0, step / rise) if rise else 1.0
    fall = (steps - step) / (steps - rise) if schedule == "triangular" else 1.0
    return lr * min(warm, fall)


def onecycle_lr(lr: float, peak: float, step: int, steps: int) -> float:
    """torch.optim.lr_scheduler.OneCycleLR's rate at `step` of `steps`, in its arithmetic (cosine annealing, max_lr `lr`,
    its default div_factor 25 and final_div_factor 1e4, no momentum cycling): from lr / 25 up to `lr` at step `peak`
    (pct_start * steps - 1), then down to lr / 25 / 1e4 at the last step; computed here, as a torch.optim scheduler
    would import torch._dynamo. With no warm-up (peak -1) it only falls. Where OneCycleLR divides 0 by 0 (a peak at
    step 0), this is the peak."""
    initial = lr / 25.0
    if step < peak:
        return _annealing_cos(initial, lr, step / peak)
    return _annealing_cos(lr, initial / 1e4, (step - peak) / (steps - 1 - peak))


def _annealing_cos(start: float, end: float, pct: float) -> float:
    """From `start` to `end` on a half cosine as `pct` goes from 0 to 1, as OneCycleLR computes it."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


class FusedOptimizer:
    """What both optimizers share: their parameters, one group of hyperparameters, a state per parameter."""

    def __init__(self, params: Iterable[torch.nn.Parameter], group: dict[str, Any], new_state: Callable[[torch.Tensor], ParamState]):
        self.params = list(params)
        self.group = group
        self.state = [new_state(p) for p in self.params]
        device = self.params[0].device  # the CPU's fused kernels read the rate as a double, CUDA's as a float
        self.lr = torch.tensor(group["lr"], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)

    def set_lr(self, lr: float) -> None:
        """The learning rate of the steps that follow (outside a CUDA graph's capture)."""
        self.group["lr"] = lr
        self.lr.fill_(lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def stepped(self) -> list[int]:
        """The parameters that have a gradient: torch.optim leaves the others, and their state, alone."""
        return [i for i, p in enumerate(self.params) if p.grad is not None]

    def column(self, name: str, indices: list[int]) -> list[Any]:
        return [self.state[i][name] for i in indices]

    def state_dict(self) -> dict[str, Any]:
        return {"state": dict(enumerate(self.state)), "param_groups": [{**self.group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Copy a state (ours or torch.optim's, for the same parameters) in place; the hyperparameters stay."""
        count = sum(len(group["params"]) for group in saved["param_groups"])
        if count != len(self.params):
            raise ValueError(f"the saved optimizer state is for {count} parameters, this model has {len(self.params)}")
        for index, values in saved["state"].items():
            param, state = self.params[int(index)], self.state[int(index)]
            for name, value in values.items():
                if name in state and value is not None:
                    state[name] = state[name].copy_(value) if state[name] is not None else value.to(param, copy=True)


class FusedAdamW(FusedOptimizer):
    """AdamW. Its state exists from the start (torch.optim makes it at the first step), on the parameters'
    device, step counts included: a step can be captured in a CUDA graph once `capturable` is set."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, eps: float, weight_decay: float, capturable: bool = False):
        group = {"lr": lr, "betas": (0.9, 0.999), "eps": eps, "weight_decay": weight_decay, "capturable": capturable,
                 **TORCH_FLAGS, "amsgrad": False, "decoupled_weight_decay": True}
        super().__init__(params, group, self.new_state)

    @staticmethod
    def new_state(param: torch.Tensor) -> ParamState:
        return {"step": torch.zeros((), dtype=torch.float32, device=param.device),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}

    @torch.no_grad()
    def step(self) -> None:
        live, group = self.stepped(), self.group
        adamw([self.params[i] for i in live], [self.params[i].grad for i in live], self.column("exp_avg", live),
              self.column("exp_avg_sq", live), [], self.column("step", live), fused=True, capturable=group["capturable"],
              amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1], lr=self.lr,
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


class FusedSGD(FusedOptimizer):
    """SGD with momentum (Nesterov's with `nesterov`) and (coupled, L2) weight decay, as torch.optim.SGD; its
    momentum buffers are made at the first step, as torch's are."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float, nesterov: bool = False):
        group = {"lr": lr, "momentum": momentum, "dampening": 0.0, "weight_decay": weight_decay, "nesterov": nesterov, **TORCH_FLAGS}
        super().__init__(params, group, lambda param: {"momentum_buffer": None})

    @torch.no_grad()
    def step(self) -> None:
        live, group = self.stepped(), self.group
        buffers = self.column("momentum_buffer", live)
        sgd([self.params[i] for i in live], [self.params[i].grad for i in live], buffers, fused=True,
            weight_decay=group["weight_decay"], momentum=group["momentum"], lr=self.lr, dampening=group["dampening"],
            nesterov=group["nesterov"], maximize=False)
        for i, buffer in zip(live, buffers):  # sgd() fills in the buffers it made
            self.state[i]["momentum_buffer"] = buffer
