"""Build the shipped character language model: train, export, validate, publish.

    python -m export.charlm --model-repo models [--version 1] [--steps 1000]

Seeded and deterministic on one machine; `make models` runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from export.data import TEST_PLAYS, VALIDATION_PLAYS, load_shakespeare
from export.nets import CharLMConfig, state_names
from export.onnx_export import INPUT, OUTPUT, export_step_graph, onnx_perplexity, parity
from export.train import TrainConfig, save_checkpoint, train_charlm
from service.repository import (
    Manifest,
    Preprocessing,
    Provenance,
    StatePair,
    TensorSpec,
    write_version,
)

MODEL_NAME = "charlm"
SAMPLE_FILE = "heldout_sample.txt"


def build_manifest(
    *,
    version: int,
    config: CharLMConfig,
    vocabulary: str,
    model_bytes: bytes,
    validation: dict[str, float],
    train: TrainConfig,
) -> Manifest:
    hidden, vocab = config.hidden_size, config.vocab_size
    return Manifest(
        name=MODEL_NAME,
        version=version,
        task="language_model",
        cell="lstm",
        layers=config.layers,
        hidden_size=hidden,
        inputs=[TensorSpec(name=INPUT, shape=[-1, -1, vocab])],
        outputs=[TensorSpec(name=OUTPUT, shape=[-1, -1, vocab])],
        state=[StatePair(input=i, output=o, shape=[-1, hidden]) for i, o in state_names(config.layers)],
        preprocessing=Preprocessing(kind="one_hot", vocabulary=vocabulary),
        validation=validation,
        fingerprint=hashlib.sha256(model_bytes).hexdigest(),
        provenance=Provenance(
            dataset=(
                "shakespeare 0.6 (Project Gutenberg plays); validation: "
                f"{', '.join(VALIDATION_PLAYS)}; test: {', '.join(TEST_PLAYS)}"
            ),
            training={**asdict(train), **{f"model_{k}": v for k, v in config.to_dict().items()}},
            versions={
                "python": platform.python_version(),
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-repo", type=Path, default=Path("models"))
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--hidden-size", type=int, default=CharLMConfig.hidden_size)
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)

    corpus = load_shakespeare()
    config = CharLMConfig(vocab_size=len(corpus.vocabulary), hidden_size=args.hidden_size)
    train = TrainConfig(steps=args.steps)
    result = train_charlm(corpus, config, train)
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.checkpoint_dir / f"{MODEL_NAME}-v{args.version}.safetensors", result.net, train)

    model_bytes = export_step_graph(result.net)
    checks = parity(result.net, model_bytes, corpus.test[:2000])
    test_ppl = onnx_perplexity(model_bytes, corpus.test, config.vocab_size, config.hidden_size, config.layers)
    validation = {
        "validation_perplexity": result.validation_perplexity,
        "test_perplexity": test_ppl,
        "train_seconds": result.seconds,
        **checks,
    }
    manifest = build_manifest(
        version=args.version,
        config=config,
        vocabulary=corpus.vocabulary,
        model_bytes=model_bytes,
        validation=validation,
        train=train,
    )
    version_dir = write_version(args.model_repo, manifest, model_bytes)
    # Held-out text for `rnnserve demo`, which must run without the training extras installed.
    sample = corpus.test_text[5000:9000]
    (args.model_repo / MODEL_NAME / SAMPLE_FILE).write_text(sample)
    for key, value in validation.items():
        print(f"{key:>28}: {value:.6g}")
    print(f"published {version_dir}")
    worst = max(checks["parity_onnx_vs_torch"], checks["parity_streamed_vs_whole"])
    return 0 if np.isfinite(test_ppl) and worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
