"""End-to-end inference speed and peak memory of :class:`kineflow.pipelines.FudokiPipeline`.

What is measured
----------------
Whole pipeline calls, as a user makes them, on randomly initialised models (speed and memory
do not depend on the weights' values):

* ``text_to_image``: ``pipe.text_to_image(prompts, steps=S, cfg_scale=w, seed=0)`` with
  classifier-free guidance (``w = 5``: every model call runs the conditional and the
  unconditional sequence, i.e. a doubled batch) and without (``w = 0``), one ShapesWorld
  caption per row (different prompt lengths, so rows are left-padded as in real use).
* ``answer``: ``pipe.answer(images, questions, steps=S, answer_tokens=A, seed=0)``, one
  rendered ShapesWorld scene and its VQA question per row; greedy targets, as FUDOKI.

For every (task, batch size) the pipeline's own ``timings`` are reported per model call
(``nfe`` = S): ``model_s_per_step`` (time inside the model forwards, CFG's doubled batch and
the heads included), ``solver_s_per_step`` (the rest of the sampling loop: target sampling,
jump rates, jumps), plus ``decode_s`` (VQ decode + PIL for images; cutting at EOS and detokenising
for answers) and ``other_s`` = wall time of the call minus the three, i.e. layout building,
understanding preprocessing and the SigLIP encoder (run once per call, outside the solver's
clock), CFG's unconditional copy. ``items_per_s`` = batch / wall time of the whole call
(images/s or answers/s).

Configurations
--------------
* tiny (default): a model the size of the ShapesWorld demo models: Llama backbone hidden 128,
  4 layers, 4 heads, MLP 512, text vocab = the tokenizer's (a byte-level BPE trained on the
  ShapesWorld corpus: 411 tokens, where its merges run out); SigLIP 32 px, patch 8 (16
  understanding tokens), width 64, 2 layers; VQ codebook 512 x 8, ``channel_mult (1, 2, 2)``
  at 32 px (8 x 8 = 64 image tokens). ``text_budget`` 128, no system prompt. Both tasks at
  ``--batch-sizes`` (1, 4, 16, 64), ``--steps`` 8, ``answer_tokens`` 16.
* ``--real``: FUDOKI / Janus-1.3B's shapes (:meth:`FudokiConfig.janus_1_3b`: 24 layers,
  hidden 2048, text vocab 102400, SigLIP-L 384, VQ-16 with 16384 codes and 576 image tokens),
  random weights, batch 1: one text-to-image call with CFG (w = 5, a doubled ~600-token
  sequence) and one understanding call in the official layout (``answer_tokens=None``: the
  answer fills ``text_budget`` = 500, so every row is 500 + 576 tokens long), ``--steps``
  (default 2: one rate step from t = 0 and the final step to t = 1). The text tokenizer is
  the small ShapesWorld one (its ids are a subset of the model's 102400); the text *metric
  table* is the model's full [102400, 2048] input embedding table, as in FUDOKI. Also
  reported: parameter count, weights memory and the time to build the model.
  ``--dtype bfloat16`` casts the model (the metric tables stay float32, as the pipeline keeps
  them). Written to ``inference_real*.json``.

Timing
------
Each (task, batch size) runs in a fresh process (this script re-invoked with the hidden
``--worker`` flag) that builds the tokenizer (trained once by the parent and saved) and the
model (seeded), then: one small call of the same task (batch 1, one step) to set libraries
up; one full-size call whose peak memory is measured (it is also the timing warm-up, and is
reported as ``first_call_s``); ``--repeats`` timed calls (default 3, 1 with ``--real``), of
which each number is the median. ``torch.set_num_threads(--threads)`` (default 2) in the
workers only. On CUDA the pipeline synchronises around its model calls and the worker
around whole calls. The 1-minute load average at the start and end of each worker is
recorded: CPU timings are only comparable when nothing else ran on the machine.

Peak memory
-----------
As in ``bench/solver_speed.py``: on CPU torch's allocations are invisible to tracemalloc, so
``peak_call_mib = VmHWM_after − RSS_before`` of the measured call, where ``RSS_before`` is
the resident set size just before it (model, tokenizer, metric tables and the previous
calls' caches resident, free heap returned with ``malloc_trim``) and ``VmHWM`` the resident
high-water mark from ``/proc/self/status``, reset to the current RSS through
``/proc/self/clear_refs`` first (``peak_exact`` is false where that reset was refused and the
call did not set a new high-water mark). ``model_rss_mib`` is the RSS growth from building
the tokenizer, model and pipeline (weights and the pipeline's metric tables);
``weights_mib`` the bytes of the parameters and buffers. On CUDA ``peak_call_mib`` is
``torch.cuda.max_memory_allocated()`` (reset before the call) minus the memory allocated
before it.

Usage::

    python bench/inference.py                       # tiny suite -> results/inference.json
    python bench/inference.py --real                # Janus-1.3B shapes -> inference_real.json
    python bench/inference.py --device cuda --real  # bfloat16 by default on CUDA

One JSON object goes to stdout (and ``--out``), progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kineflow.data.shapes.dataset import ShapesWorld, corpus, draw_item
from kineflow.data.shapes.render import render_image
from kineflow.data.shapes.scene import Scene
from kineflow.models.fudoki import FudokiConfig, FudokiModel
from kineflow.models.llama import LlamaConfig
from kineflow.models.siglip import SiglipConfig
from kineflow.pipelines import FudokiPipeline, FudokiPipelineConfig
from kineflow.tokenizers.autoencoder import AutoencoderConfig
from kineflow.tokenizers.text import TextTokenizer, train_text_tokenizer
from kineflow.tokenizers.vq import VQConfig

# bench/ holds scripts, not a package: make the shared helpers importable however we are run.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import (
    high_water_bytes,
    release_free_memory,
    reset_high_water_mark,
    rss_bytes,
)

MIB = float(1 << 20)
RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_VOCAB = 1000
TINY_TEXT_BUDGET = 128
REAL_TEXT_BUDGET = 500


def log(message: str) -> None:
    print(f"[inference] {message}", file=sys.stderr, flush=True)


# -- models ---------------------------------------------------------------------------------------
def tiny_config(vocab_size: int) -> FudokiConfig:
    """The ShapesWorld-demo-sized FUDOKI (see the module docstring)."""
    D = 128
    return FudokiConfig(
        language=LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=D,
            intermediate_size=4 * D,
            num_hidden_layers=4,
            num_attention_heads=4,
        ),
        vision=SiglipConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        gen_vision=VQConfig(
            autoencoder=AutoencoderConfig(
                channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=8
            ),
            codebook_size=512,
            codebook_dim=8,
            image_size=32,
        ),
        aligner_hidden=D,
        gen_aligner_hidden=D,
        gen_head_hidden=D,
    )


def build_pipeline(
    model_kind: str, tokenizer: TextTokenizer, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[FudokiPipeline, dict]:
    """The pipeline (model built directly on ``device`` in float32, then cast in place, so no
    second copy of the weights is ever held) and facts about the model."""
    config = (
        tiny_config(tokenizer.vocab_size) if model_kind == "tiny" else FudokiConfig.janus_1_3b()
    )
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.device(device):
        model = FudokiModel(config)
    model.to(dtype=dtype)
    build_s = time.perf_counter() - start
    budget = TINY_TEXT_BUDGET if model_kind == "tiny" else REAL_TEXT_BUDGET
    pipe = FudokiPipeline(
        model,
        tokenizer,
        model.language_model.model.embed_tokens.weight,  # the full [V, D] text metric table
        model.gen_vision_model.quantize.embedding.weight,
        FudokiPipelineConfig(text_budget=budget, system_prompt=""),
    )
    tensors = [*model.parameters(), *model.buffers()]
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_mib": round(sum(t.numel() * t.element_size() for t in tensors) / MIB, 1),
        "build_s": round(build_s, 2),
        "text_vocab": config.language.vocab_size,
        "tokenizer_vocab": tokenizer.vocab_size,
        "hidden_size": config.language.hidden_size,
        "layers": config.language.num_hidden_layers,
        "image_tokens": config.image_token_count,
        "understanding_tokens": config.understanding_token_count,
        "codebook": [config.gen_vision.codebook_size, config.gen_vision.codebook_dim],
        "text_budget": budget,
    }
    return pipe, info


# -- inputs ---------------------------------------------------------------------------------------
def prompts_for(batch: int) -> list[str]:
    """``batch`` ShapesWorld captions (text-to-image prompts), deterministic."""
    world = ShapesWorld()
    return [draw_item(world, "t2i", "test", i).texts["caption"] for i in range(batch)]


def questions_for(batch: int, image_size: int) -> tuple[list, list[str]]:
    """``batch`` rendered ShapesWorld scenes and their VQA questions, deterministic (rendered
    at most at 64 px, ShapesWorld's largest size; the pipeline resizes them to the encoder's)."""
    world = ShapesWorld()
    items = [draw_item(world, "vqa", "test", i) for i in range(batch)]
    size = 32 if image_size <= 32 else 64
    images = [render_image(Scene.from_key(it.scene_key), size) for it in items]
    return images, [it.texts["question"] for it in items]


# -- memory (see the module docstring) ------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(call: Callable[[], Any], device: torch.device) -> tuple[Any, float, dict]:
    """Run ``call`` once; its result, its wall time and its peak memory beyond what was
    allocated before it."""
    release_free_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = call()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) - before
        return (
            result,
            wall,
            {
                "peak_call_mib": round(peak / MIB, 1),
                "allocated_before_mib": round(before / MIB, 1),
                "peak_method": "cuda_max_allocated - allocated_before",
            },
        )
    reset = reset_high_water_mark()
    rss_before = rss_bytes()
    high_before, _ = high_water_bytes()
    start = time.perf_counter()
    result = call()
    wall = time.perf_counter() - start
    high_after, counter = high_water_bytes()
    return (
        result,
        wall,
        {
            "peak_call_mib": round(max(0, high_after - rss_before) / MIB, 1),
            "rss_before_mib": round(rss_before / MIB, 1),
            "peak_rss_mib": round(high_after / MIB, 1),
            "peak_method": f"{counter} - rss_before" + (" (hwm reset)" if reset else ""),
            "peak_exact": bool((reset and counter == "VmHWM") or high_after > high_before),
        },
    )


# -- one configuration in a fresh process ---------------------------------------------------------
def _task_call(
    pipe: FudokiPipeline, task: str, batch: int, steps: int, cfg: float, answer_tokens: int | None
) -> Callable[[], Any]:
    if task == "text_to_image":
        prompts = prompts_for(batch)
        return lambda: pipe.text_to_image(prompts, steps=steps, cfg_scale=cfg, seed=0)
    vision = pipe.model.config.vision
    images, questions = questions_for(batch, vision.image_size)
    return lambda: pipe.answer(images, questions, steps=steps, answer_tokens=answer_tokens, seed=0)


def _summary(task: str, batch: int, runs: list[tuple[float, dict]], extra: dict) -> dict:
    """Medians over the timed calls of the per-step split, decode, other and throughput."""
    nfe = runs[0][1]["nfe"]

    def med(values: list[float]) -> float:
        return statistics.median(values)

    wall = [w for w, _ in runs]
    model = [t["model_s"] for _, t in runs]
    solver = [t["solver_s"] for _, t in runs]
    decode = [t["decode_s"] for _, t in runs]
    other = [w - t["model_s"] - t["solver_s"] - t["decode_s"] for w, t in runs]
    out = {
        "task": task,
        "batch": batch,
        "nfe": int(nfe),
        "model_s_per_step": round(med(model) / nfe, 5),
        "solver_s_per_step": round(med(solver) / nfe, 5),
        "solver_share": round(med(solver) / (med(model) + med(solver)), 3),
        "decode_s": round(med(decode), 5),
        "other_s": round(med(other), 5),
        "call_s": round(med(wall), 4),
        "items_per_s": round(batch / med(wall), 3),
        "repeats": len(runs),
    }
    out.update(extra)
    return out


def run_worker(spec: dict) -> dict:
    """Measure the tasks of ``spec`` for one model in this (fresh) process."""
    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    load_start = round(os.getloadavg()[0], 2)
    release_free_memory()
    rss0 = rss_bytes()
    tokenizer = TextTokenizer.load(spec["tokenizer"])
    pipe, info = build_pipeline(spec["model"], tokenizer, device, dtype, spec["seed"])
    release_free_memory()
    info["model_rss_mib"] = round((rss_bytes() - rss0) / MIB, 1)
    if device.type == "cuda":
        info["model_cuda_allocated_mib"] = round(torch.cuda.memory_allocated(device) / MIB, 1)
    log(f"  built {spec['model']} model: {info}")
    results = []
    for job in spec["jobs"]:
        task, batch, cfg = job["task"], job["batch"], job.get("cfg_scale", 0.0)
        steps, answer_tokens = spec["steps"], spec["answer_tokens"]
        # Library set-up (thread pools, kernels) on a small call: of the same task for the tiny
        # model; a 4-token text generation for the real one (any image call is full-size).
        if spec["model"] == "tiny":
            _task_call(pipe, task, 1, 1, cfg, answer_tokens)()
        else:
            pipe.generate_text(["a red circle"], max_tokens=4, steps=1, seed=0)
        _sync(device)
        call = _task_call(pipe, task, batch, steps, cfg, answer_tokens)
        result, first_s, memory = measure_peak(call, device)
        extra: dict = {"first_call_s": round(first_s, 4), **memory}
        if task == "text_to_image":
            extra["cfg_scale"] = cfg
        else:
            extra["answer_tokens"] = answer_tokens
        runs = []
        for _ in range(spec["repeats"]):
            _sync(device)
            start = time.perf_counter()
            out = call()
            _sync(device)
            runs.append((time.perf_counter() - start, dict(out.timings)))
        summary = _summary(task, batch, runs, extra)
        if task == "answer":
            # The slots the solver fills per row (the official layout fills the text budget).
            summary["answer_slots"] = answer_tokens or _official_slots(pipe, batch)
        log(
            f"  {task} B={batch}"
            + (f" w={cfg:g}" if task == "text_to_image" else "")
            + f": model {summary['model_s_per_step']:.4f} s/step, solver "
            f"{summary['solver_s_per_step']:.4f} s/step, decode {summary['decode_s']:.4f} s, "
            f"{summary['items_per_s']:.2f} items/s, peak +{summary['peak_call_mib']} MiB"
        )
        results.append(summary)
        del result, out
    return {
        "model": info,
        "results": results,
        "load_average_1min": [load_start, round(os.getloadavg()[0], 2)],
    }


def _official_slots(pipe: FudokiPipeline, batch: int) -> int:
    from kineflow.inputs.layout import understanding_layout

    _, questions = questions_for(batch, 32)
    layout = understanding_layout(
        pipe.tokenizer,
        questions,
        pipe.model.config.understanding_token_count,
        pipe.config.text_budget,
        None,
        pipe.config.system_prompt,
    )
    return int(layout.region.sum(-1).max())


def _spawn_worker(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {spec['jobs']} failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- command line ---------------------------------------------------------------------------------
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="model dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="solver steps (default 8 tiny, 2 --real)"
    )
    parser.add_argument(
        "--batch-sizes", default=None, help="comma-separated (default 1,4,16,64 tiny, 1 --real)"
    )
    parser.add_argument("--cfg-scales", default="5,0", help="text-to-image guidance weights")
    parser.add_argument("--answer-tokens", type=int, default=16, help="tiny understanding slots")
    parser.add_argument("--tasks", default="text_to_image,answer", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (3 tiny, 1 real)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the workers")
    parser.add_argument(
        "--real", action="store_true", help="Janus-1.3B shapes, random weights (slow on CPU)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default=None, help="free text stored as the JSON's 'note'")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _jobs(args: argparse.Namespace, tasks: list[str], batches: list[int]) -> list[list[dict]]:
    """Groups of jobs, one group per worker process."""
    cfgs = [float(w) for w in args.cfg_scales.split(",") if w.strip()]
    if args.real:
        # One process for everything: the 1.5B model is built once.
        group = []
        for batch in batches:
            if "text_to_image" in tasks:
                group += [{"task": "text_to_image", "batch": batch, "cfg_scale": w} for w in cfgs]
            if "answer" in tasks:
                group.append({"task": "answer", "batch": batch})
        return [group]
    groups = []
    if "text_to_image" in tasks:
        for w in cfgs:
            groups += [[{"task": "text_to_image", "batch": b, "cfg_scale": w}] for b in batches]
    if "answer" in tasks:
        groups += [[{"task": "answer", "batch": b}] for b in batches]
    return groups


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print one JSON object to stdout."""
    args = _parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    steps = args.steps or (2 if args.real else 8)
    repeats = args.repeats or (1 if args.real else 3)
    default_batches = "1" if args.real else "1,4,16,64"
    batches = [int(b) for b in (args.batch_sizes or default_batches).split(",") if b.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or set(tasks) - {"text_to_image", "answer"}:
        raise SystemExit(f"--tasks must name text_to_image and/or answer, got {args.tasks!r}")
    if steps < 1 or repeats < 1 or not batches or min(batches) < 1:
        raise SystemExit("--steps, --repeats and the batch sizes must be positive")
    model_kind = "real" if args.real else "tiny"
    answer_tokens = None if args.real else args.answer_tokens
    name = "inference_real" if args.real else "inference"
    suffix = "" if device.type == "cpu" and dtype == "float32" else f"_{device.type}_{dtype}"
    out_path = Path(args.out) if args.out else RESULTS / f"{name}{suffix}.json"

    start = time.perf_counter()
    texts = corpus(n=2000)
    tokenizer = train_text_tokenizer(texts, vocab_size=TOKENIZER_VOCAB)
    log(f"tokenizer: {tokenizer.vocab_size} tokens trained on {len(texts)} ShapesWorld texts")
    report: dict = {
        "model": model_kind,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": dtype,
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "steps": steps,
        "repeats": repeats,
        "answer_tokens": answer_tokens,
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }
    if args.note:
        report["note"] = args.note
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="inference_bench_") as tmp:
        tokenizer.save(tmp)
        for group in _jobs(args, tasks, batches):
            log(f"{model_kind}: measuring {group} in a fresh process")
            spec = {
                "model": model_kind,
                "tokenizer": tmp,
                "device": str(device),
                "dtype": dtype,
                "threads": args.threads,
                "seed": args.seed,
                "steps": steps,
                "repeats": repeats,
                "answer_tokens": answer_tokens,
                "jobs": group,
            }
            worker = _spawn_worker(spec)
            report.setdefault("model_info", worker["model"])
            for r in worker["results"]:
                r["load_average_1min"] = worker["load_average_1min"]
            results += worker["results"]
    report["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    report["total_s"] = round(time.perf_counter() - start, 1)
    report["results"] = results
    text = json.dumps(report, indent=2)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text + "\n")
    print(text)
    log(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
