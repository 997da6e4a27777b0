"""The torch networks and the step-graph wrapper that ONNX export traces."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CharLMConfig:
    """A stacked LSTM over one-hot characters with a linear read-out to next-character logits."""

    vocab_size: int
    hidden_size: int = 256
    layers: int = 2
    dropout: float = 0.1

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


class CharLSTM(nn.Module):
    """Input is one-hot float [B, T, V], the same tensor the served graph takes, so parity is exact."""

    def __init__(self, config: CharLMConfig) -> None:
        super().__init__()
        self.config = config
        self.lstm = nn.LSTM(
            input_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.layers,
            dropout=config.dropout if config.layers > 1 else 0.0,
            batch_first=True,
        )
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, param in self.lstm.named_parameters():
            if name.startswith("weight_hh"):
                for gate in param.data.chunk(4, dim=0):
                    nn.init.orthogonal_(gate)
            elif name.startswith("weight_ih"):
                nn.init.xavier_uniform_(param.data)
            elif name.startswith("bias"):
                param.data.zero_()
                # A forget-gate bias of 1 keeps early gradients flowing through long spans.
                hidden = self.config.hidden_size
                param.data[hidden : 2 * hidden] = 0.5

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        y, state = self.lstm(x, state)
        return self.head(y), state

    def zero_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.config.layers, batch, self.config.hidden_size)
        return torch.zeros(shape), torch.zeros(shape)


class LSTMStepGraph(nn.Module):
    """What the service runs: x [B, T, F] and per-layer states [B, H] in, logits and new states out.

    Per-layer state tensors keep the batch on axis 0 for every state, so the service can stack and
    split sessions along one axis whatever the cell.
    """

    def __init__(self, net: CharLSTM) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = self.net.config.layers
        h = torch.stack(states[:layers])
        c = torch.stack(states[layers:])
        logits, (h_new, c_new) = self.net(x, (h, c))
        return (logits, *h_new.unbind(0), *c_new.unbind(0))


def state_names(layers: int) -> list[tuple[str, str]]:
    """(input, output) names of the LSTM state pairs, h for every layer, then c for every layer."""
    return [(f"h{i}", f"h{i}_out") for i in range(layers)] + [(f"c{i}", f"c{i}_out") for i in range(layers)]
