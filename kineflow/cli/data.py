"""``kineflow data``: materialise ShapesWorld as a JSONL manifest over PNG files, validate a
manifest, train a text tokenizer, write the ground-truth outputs ``kineflow eval shapes``
reads. Handlers import :mod:`kineflow.data`, :mod:`kineflow.tokenizers` and
:mod:`kineflow.eval` themselves, so ``--help`` stays fast."""

from __future__ import annotations

import argparse
from pathlib import Path

from kineflow.cli.args import int_in_range, output_dir
from kineflow.cli.command import Command, group

__all__ = ["COMMANDS", "SHAPES_TASKS", "SPLITS"]

# Spelled out rather than imported from kineflow.data.shapes, which loads torch: --help stays fast.
#: ShapesWorld's splits (kineflow.data.shapes.scene.SPLITS).
SPLITS = ("train", "val", "test", "heldout")
#: ShapesWorld's tasks (kineflow.data.shapes.dataset.SHAPES_TASKS).
SHAPES_TASKS = ("t2i", "caption", "vqa", "edit")


def _world_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int_in_range(0, 2**32 - 1), default=0, help="world seed")
    parser.add_argument("--size", type=int, choices=(32, 64), default=32, help="picture size")


def _data_shapes_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=output_dir, required=True, help="output folder")
    parser.add_argument("--n", type=int_in_range(1, 10**8), default=10_000, help="items per task")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--tasks", nargs="+", choices=SHAPES_TASKS, default=list(SHAPES_TASKS))
    parser.add_argument(
        "--workers",
        type=int_in_range(1, 256),
        default=None,
        help="processes (default: the CPUs available, at most 8)",
    )
    _world_options(parser)


def _run_data_shapes(args: argparse.Namespace) -> int:
    import json

    from kineflow.data.shapes.materialise import materialise
    from kineflow.data.shapes.scene import WorldConfig

    summary = materialise(
        args.out,
        args.n,
        split=args.split,
        tasks=tuple(args.tasks),
        world=WorldConfig(seed=args.seed, image_size=args.size),
        workers=args.workers,
    )
    print(json.dumps(summary, indent=1))
    return 0


def _data_validate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, help="JSONL manifest to check")
    parser.add_argument(
        "--image-size",
        type=int_in_range(1, 8192),
        default=None,
        help="training resolution (then mixed picture sizes are fine)",
    )
    parser.add_argument("--max-errors", type=int_in_range(1, 10**6), default=50)


def _run_data_validate(args: argparse.Namespace) -> int:
    from kineflow.data.manifest import validate_manifest

    if not args.manifest.is_file():
        print(f"error: {args.manifest}: no such manifest file")
        return 2
    report = validate_manifest(
        args.manifest, image_size=args.image_size, max_errors=args.max_errors
    )
    print(report.format())
    return 0 if report.ok else 1


def _data_tokenizer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=output_dir, required=True, help="tokenizer folder")
    parser.add_argument("--vocab-size", type=int_in_range(262, 1 << 20), default=512)
    parser.add_argument(
        "--n",
        type=int_in_range(1, 10**7),
        default=2000,
        help="training items per task in the corpus",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="train on this text file (one text per line) instead of ShapesWorld",
    )
    parser.add_argument("--seed", type=int_in_range(0, 2**32 - 1), default=0, help="world seed")


def _run_data_tokenizer(args: argparse.Namespace) -> int:
    from kineflow.tokenizers.text import train_text_tokenizer

    if args.corpus is not None:
        if not args.corpus.is_file():
            print(f"error: {args.corpus}: no such corpus file")
            return 2
        texts = [t for t in args.corpus.read_text().splitlines() if t.strip()]
    else:
        from kineflow.data.shapes.dataset import corpus
        from kineflow.data.shapes.scene import ShapesWorld, WorldConfig

        texts = corpus(ShapesWorld(WorldConfig(seed=args.seed)), args.n)
    tokenizer = train_text_tokenizer(texts, vocab_size=args.vocab_size)
    path = tokenizer.save(args.out)
    print(f"{path}: {tokenizer.vocab_size} tokens, trained on {len(texts)} texts")
    return 0


