"""The shipped model repository, rebuilt from the data sets: `make models` (python -m export.catalog).

Trains every model below (seeded), exports and validates its variants, publishes those that pass the
gate, and writes the reports under docs/. About 40 minutes on 2 CPU cores. A checkpoint under runs/ made
with the same model and training settings is reused instead of training again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.config import ConfigError, model_spec, train_spec
from export.quantize import COMPARISONS

if TYPE_CHECKING:
    from export.tasks import Task
    from export.train import TrainResult

CATALOG: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "charlm-lstm": (
        {"task": "charlm", "cell": "lstm", "layers": 2, "hidden_size": 256, "dropout": 0.1},
        {"steps": 2500, "learning_rate": 3e-3, "batch_size": 64, "bptt": 128, "eval_every": 250},
    ),
    "charlm-gru": (
        {"task": "charlm", "cell": "gru", "layers": 2, "hidden_size": 256, "dropout": 0.1},
        {"steps": 2000, "learning_rate": 3e-3, "batch_size": 64, "bptt": 128, "eval_every": 250},
    ),
    "charlm-rnn": (  # the vanilla baseline
        {"task": "charlm", "cell": "rnn", "layers": 2, "hidden_size": 256, "dropout": 0.1},
        {
            "steps": 1500,
            "learning_rate": 1e-3,
            "batch_size": 64,
            "bptt": 64,
            "eval_every": 250,
            "clip_norm": 0.5,
        },
    ),
    "glucose-lstm": (
        {"task": "glucose", "cell": "lstm", "layers": 2, "hidden_size": 64, "dropout": 0.1},
        {"steps": 1500, "learning_rate": 2e-3, "batch_size": 64, "bptt": 48, "eval_every": 100},
    ),
    "glucose-gru": (
        {"task": "glucose", "cell": "gru", "layers": 2, "hidden_size": 64, "dropout": 0.1},
        {"steps": 1500, "learning_rate": 2e-3, "batch_size": 64, "bptt": 48, "eval_every": 100},
    ),
    "vowels-bilstm": (
        {"task": "vowels", "cell": "lstm", "layers": 1, "hidden_size": 64, "bidirectional": True},
        {"steps": 600, "learning_rate": 3e-3, "batch_size": 32, "eval_every": 25, "early_stop_patience": 8},
    ),
}
DEMO_SAMPLE = "heldout_sample.txt"


def trained(name: str, checkpoints: Path, quick: bool = False) -> tuple[TrainResult, Task]:
    """The catalog's model `name`, trained, or reused from its checkpoint if that has the same settings."""
    from export.tasks import load_task
    from export.train import load_checkpoint, save_checkpoint, train

    spec_fields, train_fields = CATALOG[name]
    spec = model_spec(**spec_fields)
    config = train_spec(**(train_fields | ({"steps": 20, "eval_every": 10} if quick else {})))
    task = load_task(spec.task)
    checkpoint = checkpoints / f"{name}.safetensors"
    try:
        result = load_checkpoint(checkpoint, task)[0] if checkpoint.is_file() else None
    except ConfigError as err:
        print(f"{name}: {err}")
        result = None
    if result is None or (result.spec, result.train) != (spec, config):  # reuse only the same training
        result = train(task, spec, config)
        save_checkpoint(checkpoint, result, task)
    else:
        print(f"{name}: reusing {checkpoint} (same model and training settings)")
    return result, task


def build(name: str, repo: Path, reports: Path, checkpoints: Path, quick: bool = False) -> None:
    from export.pipeline import export_model
    from export.report import write_report
    from export.tasks import CharLM

    result, task = trained(name, checkpoints, quick)
    precisions = ("fp32", *COMPARISONS, "int8", "fp16")  # the comparison is measured, never published
    report = export_model(result, task, repo, name, precisions=precisions, parity_steps=500 if quick else 10_000)
    write_report(report, reports)
    if isinstance(task, CharLM):  # held-out text for `rnnserve demo`, which runs without the data packages
        (repo / name / DEMO_SAMPLE).write_text(task.corpus.test_text[5000:9000])
    for row in report.variants:
        print(f"{name} {row.precision}: {row.verdict}; published: {row.published}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repo", type=Path, default=Path("models"))
    parser.add_argument("--report-dir", type=Path, default=Path("docs/models"))
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("runs"))
    parser.add_argument("--only", nargs="*", choices=sorted(CATALOG), help="build just these")
    parser.add_argument("--quick", action="store_true", help="20 training steps each: checks the pipeline only")
    args = parser.parse_args(argv)
    from export.report import write_index

    for name in args.only or CATALOG:
        build(name, args.model_repo, args.report_dir, args.checkpoint_dir, quick=args.quick)
    write_index(args.report_dir, args.report_dir.parent / "MODELS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
