"""The torch networks: a recurrent stack and a read-out, for the three tasks.

Training uses torch's fused LSTM / GRU / RNN modules where it can (fast on CPU) and explicit cells where
it must (layer normalisation). Export rebuilds every streamable stack from explicit cells, except a
plain LSTM, which exports as the ONNX LSTM op (see onnx_export.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from export.config import ModelSpec

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
FUSED = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


def state_names(cell: str, layers: int) -> list[tuple[str, str]]:
    """(input, output) names of the state pairs: h of every layer, then c of every layer for an LSTM."""
    names = [(f"h{i}", f"h{i}_out") for i in range(layers)]
    if cell == "lstm":
        names += [(f"c{i}", f"c{i}_out") for i in range(layers)]
    return names


class ExplicitCell(nn.Module):
    """One layer's step as matrix products and element-wise ops, torch's gate order and semantics.

    With layer normalisation (Ba et al. 2016): LN(W x) + LN(U h) + b for the gates, and LN(c) before the
    LSTM's output tanh.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, layer_norm: bool = False) -> None:
        super().__init__()
        width = GATES[cell] * hidden_size
        self.cell, self.hidden_size, self.layer_norm = cell, hidden_size, layer_norm
        self.w_ih = nn.Parameter(torch.empty(width, input_size))
        self.w_hh = nn.Parameter(torch.empty(width, hidden_size))
        self.b_ih = nn.Parameter(torch.zeros(width))
        self.b_hh = nn.Parameter(torch.zeros(width))
        self.ln_c: nn.LayerNorm | None = None
        if layer_norm:
            self.ln_ih = nn.LayerNorm(width)
            self.ln_hh = nn.LayerNorm(width)
            if cell == "lstm":
                self.ln_c = nn.LayerNorm(hidden_size)
        initialise(self.w_ih, self.w_hh, self.b_ih, self.b_hh, cell)

    @classmethod
    def from_fused(cls, fused: nn.RNNBase, layer: int, cell: str) -> ExplicitCell:
        """The same layer of a trained torch LSTM / GRU / RNN, as an explicit cell (identical maths)."""
        weight = getattr(fused, f"weight_ih_l{layer}")
        explicit = cls(cell, weight.shape[1], fused.hidden_size)
        with torch.no_grad():
            for ours, theirs in (
                ("w_ih", "weight_ih"),
                ("w_hh", "weight_hh"),
                ("b_ih", "bias_ih"),
                ("b_hh", "bias_hh"),
            ):
                getattr(explicit, ours).copy_(getattr(fused, f"{theirs}_l{layer}"))
        return explicit

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if self.layer_norm:
            gi = self.ln_ih(torch.matmul(x, self.w_ih.t())) + self.b_ih
            gh = self.ln_hh(torch.matmul(h, self.w_hh.t())) + self.b_hh
        else:
            gi = torch.matmul(x, self.w_ih.t()) + self.b_ih
            gh = torch.matmul(h, self.w_hh.t()) + self.b_hh
        if self.cell == "rnn":
            return (torch.tanh(gi + gh),)
        if self.cell == "gru":
            xr, xz, xn = gi.chunk(3, dim=-1)
            hr, hz, hn = gh.chunk(3, dim=-1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return ((1 - z) * n + z * h,)
        assert c is not None
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        shown = self.ln_c(c_new) if self.ln_c is not None else c_new
        return torch.sigmoid(o) * torch.tanh(shown), c_new


def initialise(w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor, b_hh: torch.Tensor, cell: str) -> None:
    """Xavier for input weights, orthogonal per gate for recurrent weights, zero biases (LSTM forget: 1)."""
    with torch.no_grad():
        nn.init.xavier_uniform_(w_ih)
        for gate in w_hh.chunk(GATES[cell], dim=0):
            nn.init.orthogonal_(gate)
        b_ih.zero_()
        b_hh.zero_()
        if cell == "lstm":
            hidden = w_hh.shape[1]
            b_ih[hidden : 2 * hidden] = 0.5
            b_hh[hidden : 2 * hidden] = 0.5


class Recurrent(nn.Module):
    """A stack of 1-4 layers. State: a list of [B, H] tensors, named as `state_names` says."""

    def __init__(self, spec: ModelSpec, input_size: int) -> None:
        super().__init__()
        self.spec = spec
        hidden = spec.hidden_size
        if spec.layer_norm:
            self.cells = nn.ModuleList(
                ExplicitCell(spec.cell, input_size if i == 0 else hidden, hidden, layer_norm=True)
                for i in range(spec.layers)
            )
            self.dropout = nn.Dropout(spec.dropout)
            self.fused = None
        else:
            extra = {"nonlinearity": "tanh"} if spec.cell == "rnn" else {}
            self.fused = FUSED[spec.cell](
                input_size,
                hidden,
                spec.layers,
                dropout=spec.dropout,
                batch_first=True,
                bidirectional=spec.bidirectional,
                **extra,
            )
            directions = 2 if spec.bidirectional else 1
            for layer in range(spec.layers):
                for suffix in ("", "_reverse")[:directions]:
                    w_ih, w_hh, b_ih, b_hh = (
                        getattr(self.fused, f"{w}_l{layer}{suffix}")
                        for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                    )
                    initialise(w_ih, w_hh, b_ih, b_hh, spec.cell)

    @property
    def output_size(self) -> int:
        return self.spec.hidden_size * (2 if self.spec.bidirectional else 1)

    def zero_state(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros(batch, self.spec.hidden_size) for _ in state_names(self.spec.cell, self.spec.layers)]

    def forward(
        self, x: torch.Tensor, state: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        layers = self.spec.layers
        state = state if state is not None else self.zero_state(x.shape[0])
        if self.fused is not None:
            if self.spec.bidirectional:
                y, _ = self.fused(x)
                return y, []
            h = torch.stack(state[:layers])
            if self.spec.cell == "lstm":
                y, (h_new, c_new) = self.fused(x, (h, torch.stack(state[layers:])))
                return y, [*h_new.unbind(0), *c_new.unbind(0)]
            y, h_new = self.fused(x, h)
            return y, list(h_new.unbind(0))
        return self._explicit(x, state)

    def _explicit(self, x: torch.Tensor, state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        layers = self.spec.layers
        h = list(state[:layers])
        c = list(state[layers:]) if self.spec.cell == "lstm" else [None] * layers
        outputs = []
        for t in range(x.shape[1]):
            inp = x[:, t]
            for i, cell in enumerate(self.cells):
                new = cell(inp, h[i], c[i])
                h[i] = new[0]
                if self.spec.cell == "lstm":
                    c[i] = new[1]
                inp = self.dropout(h[i]) if i < layers - 1 else h[i]
            outputs.append(inp)
        return torch.stack(outputs, dim=1), h + ([t for t in c if t is not None])

    def explicit_cells(self) -> list[ExplicitCell]:
        """The stack as explicit cells, for a step graph; equal in maths to the trained stack."""
        if self.fused is None:
            return list(self.cells)  # type: ignore[arg-type]
        return [ExplicitCell.from_fused(self.fused, i, self.spec.cell) for i in range(self.spec.layers)]


class TaskNet(nn.Module):
    """Normalise the inputs, run the stack, read out. Outputs are in the task's own units."""

    mean: torch.Tensor
    std: torch.Tensor
    output_scale: torch.Tensor
    output_shift: torch.Tensor
    first_gap: torch.Tensor | None

    def __init__(
        self,
        spec: ModelSpec,
        features: int,
        outputs: int,
        *,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        output_scale: float = 1.0,
        output_shift: float = 0.0,
        first_gap: float | None = None,
    ) -> None:
        """`first_gap`: feature 1 is a time gap, and 0 (no previous reading) is read as this many."""
        super().__init__()
        self.spec = spec
        self.features, self.outputs = features, outputs
        self.recurrent = Recurrent(spec, features)
        self.head = nn.Linear(self.recurrent.output_size, outputs)
        self.register_buffer("mean", mean if mean is not None else torch.zeros(features))
        self.register_buffer("std", std if std is not None else torch.ones(features))
        self.register_buffer("output_scale", torch.tensor(output_scale))
        self.register_buffer("output_shift", torch.tensor(output_shift))
        if first_gap is not None:
            self.register_buffer("first_gap", torch.tensor(float(first_gap)))
        else:
            self.first_gap = None
        nn.init.xavier_uniform_(self.head.weight, gain=1 / math.sqrt(2))
        nn.init.zeros_(self.head.bias)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.first_gap is not None:
            gap = x[..., 1:2]
            x = torch.cat([x[..., :1], torch.where(gap > 0, gap, self.first_gap.to(x.dtype)), x[..., 2:]], dim=-1)
        return (x - self.mean) / self.std

    def read_out(self, y: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(y) * self.output_scale + self.output_shift
        return out

    def forward(
        self, x: torch.Tensor, state: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        y, state = self.recurrent(self.normalise(x), state)
        return self.read_out(y), state

    def classify(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Padded sequences [B, T, F] of `lengths`: the mean of the valid outputs, read out to [B, C]."""
        if self.recurrent.fused is not None:
            # Packed: the backward direction of a bidirectional stack starts at each sequence's own end.
            packed = nn.utils.rnn.pack_padded_sequence(
                self.normalise(x), lengths.cpu(), batch_first=True, enforce_sorted=False
            )
            y, _ = self.recurrent.fused(packed)
            padded, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
        else:  # unidirectional: padding after a sequence cannot change its valid outputs
            padded, _ = self.recurrent(self.normalise(x))
        mask = (torch.arange(padded.shape[1])[None, :] < lengths[:, None]).unsqueeze(-1)
        pooled = (padded * mask).sum(dim=1) / lengths[:, None]
        return self.read_out(pooled)
