"""Train the character language model with truncated backpropagation through time.

The training text is cut into `batch_size` contiguous streams; each update sees the next `bptt` characters
of every stream and carries the hidden state over from the previous window, as the served model carries
it from step to step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from export.data import CharCorpus
from export.nets import CharLMConfig, CharLSTM


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; every field is recorded in the published manifest."""

    seed: int = 1234
    steps: int = 2500
    batch_size: int = 64
    bptt: int = 128
    learning_rate: float = 3e-3
    clip_norm: float = 1.0
    eval_every: int = 250
    # Plateau schedule and early stopping both watch validation loss.
    lr_patience: int = 2
    lr_factor: float = 0.5
    early_stop_patience: int = 4
    torch_threads: int = 2


@dataclass
class TrainResult:
    net: CharLSTM
    history: list[dict[str, float]] = field(default_factory=list)
    validation_perplexity: float = math.nan
    seconds: float = 0.0


def _streams(ids: np.ndarray, batch: int) -> torch.Tensor:
    length = len(ids) // batch
    return torch.from_numpy(ids[: length * batch].reshape(batch, length))


@torch.no_grad()
def perplexity(net: CharLSTM, ids: np.ndarray, batch: int = 16, bptt: int = 256) -> float:
    """exp(mean next-character NLL) over `ids`, streamed window by window with the state carried."""
    net.eval()
    streams = _streams(ids, batch)
    vocab = net.config.vocab_size
    state = net.zero_state(batch)
    total, count = 0.0, 0
    for start in range(0, streams.shape[1] - 1, bptt):
        chunk = streams[:, start : start + bptt + 1]
        x = F.one_hot(chunk[:, :-1], vocab).float()
        logits, state = net(x, state)
        loss = F.cross_entropy(logits.reshape(-1, vocab), chunk[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def train_charlm(corpus: CharCorpus, model: CharLMConfig, config: TrainConfig) -> TrainResult:
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    torch.set_num_threads(config.torch_threads)
    net = CharLSTM(model)
    optimiser = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, factor=config.lr_factor, patience=config.lr_patience
    )
    streams = _streams(corpus.train, config.batch_size)
    windows = (streams.shape[1] - 1) // config.bptt
    vocab = model.vocab_size
    result = TrainResult(net)
    best, best_state, stale = math.inf, None, 0
    state = net.zero_state(config.batch_size)
    started = time.perf_counter()
    progress = tqdm(range(1, config.steps + 1), desc="train charlm", unit="step")
    for step in progress:
        net.train()
        start = ((step - 1) % windows) * config.bptt
        if start == 0:
            state = net.zero_state(config.batch_size)
        chunk = streams[:, start : start + config.bptt + 1]
        logits, state = net(F.one_hot(chunk[:, :-1], vocab).float(), state)
        state = (state[0].detach(), state[1].detach())
        loss = F.cross_entropy(logits.reshape(-1, vocab), chunk[:, 1:].reshape(-1))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(net.parameters(), config.clip_norm)
        optimiser.step()
        train_loss = loss.item()
        progress.set_postfix(loss=f"{train_loss:.3f}")
        if step % config.eval_every == 0 or step == config.steps:
            val = perplexity(net, corpus.validation)
            schedule.step(math.log(val))
            result.history.append(
                {
                    "step": step,
                    "train_loss": train_loss,
                    "validation_perplexity": val,
                    "lr": optimiser.param_groups[0]["lr"],
                }
            )
            progress.write(f"step {step}: train loss {train_loss:.3f}, validation perplexity {val:.3f}")
            if val < best:
                best, stale = val, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                stale += 1
                if stale >= config.early_stop_patience:
                    progress.write(f"early stop at step {step}: no improvement in {stale} evaluations")
                    break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    result.validation_perplexity = best
    result.seconds = time.perf_counter() - started
    return result


def save_checkpoint(path: Path, net: CharLSTM, train: TrainConfig) -> None:
    """safetensors weights with the configs as JSON metadata: loading it never runs code."""
    metadata = {"model": json.dumps(net.config.to_dict()), "train": json.dumps(asdict(train))}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=metadata)


def load_checkpoint(path: Path) -> CharLSTM:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    net = CharLSTM(CharLMConfig(**json.loads(metadata["model"])))
    net.load_state_dict(load_file(str(path)))
    return net.eval()
