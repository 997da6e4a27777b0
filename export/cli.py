"""`rnnserve train` and `rnnserve export`: the offline pipeline from the command line.

    rnnserve train --task glucose --cell gru --layers 2 --hidden-size 64 --out runs/glucose-gru.safetensors
    rnnserve export --checkpoint runs/glucose-gru.safetensors --name glucose-gru --model-repo models

Bad configuration (an unknown cell, a hidden size of 0, a missing data set, a bidirectional model for a
streaming task) is refused before any training starts.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from export.config import ConfigError, ExportError, GateSpec, TrainSpec, model_spec, train_spec
from export.data import DataSetMissing
from export.quantize import COMPARISONS, PRECISIONS
from service.repository import MODEL_NAME_PATTERN, RepositoryError


def _train_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = commands.add_parser(
        "train",
        help="train a model and write a safetensors checkpoint",
        description="Train a recurrent model on a task's training split, early-stopped on its validation "
        "split, and write a safetensors checkpoint for `rnnserve export`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    suppress = argparse.SUPPRESS  # no "(default: None)" in the help, and absent when not given
    tasks = "charlm (Shakespeare) | glucose (CGM forecast) | vowels"
    train.add_argument("--task", required=True, default=suppress, help=tasks)
    train.add_argument("--cell", required=True, default=suppress, help="rnn | lstm | gru")
    train.add_argument("--layers", type=int, default=2, help="stacked recurrent layers, 1 to 4")
    train.add_argument("--hidden-size", type=int, default=128, help="units per layer")
    train.add_argument("--dropout", type=float, default=0.0, help="dropout between layers")
    train.add_argument("--layer-norm", action="store_true", help="layer-normalised cells")
    train.add_argument("--bidirectional", action="store_true", help="bidirectional (classification only)")
    for name, info in TrainSpec.model_fields.items():
        kind: type[int] | type[float] = float if info.annotation is float else int
        flag = f"--{name.replace('_', '-')}"
        train.add_argument(flag, type=kind, default=suppress, help=f"{info.description} (default: {info.default})")
    train.add_argument("--out", type=Path, required=True, default=suppress, help="checkpoint path (.safetensors)")


def _export_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = commands.add_parser(
        "export",
        help="checkpoint -> ONNX variants -> validate -> publish",
        description="Export a checkpoint to ONNX, check it against torch, build the other precisions, "
        "evaluate every variant on the held-out split as it will be served, and publish those that pass "
        "the gates as new versions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    export.add_argument(
        "--checkpoint", type=Path, required=True, default=argparse.SUPPRESS, help="a checkpoint from rnnserve train"
    )
    export.add_argument("--name", required=True, default=argparse.SUPPRESS, help="model name in the repository")
    export.add_argument("--model-repo", type=Path, default=Path("models"), help="the model repository")
    export.add_argument("--precisions", default=",".join(PRECISIONS), help="variants to build, fp32 included")
    export.add_argument("--parity-steps", type=int, default=10_000, help="streamed steps of the parity check")
    export.add_argument(
        "--report-dir",
        type=Path,
        help="where the report goes, with a MODELS.md index in its parent (the catalog uses docs/models); "
        "default: beside the published model, <model-repo>/<name>/, and no index",
    )
    gates = GateSpec()
    export.add_argument(
        "--max-perplexity-increase-pct",
        type=float,
        default=gates.max_perplexity_increase_pct,
        help="gate for language models: a variant's perplexity over fp32's",
    )
    export.add_argument(
        "--max-rmse-increase-pct",
        type=float,
        default=gates.max_rmse_increase_pct,
        help="gate for forecasters: a variant's RMSE over fp32's",
    )
    export.add_argument(
        "--max-accuracy-drop-points",
        type=float,
        default=gates.max_accuracy_drop_points,
        help="gate for classifiers: accuracy points below fp32's",
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rnnserve")
    commands = parser.add_subparsers(dest="command", required=True)
    _train_parser(commands)
    _export_parser(commands)
    args = parser.parse_args(argv)
    try:
        return run_train(args) if args.command == "train" else run_export(args)
    except (ConfigError, DataSetMissing) as err:
        print(f"rnnserve {args.command}: {err}", file=sys.stderr)
        return 2
    except (ExportError, RepositoryError) as err:  # measured and refused, or the repository would not take it
        print(f"rnnserve {args.command}: {err}", file=sys.stderr)
        return 1


def run_train(args: argparse.Namespace) -> int:
    spec = model_spec(
        task=args.task,
        cell=args.cell,
        layers=args.layers,
        hidden_size=args.hidden_size,
        dropout=args.dropout,
        layer_norm=args.layer_norm,
        bidirectional=args.bidirectional,
    )
    options = {
        key: getattr(args, key)
        for key in (
            "seed",
            "steps",
            "batch_size",
            "bptt",
            "learning_rate",
            "clip_norm",
            "eval_every",
            "lr_patience",
            "lr_factor",
            "early_stop_patience",
            "torch_threads",
        )
        if getattr(args, key, None) is not None
    }
    config = train_spec(**options)
    if args.out.suffix != ".safetensors":
        raise ConfigError(f"--out {args.out}: checkpoints are safetensors files; name it *.safetensors")
    from export.tasks import load_task  # data and torch only after the configuration is known good
    from export.train import save_checkpoint, train

    task = load_task(spec.task)
    result = train(task, spec, config)
    save_checkpoint(args.out, result, task)
    print(f"best validation {task.metric} {result.best:.4f} in {result.seconds:.0f} s; wrote {args.out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    precisions = tuple(p for p in args.precisions.split(",") if p)
    unknown = [p for p in precisions if p not in PRECISIONS + COMPARISONS]
    if unknown or "fp32" not in precisions:
        raise ConfigError(
            f"--precisions must include fp32 and name only {', '.join(PRECISIONS + COMPARISONS)}; got {args.precisions}"
        )
    if not args.checkpoint.is_file():
        raise ConfigError(f"--checkpoint {args.checkpoint}: no such file")
    if not re.match(MODEL_NAME_PATTERN, args.name):
        raise ConfigError(f"--name {args.name!r}: letters, digits, '.', '_' and '-', starting with a letter or digit")
    if args.model_repo.exists() and not args.model_repo.is_dir():
        raise ConfigError(f"--model-repo {args.model_repo}: not a directory")
    gates = GateSpec(
        max_perplexity_increase_pct=args.max_perplexity_increase_pct,
        max_rmse_increase_pct=args.max_rmse_increase_pct,
        max_accuracy_drop_points=args.max_accuracy_drop_points,
    )
    from safetensors import SafetensorError

    from export.pipeline import export_model
    from export.report import write_index, write_report
    from export.train import load_checkpoint

    try:
        result, task = load_checkpoint(args.checkpoint)
    except (SafetensorError, KeyError, ValueError) as err:  # not a checkpoint this command wrote
        raise ConfigError(f"--checkpoint {args.checkpoint}: not an rnnserve checkpoint ({err})") from err
    report = export_model(
        result,
        task,
        args.model_repo,
        args.name,
        precisions=precisions,
        gates=gates,
        parity_steps=args.parity_steps,
    )
    if args.report_dir is None:  # beside the model: a model published elsewhere leaves this project alone
        page = write_report(report, args.model_repo / args.name)
    else:
        page = write_report(report, args.report_dir)
        write_index(args.report_dir, args.report_dir.parent / "MODELS.md")
    for row in report.variants:
        where = f"published as {args.name}/{row.version}" if row.published else "not published"
        figures = f"validation {row.validation.get(task.metric, float('nan')):.4f}"
        figures += f", test {row.metrics.get(task.metric, float('nan')):.4f}"
        print(f"{row.precision}: {task.metric} {figures}; {row.verdict}; {where}")
    print(f"report: {page}")
    return 0 if any(v.published for v in report.variants) else 1
