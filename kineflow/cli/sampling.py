"""The CLI's sampling commands: ``kineflow generate / answer / edit / showcase`` with a trained
checkpoint of either model family.

``generate`` and ``answer`` serve FUDOKI and UniFluid checkpoints alike (the family is read
from the checkpoint); ``edit`` is UniFluid's. An option one family does not use (``--steps``,
``--top-k``, ``--trajectory`` for UniFluid; ``--beams`` for FUDOKI) is refused with an
``error:`` line naming it instead of being silently ignored. User mistakes print one
``error: ...`` line and exit 2; handlers import torch and the pipelines themselves, so
``--help`` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kineflow.cli.args import DEVICE_FORMS, device_name, finite_float, int_in_range, output_dir
from kineflow.cli.command import Command

__all__ = ["CLI_ERRORS", "COMMANDS"]

#: ``float64`` samples the same pictures across CPUs (float32 matmuls round differently on
#: other instruction sets, and one flipped draw changes a whole picture; README, "Scores and
#: the CPU"): ``make demo`` and the golden showcase test use it.
DTYPES = ("float32", "bfloat16", "float64")
#: What a sampling call raises for a user mistake (each with a message naming it).
CLI_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError)
#: Pictures are 32 px: every command writes them enlarged this much unless told otherwise.
DEFAULT_SCALE = 4

#: How the command line spells the sampling options one family may not use (the pipeline
#: refuses them: :meth:`kineflow.pipelines.base.Pipeline.refuse_options`).
_FLAGS = {
    "steps": "--steps",
    "top_k": "--top-k",
    "return_trajectory": "--trajectory",
    "beams": "--beams",
    "best_of": "--best-of",
}


def _model_options(parser: argparse.ArgumentParser, steps: bool = True) -> None:
    parser.add_argument(
        "--model", required=True,
        help="checkpoint folder, FUDOKI or UniFluid (or a Hugging Face hub id)",
    )  # fmt: skip
    if steps:
        parser.add_argument(
            "--steps", type=int_in_range(1, 1024), default=None,
            help="FUDOKI only: solver steps (= model calls); default: the checkpoint's "
            "(UniFluid takes one backbone step per token)",
        )  # fmt: skip
    parser.add_argument("--seed", type=int_in_range(0, 2**63 - 1), default=0, help="seed")
    parser.add_argument("--device", type=device_name, default="cpu", help=DEVICE_FORMS)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="model precision")
    parser.add_argument(
        "--no-progress", action="store_true",
        help="no progress bar (FUDOKI: over the solver steps; UniFluid: over the image tokens)",
    )  # fmt: skip


def _load_for_cli(args: argparse.Namespace) -> Any:
    import torch

    import kineflow

    return kineflow.load(args.model, device=args.device, dtype=getattr(torch, args.dtype))


# -- generate ------------------------------------------------------------------------------------
def _generate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "prompts", nargs="*", help="one picture per prompt (or --prompts-file with --layout)"
    )
    _model_options(parser)
    parser.add_argument(
        "--cfg", type=finite_float(0.0), default=None,
        help="classifier-free guidance weight; default: the checkpoint's. FUDOKI: w, 0 = off; "
        "UniFluid: the weight reached at the last token (rising from 1), 1 = off",
    )  # fmt: skip
    parser.add_argument(
        "--temperature", type=finite_float(0.0), default=None,
        help="sampling temperature, >= 0; default: 1 (FUDOKI, 0 = greedy), the checkpoint's "
        "(UniFluid: the diffusion head's noise scale)",
    )  # fmt: skip
    parser.add_argument(
        "--top-k", type=int_in_range(1, 10**6), default=None,
        help="FUDOKI only: sample each image code among the k likeliest",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=int_in_range(1, 4096), default=8, help="prompts sampled together"
    )
    parser.add_argument(
        "--best-of", type=int_in_range(1, 64), default=None,
        help="draw N candidates per prompt and keep the one the model itself rates likeliest "
        "to show the prompt (its yes/no answer to 'does the picture show exactly: PROMPT?'); "
        "default: 1 (one picture, no judging)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=output_dir, default=Path("outputs/generate"),
        help="folder for the PNGs and GIFs",
    )  # fmt: skip
    parser.add_argument(
        "--no-gif", action="store_true",
        help="skip the GIF/strip of each picture being made (FUDOKI: every solver step; "
        "UniFluid: the tokens arriving in generation order)",
    )  # fmt: skip
    parser.add_argument(
        "--scale", type=int_in_range(1, 32), default=DEFAULT_SCALE,
        help="enlarge the written pictures (nearest neighbour)",
    )  # fmt: skip
    parser.add_argument(
        "--layout", choices=("flat", "geneval"), default="flat",
        help="flat: sample_{i}.png in --out; geneval: --out/{i:05d}/metadata.jsonl + "
        "samples/{k:04d}.png per line of --prompts-file (GenEval's evaluation_metadata.jsonl) "
        "and --out/run.json, skipping complete folders (resumable); pictures at the model's "
        "resolution (--scale is not applied)",
    )  # fmt: skip
    parser.add_argument(
        "--prompts-file", type=Path, default=None,
        help="with --layout geneval: GenEval's evaluation_metadata.jsonl (or one like it)",
    )  # fmt: skip
    parser.add_argument(
        "--n-samples", type=int_in_range(1, 1024), default=None,
        help="with --layout geneval: pictures per prompt (default 4, GenEval's)",
    )  # fmt: skip


def _run_generate(args: argparse.Namespace) -> int:
    import json

    if args.layout == "geneval" or args.prompts_file is not None or args.n_samples is not None:
        return _run_geneval(args)
    if not args.prompts:
        print("error: give at least one prompt (or --layout geneval --prompts-file FILE)")
        return 2
    try:
        pipe = _load_for_cli(args)
        given = {"steps": args.steps, "top_k": args.top_k, "best_of": args.best_of}
        pipe.refuse_options("text_to_image", given, _FLAGS)
        # Every prompt is checked before the first batch is sampled (and with its own index).
        pipe.check_prompts(args.prompts)
        written, records = [], []
        for start in range(0, len(args.prompts), args.batch_size):
            prompts = args.prompts[start : start + args.batch_size]
            options = {
                "cfg_scale": args.cfg,
                "temperature": args.temperature,
                "seed": args.seed + start,
                "return_trajectory": not args.no_gif,
                "progress": not args.no_progress,
                "steps": args.steps,
                "top_k": args.top_k,
                "best_of": args.best_of or 1,
            }
            result = pipe.text_to_image(prompts, **pipe.select_options("text_to_image", options))
            # File names number the prompts across batches: sample_{index}.
            written += result.save(args.out, scale=args.scale, first_index=start)
            for i, p in enumerate(prompts):
                records.append({"index": start + i, "prompt": p})
                if result.scores is not None:  # --best-of N > 1: the kept candidate
                    records[-1].update(score=result.scores[i], candidate=result.chosen[i])
    except CLI_ERRORS as err:
        print(f"error: {err}")
        return 2
    (args.out / "prompts.json").write_text(json.dumps(records, indent=1, ensure_ascii=False))
    for path in written:
        print(path)
    return 0


def _run_geneval(args: argparse.Namespace) -> int:
    """``generate --layout geneval``: the GenEval tree (:mod:`kineflow.eval.geneval_layout`)."""
    if args.layout != "geneval" or args.prompts_file is None or args.prompts:
        print(
            "error: --layout geneval reads its prompts from --prompts-file FILE.jsonl (and "
            "--prompts-file / --n-samples need --layout geneval), not from the command line"
        )
        return 2  # fmt: skip
    from kineflow.eval.geneval_layout import read_geneval_prompts, write_geneval

    try:
        prompts = read_geneval_prompts(args.prompts_file)
        pipe = _load_for_cli(args)
        given = {"steps": args.steps, "top_k": args.top_k, "best_of": args.best_of}
        pipe.refuse_options("text_to_image", given, _FLAGS)
        options = {"cfg_scale": args.cfg, "temperature": args.temperature, "steps": args.steps,
                   "top_k": args.top_k, "best_of": args.best_of or 1,
                   "progress": not args.no_progress}  # fmt: skip
        card = {"model": str(args.model), "prompts_file": str(args.prompts_file),
                "device": args.device, "dtype": args.dtype}  # fmt: skip
        run = write_geneval(
            pipe, prompts, args.out, n_samples=args.n_samples or 4, batch_size=args.batch_size,
            seed=args.seed, options={k: v for k, v in options.items() if k != "progress"},
            card=card, progress=not args.no_progress,
        )  # fmt: skip
    except CLI_ERRORS as err:
        print(f"error: {err}")
        return 2
    print(f"{args.out}: {run['written']} prompt folders written, {run['skipped']} already "
          f"complete ({run['n_samples']} samples each); run card: {run['card']}")  # fmt: skip
    return 0


# -- answer --------------------------------------------------------------------------------------
def _answer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("questions", nargs="+", help="one answer per question")
    _model_options(parser)
    parser.add_argument(
        "--image", action="append", default=None,
        help="picture the question is about: once for all questions, or once per question; "
        "without --image a FUDOKI model replies to the text alone (UniFluid needs a picture)",
    )  # fmt: skip
    parser.add_argument(
        "--answer-tokens", type=int_in_range(1, 4096), default=None,
        help="answer length in tokens; default: FUDOKI with --image: the checkpoint's (or the "
        "official layout, filling the text budget); FUDOKI without --image: what the text "
        "budget leaves after the prompt, at most 64; UniFluid: the checkpoint's (at most)",
    )  # fmt: skip
    parser.add_argument(
        "--trajectory", action="store_true",
        help="FUDOKI only: also print the answer after every solver step",
    )  # fmt: skip
    parser.add_argument(
        "--beams", type=int_in_range(1, 16), default=None,
        help="UniFluid only: beam search width; not given: 1 (greedy)",
    )  # fmt: skip
    parser.add_argument("--out", type=output_dir, default=None, help="also write answers.json here")


def _run_answer(args: argparse.Namespace) -> int:
    images = args.image or []
    if len(images) not in (0, 1, len(args.questions)):
        print(
            f"error: {len(images)} --image for {len(args.questions)} questions; give one "
            "picture for all questions or one per question"
        )
        return 2
    pictures = images * len(args.questions) if len(images) == 1 else images
    try:
        pipe = _load_for_cli(args)
        # Without a picture a family that generates text replies to the text alone.
        task = "generate_text" if not images and pipe.supports("generate_text") else "answer"
        given = {"steps": args.steps, "return_trajectory": args.trajectory, "beams": args.beams}
        pipe.refuse_options(task, given, _FLAGS)
        if task == "answer" and not images:
            raise ValueError(f"a {pipe.display_name} checkpoint answers questions about a "
                             "picture: give --image")  # fmt: skip
        length = "answer_tokens" if task == "answer" else "max_tokens"
        options = pipe.select_options(task, {
            length: args.answer_tokens, "steps": args.steps, "seed": args.seed,
            "return_trajectory": args.trajectory, "progress": not args.no_progress,
            "beams": args.beams or 1,
        })  # fmt: skip
        if task == "answer":
            result = pipe.answer(pictures, args.questions, **options)
        else:
            result = pipe.generate_text(args.questions, **options)
    except CLI_ERRORS as err:
        print(f"error: {err}")
        return 2
    return _print_answers(args, result)


def _print_answers(args: argparse.Namespace, result: Any) -> int:
    import json

    records = []
    for i, (question, answer) in enumerate(zip(args.questions, result.texts, strict=True)):
        records.append({"question": question, "answer": answer})
        print(f"Q: {question}\nA: {answer}")
        if result.trajectory is not None:
            records[-1]["trajectory"] = result.trajectory[i]
            for step, text in enumerate(result.trajectory[i]):
                print(f"   step {step:3d}: {text!r}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "answers.json").write_text(json.dumps(records, indent=1, ensure_ascii=False))
    return 0


# -- edit ----------------------------------------------------------------------------------------
def _edit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("instructions", nargs="+", help="one edited picture per instruction")
    _model_options(parser, steps=False)
    parser.add_argument(
        "--image", action="append", required=True,
        help="the picture to edit: once for all instructions, or once per one",
    )  # fmt: skip
    parser.add_argument(
        "--temperature", type=finite_float(0.0), default=None,
        help="the diffusion head's noise scale, >= 0; default: the checkpoint's",
    )  # fmt: skip
    parser.add_argument("--out", type=output_dir, default=Path("outputs/edit"),
                        help="folder for the edited pictures")  # fmt: skip
    parser.add_argument("--scale", type=int_in_range(1, 32), default=DEFAULT_SCALE,
                        help="enlarge the written pictures (nearest neighbour)")  # fmt: skip
    parser.add_argument("--no-gif", action="store_true",
                        help="skip the token-by-token GIF of each edit")  # fmt: skip


def _run_edit(args: argparse.Namespace) -> int:
    images = args.image
    if len(images) not in (1, len(args.instructions)):
        print(f"error: {len(images)} --image for {len(args.instructions)} instructions")
        return 2
    try:
        pipe = _load_for_cli(args)
        if not pipe.supports("edit"):
            from kineflow.pipelines.base import registered

            editors = " / ".join(cls.display_name for cls in registered() if cls.supports("edit"))
            raise ValueError(f"{args.model} is not a {editors} checkpoint; only {editors} edits")
        pictures = images * len(args.instructions) if len(images) == 1 else images
        result = pipe.edit(pictures, args.instructions, temperature=args.temperature,
                           seed=args.seed, return_trajectory=not args.no_gif,
                           progress=not args.no_progress)  # fmt: skip
        written = result.save(args.out, prefix="edit", scale=args.scale)
    except CLI_ERRORS as err:
        print(f"error: {err}")
        return 2
    for path in written:
        print(path)
    return 0


# -- showcase ------------------------------------------------------------------------------------
def _showcase_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="checkpoints/fudoki-shapes",
        help="checkpoint folder, FUDOKI or UniFluid (default: the tiny FUDOKI model shipped in "
        "the repository; checkpoints/unifluid-shapes is the UniFluid one)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=output_dir, default=Path("outputs/showcase"), help="output folder"
    )
    parser.add_argument("--seeds", type=int_in_range(1, 64), default=4, help="pictures per prompt")
    parser.add_argument(
        "--vqa", type=int_in_range(0, 10000), default=24, help="test questions to answer"
    )
    parser.add_argument(
        "--edits", type=int_in_range(0, 10000), default=8,
        help="UniFluid only: test pictures to edit (FUDOKI does not edit)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=int_in_range(1, 10000), default=None,
        help="FUDOKI only: solver steps; default: the checkpoint's",
    )  # fmt: skip
    parser.add_argument(
        "--cfg-scale", type=float, default=None,
        help="classifier-free guidance w of the pictures; default: the checkpoint's",
    )  # fmt: skip
    parser.add_argument(
        "--best-of", type=int_in_range(1, 64), default=1,
        help="draw N candidates per picture and show the one the model itself rates likeliest "
        "to show the prompt (the detector only grades); default: 1",
    )  # fmt: skip
    parser.add_argument("--device", type=device_name, default=None, help=DEVICE_FORMS)
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32",
        help="model precision; float64 draws the same pictures across CPUs (make demo)",
    )  # fmt: skip


def _run_showcase(args: argparse.Namespace) -> int:
    import torch

    from kineflow.apps.showcase import format_showcase, run_showcase

    try:
        run_showcase(
            args.model,
            args.out,
            seeds=args.seeds,
            vqa_items=args.vqa,
            edit_items=args.edits,
            steps=args.steps,
            cfg_scale=args.cfg_scale,
            best_of=args.best_of,
            device=args.device,
            dtype=getattr(torch, args.dtype),
        )
    except CLI_ERRORS as err:
        print(f"error: {err}")
        return 2
    print(format_showcase(args.out))
    return 0


# -- the commands (kineflow.cli assembles them with the other groups) ---------------------------
COMMANDS: list[Command] = [
    Command(
        name="showcase",
        help="the main job: text-to-image, VQA and (UniFluid) editing with a shipped tiny "
        "FUDOKI or UniFluid model",
        description="Generate pictures for one prompt per ShapesWorld category (plus a "
        "held-out composition), check them with the detector, write GIFs of the pictures being "
        "made (FUDOKI: every solver step; UniFluid: the tokens arriving), answer test questions "
        "and, with a UniFluid checkpoint, edit test pictures. Default: the FUDOKI checkpoint in "
        "the repository; --model checkpoints/unifluid-shapes for the UniFluid one.",
        options=_showcase_options,
        handler=_run_showcase,
    ),
    Command(
        name="generate",
        help="text-to-image with a FUDOKI or UniFluid checkpoint (PNG per prompt + GIF)",
        description="Sample one picture per prompt with a FUDOKI or UniFluid checkpoint (the "
        "family is read from it), e.g. 'kineflow generate --model ckpt \"a red circle above a "
        "blue square\"'. Writes sample_{i}.png, sample_{i}_refine.gif and a strip of it (FUDOKI: "
        "every solver step; UniFluid: the tokens arriving in generation order). --steps and "
        "--top-k apply to FUDOKI only; --cfg, --temperature and --best-of (keep the best of N "
        "candidates as the model itself judges them) to both.",
        options=_generate_options,
        handler=_run_generate,
    ),
    Command(
        name="answer",
        help="answer questions about a picture (FUDOKI or UniFluid) or reply to text (FUDOKI)",
        description="Image understanding with a FUDOKI or UniFluid checkpoint: 'kineflow "
        'answer --model ckpt --image pic.png "how many shapes are there?"\'. Without --image a '
        "FUDOKI model replies to the text alone. --steps and --trajectory apply to FUDOKI (which "
        "answers with its flow solver), --beams to UniFluid (which decodes left to right).",
        options=_answer_options,
        handler=_run_answer,
    ),
    Command(
        name="edit",
        help="edit a picture by an instruction with a UniFluid checkpoint",
        description="'kineflow edit --model ckpt --image pic.png \"make the circle cyan.\"' "
        "writes edit_{i}.png per instruction (UniFluid checkpoints only; FUDOKI does not edit).",
        options=_edit_options,
        handler=_run_edit,
    ),
]
