"""`rnnserve train` and `rnnserve export`: the offline pipeline from the command line.

    rnnserve train --task glucose --cell gru --layers 2 --hidden-size 64 --out runs/glucose-gru.safetensors
    rnnserve export --checkpoint runs/glucose-gru.safetensors --name glucose-gru --model-repo models

Bad configuration (an unknown cell, a hidden size of 0, a missing data set, a bidirectional model for a
streaming task) is refused before any training starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.config import ConfigError, GateSpec, model_spec, train_spec
from export.data import DataSetMissing
from export.quantize import PRECISIONS


def _train_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = commands.add_parser("train", help="train a model and write a safetensors checkpoint")
    train.add_argument("--task", required=True, help="charlm | glucose | vowels")
    train.add_argument("--cell", required=True, help="rnn | lstm | gru")
    train.add_argument("--layers", type=int, default=2)
    train.add_argument("--hidden-size", type=int, default=128)
    train.add_argument("--dropout", type=float, default=0.0)
    train.add_argument("--layer-norm", action="store_true")
    train.add_argument("--bidirectional", action="store_true")
    for name, kind in (
        ("seed", int),
        ("steps", int),
        ("batch-size", int),
        ("bptt", int),
        ("learning-rate", float),
        ("clip-norm", float),
        ("eval-every", int),
        ("lr-patience", int),
        ("lr-factor", float),
        ("early-stop-patience", int),
        ("torch-threads", int),
    ):
        train.add_argument(f"--{name}", type=kind)
    train.add_argument("--out", type=Path, required=True, help="checkpoint path (.safetensors)")


def _export_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = commands.add_parser("export", help="checkpoint -> ONNX variants -> validate -> publish")
    export.add_argument("--checkpoint", type=Path, required=True)
    export.add_argument("--name", required=True, help="model name in the repository")
    export.add_argument("--model-repo", type=Path, default=Path("models"))
    export.add_argument("--precisions", default=",".join(PRECISIONS))
    export.add_argument("--parity-steps", type=int, default=10_000)
    export.add_argument("--report-dir", type=Path, default=Path("docs/models"))
    export.add_argument("--max-perplexity-increase-pct", type=float, default=GateSpec().max_perplexity_increase_pct)
    export.add_argument("--max-rmse-increase-pct", type=float, default=GateSpec().max_rmse_increase_pct)
    export.add_argument("--max-accuracy-drop-points", type=float, default=GateSpec().max_accuracy_drop_points)


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
        if getattr(args, key) is not None
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
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or "fp32" not in precisions:
        raise ConfigError(
            f"--precisions must include fp32 and name only {', '.join(PRECISIONS)}; got {args.precisions}"
        )
    if not args.checkpoint.is_file():
        raise ConfigError(f"--checkpoint {args.checkpoint}: no such file")
    gates = GateSpec(
        max_perplexity_increase_pct=args.max_perplexity_increase_pct,
        max_rmse_increase_pct=args.max_rmse_increase_pct,
        max_accuracy_drop_points=args.max_accuracy_drop_points,
    )
    from export.pipeline import export_model
    from export.report import write_index, write_report
    from export.train import load_checkpoint

    result, task = load_checkpoint(args.checkpoint)
    report = export_model(
        result,
        task,
        args.model_repo,
        args.name,
        precisions=precisions,
        gates=gates,
        parity_steps=args.parity_steps,
    )
    page = write_report(report, args.report_dir)
    write_index(args.report_dir, args.report_dir.parent / "MODELS.md")
    for row in report.variants:
        where = f"published as {args.name}/{row.version}" if row.published else "not published"
        print(
            f"{row.precision}: {task.metric} {row.metrics.get(task.metric, float('nan')):.4f}; {row.verdict}; {where}"
        )
    print(f"report: {page}")
    return 0 if any(v.published for v in report.variants) else 1
