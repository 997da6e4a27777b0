"""The learning-rate schedule follows the validation metric in its own direction."""

from __future__ import annotations

import pytest
import torch

from export.config import TrainSpec
from export.tasks import Glucose, Task, Vowels
from export.train import plateau_schedule


def _rates(task: Task, metrics: list[float]) -> list[float]:
    weight = torch.nn.Parameter(torch.zeros(1))
    optimiser = torch.optim.Adam([weight], lr=0.01)
    schedule = plateau_schedule(optimiser, task, TrainSpec(lr_patience=2, lr_factor=0.5))
    rates = []
    for metric in metrics:
        schedule.step(metric)
        rates.append(optimiser.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize(
    ("task", "improving"),
    [(Vowels(), [0.5, 0.7, 0.9, 1.0]), (Glucose(), [9.0, 7.0, 6.0, 5.0])],
    ids=["accuracy, higher is better", "rmse, lower is better"],
)
def test_the_rate_drops_on_a_plateau_and_not_while_improving(task: Task, improving: list[float]) -> None:
    assert _rates(task, improving) == [0.01] * 4
    plateau = improving + [improving[-1]] * 4  # e.g. 100 % validation accuracy, held
    rates = _rates(task, plateau)
    assert rates[-1] < 0.01, rates