def _data_reference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=SHAPES_TASKS, required=True)
    parser.add_argument("--out", type=output_dir, required=True)
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument(
        "--n", type=int_in_range(1, 10**6), default=500, help="items (vqa, caption, edit)"
    )
    parser.add_argument("--samples-per-prompt", type=int_in_range(1, 64), default=4)


def _run_data_reference(args: argparse.Namespace) -> int:
    from kineflow.eval.score_files import write_reference

    path = write_reference(args.task, args.out, args.split, args.n, args.samples_per_prompt)
    print(f"ground-truth {args.task} outputs written to {path}")
    return 0


def _data_encode_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        required=True,
        help="a FUDOKI or UniFluid training YAML (its data, tokenizer, vq / vae)",
    )
    parser.add_argument("--out", type=output_dir, required=True, help="shard folder")
    parser.add_argument(
        "--samples",
        type=int_in_range(1, 10**9),
        required=True,
        help="samples 0 .. N-1 of the run's data",
    )
    parser.add_argument("--shard-size", type=int_in_range(1, 10**7), default=1024,
                        help="samples per shard file")  # fmt: skip


def _run_data_encode(args: argparse.Namespace) -> int:
    """Build the run's task (tokenizer, frozen encoder) and write its first ``--samples``
    samples as shards (:func:`kineflow.train.common.encode_shards`)."""
    import json

    import yaml

    if not args.config.is_file():
        print(f"error: {args.config}: no such config file")
        return 2
    try:
        raw = yaml.safe_load(args.config.read_text())
    except yaml.YAMLError:
        raw = None
    if not isinstance(raw, dict) or not ({"vq", "vae"} & set(raw)):
        print(f"error: {args.config}: not a FUDOKI (vq:) or UniFluid (vae:) training config")
        return 2
    try:
        index = _encode(args, raw)
    except (TypeError, ValueError, FileNotFoundError) as err:
        print(f"error: {args.config}: {err}".splitlines()[0])
        return 2
    summary = {k: index[k] for k in ("kind", "samples")} | {"shards": len(index["shards"])}
    print(json.dumps({"out": str(args.out), **summary}))
    return 0


def _encode(args: argparse.Namespace, raw: dict) -> dict:
    import torch

    from kineflow.tokenizers.text import TextTokenizer
    from kineflow.train.common import encode_shards

    raw = {**raw, "data": {**raw.get("data", {}), "shards": None}}
    if "vq" in raw:
        from kineflow.train.fudoki import FudokiTask, FudokiTrainConfig, build_model

        config = FudokiTrainConfig.from_dict(raw)
        tok = TextTokenizer.load(config.text_tokenizer)
        model = build_model(config, tok)
        # The metric tables only shape the corruption, which shards do not hold.
        text, image = model.language_model.model.embed_tokens.weight, model.gen_embed.weight
        task = FudokiTask(model, tok, config, text.detach(), image.detach())
    else:
        from kineflow.train.unifluid import UnifluidTask, UnifluidTrainConfig, build_unifluid

        config = UnifluidTrainConfig.from_dict(raw)
        tok = TextTokenizer.load(config.text_tokenizer)
        task = UnifluidTask(build_unifluid(config, tok), tok, config)
    with torch.no_grad():
        return encode_shards(task, args.out, args.samples, args.shard_size)


COMMANDS: list[Command] = [
    group(
        "data",
        help="ShapesWorld datasets, manifest validation, text tokenizers",
        description="Data tools: materialise ShapesWorld, validate a JSONL manifest, train a "
        "text tokenizer, write ground-truth benchmark outputs.",
        subcommands=(
            Command(
                "shapes",
                "write ShapesWorld items as a JSONL manifest over PNG files",
                _data_shapes_options,
                _run_data_shapes,
            ),
            Command(
                "validate",
                "check a JSONL manifest (fields, paths, pictures) before training",
                _data_validate_options,
                _run_data_validate,
            ),
            Command(
                "tokenizer",
                "train a byte-level BPE text tokenizer (tokenizer.json)",
                _data_tokenizer_options,
                _run_data_tokenizer,
            ),
            Command(
                "encode",
                "pre-tokenise a training config's data into safetensors shards",
                _data_encode_options,
                _run_data_encode,
            ),
            Command(
                "reference",
                "write ground-truth outputs in the layout 'eval shapes' reads",
                _data_reference_options,
                _run_data_reference,
            ),
        ),
    ),
]
