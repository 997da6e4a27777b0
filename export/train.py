"""Train a task's network: Adam, global-norm clipping, a plateau schedule and early stopping on the
validation metric, seeded, with a progress bar; checkpoints in safetensors (never a pickle)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from export.config import ConfigError, ModelSpec, TrainSpec
from export.nets import TaskNet
from export.tasks import Task, better, load_task


@dataclass
class TrainResult:
    net: TaskNet
    spec: ModelSpec
    train: TrainSpec
    history: list[dict[str, float]] = field(default_factory=list)
    best: float = math.nan
    seconds: float = 0.0


def plateau_schedule(
    optimiser: torch.optim.Optimizer, task: Task, config: TrainSpec
) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """Lower the learning rate when the validation metric stops improving, in the metric's own direction.
    (A maximised metric negated for a minimising schedule is wrong: the schedule's relative threshold then
    counts a tie as an improvement, and the rate never drops on a plateau of accuracy.)"""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser,
        mode="min" if task.lower_is_better else "max",
        factor=config.lr_factor,
        patience=config.lr_patience,
    )


def train(task: Task, spec: ModelSpec, config: TrainSpec, *, progress: bool = True) -> TrainResult:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    torch.set_num_threads(config.torch_threads)
    net = task.build_net(spec)
    optimiser = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    schedule = plateau_schedule(optimiser, task, config)
    result = TrainResult(net, spec, config)
    best_weights: dict[str, torch.Tensor] | None = None
    stale = 0
    started = time.perf_counter()
    bar = tqdm(range(1, config.steps + 1), desc=f"train {task.name} {spec.cell}", unit="step", disable=not progress)
    for step in bar:
        net.train()
        loss = task.train_loss(net, step - 1, config.batch_size, config.bptt, rng)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(net.parameters(), config.clip_norm)
        optimiser.step()
        train_loss = loss.item()
        bar.set_postfix(loss=f"{train_loss:.3f}")
        if step % config.eval_every and step != config.steps:
            continue
        net.eval()
        metric = task.validate(net)
        schedule.step(metric)
        result.history.append(
            {
                "step": step,
                "train_loss": train_loss,
                f"validation_{task.metric}": metric,
                "lr": optimiser.param_groups[0]["lr"],
            }
        )
        bar.write(f"step {step}: train loss {train_loss:.4f}, validation {task.metric} {metric:.4f}")
        if math.isnan(result.best) or better(task, metric, result.best):
            result.best, stale = metric, 0
            best_weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            stale += 1
            if stale >= config.early_stop_patience:
                bar.write(f"early stop at step {step}: no better validation {task.metric} in {stale} evaluations")
                break
    if best_weights is not None:
        net.load_state_dict(best_weights)
    net.eval()
    result.seconds = time.perf_counter() - started
    return result


def save_checkpoint(path: Path, result: TrainResult, task: Task) -> None:
    """Weights and buffers as safetensors; the specs, the history and the task name as JSON metadata."""
    metadata = {
        "task": task.name,
        "model": result.spec.model_dump_json(),
        "train": result.train.model_dump_json(),
        "history": json.dumps(result.history),
        "best": json.dumps(result.best),
        "seconds": json.dumps(result.seconds),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in result.net.state_dict().items()}, str(path), metadata=metadata)


def load_checkpoint(path: Path, task: Task | None = None) -> tuple[TrainResult, Task]:
    """Rebuild the network (and its task's data, unless given) from a checkpoint; loads no code."""
    with safe_open(str(path), framework="pt") as handle:
        metadata: dict[str, Any] = handle.metadata()
    spec = ModelSpec.model_validate_json(metadata["model"])
    task = task or load_task(metadata["task"])
    net = task.build_net(spec)
    try:
        net.load_state_dict(load_file(str(path)))
    except RuntimeError as err:  # tensors missing or extra: the network has changed since it was saved
        raise ConfigError(f"{path} was saved by an older network ({err}); train it again") from err
    result = TrainResult(
        net.eval(),
        spec,
        TrainSpec.model_validate_json(metadata["train"]),
        json.loads(metadata["history"]),
        json.loads(metadata["best"]),
        json.loads(metadata["seconds"]),
    )
    return result, task
