"""Training throughput: samples/s, tokens/s, MFU, data wait, peak memory, DFM / AR step ratio.

What is measured
----------------
* ``tiny`` (default): ``kineflow train fudoki`` / ``unifluid`` on the shipped tiny configs
  (``configs/fudoki_shapes.yaml``, ``configs/unifluid_shapes.yaml``) for ``--steps`` steps,
  through the public trainers (``train_fudoki`` / ``train_unifluid``): the whole data path
  (ShapesWorld rendering, frozen VQ / KL-VAE, text encoding, corruption) and the model step.
  Each run is measured twice in the same invocation: with ``optim.loader_workers`` =
  ``--baseline-workers`` (default 0: the in-process data path every run used before loader
  workers existed) and = ``--workers``. For FUDOKI the ``ar`` objective runs too (the DFM /
  AR step ratio, same data path, same model). ``--baseline-repo DIR`` also times an older
  checkout's data path (``baseline_repo``: e.g. the commit before batches were corrupted on the
  device), ``--shards DIR`` encodes the runs' samples (``kineflow data encode``) and times
  training from them (``shards_workers_N``: no renderer or frozen encoder per step), and
  with ``--pack`` also with packed rows (``shards_packed_workers_N``, FUDOKI: ``data.pack``,
  rows of ``--pack-length`` tokens); each reports its samples/s over the older checkout's.
  ``--compile`` also times the in-process run with ``optim.compile: true``
  (``compiled_workers_N``; ``compiled_over_eager``: its samples/s over the eager run's; give a
  ``--warmup`` that covers the compilation and the recompiles of the first batch shapes).
  On the CPU the loader workers share the cores
  with the training process, whose threads are cut to ``--threads − workers`` in those runs
  (``--oversubscribe`` keeps them: OpenMP threads competing with the workers for the cores
  can make a step several times slower).
* ``--real`` (CUDA): a FUDOKI model of Janus-1.3B's shapes (random weights, VQ and SigLIP
  frozen), B = 8 sequences of 64 text + 576 image tokens, bf16 autocast, fused AdamW: the
  model step alone (synthetic ids), with ``mask="full"`` (DFM) and ``mask="causal"`` (AR);
  ``--compile`` adds the DFM step of ``torch.compile(model)`` (``dfm_compiled``).

Numbers
-------
Step time: from the per-step wall-clock stamps in ``metrics.jsonl`` (``log_every = 1``), the
mean over the steps after the first ``--warmup`` (so the final checkpoint, the process start
and the loader's start-up are not counted; ``seconds_per_step_all`` counts them). ``--real``:
the median of timed steps after ``--warmup`` untimed ones. ``tokens_per_step``: tokens
through the Llama backbone per optimizer step (counted by wrapping ``LlamaModel.forward``).
``mfu = 6 · params · tokens/s / peak``, ``params`` the trainable parameters,
``peak = --peak-tflops`` (null: no MFU). ``data_wait_share``: the loop's ``data_seconds`` (time
spent building batches or waiting for the loader workers, incl. the copy to the device) over
the run's seconds. ``peak_memory_mb``: ``ru_maxrss`` of the process (CPU) or
``torch.cuda.max_memory_allocated`` (CUDA). Every measurement runs in a fresh process (this
script with the hidden ``--measure`` flag); the 1-minute load average at start and end is
reported: the CPU figures are only comparable when nothing else runs on the machine.

Output: one JSON object on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"fudoki": "configs/fudoki_shapes.yaml", "unifluid": "configs/unifluid_shapes.yaml"}


def log(message: str) -> None:
    print(f"[train_throughput] {message}", file=sys.stderr, flush=True)


def _count_tokens() -> dict[str, int]:
    """Wrap ``LlamaModel.forward`` to count the tokens of every training forward."""
    import torch

    from kineflow.models.llama import LlamaModel

    counter = {"tokens": 0}
    forward = LlamaModel.forward

    def counted(self, input_ids=None, inputs_embeds=None, *args, **kwargs):
        x = input_ids if input_ids is not None else inputs_embeds
        if torch.is_grad_enabled() and self.training:
            counter["tokens"] += int(x.shape[0] * x.shape[1])
        return forward(self, input_ids, inputs_embeds, *args, **kwargs)

    LlamaModel.forward = counted
    return counter


def _count_params() -> dict[str, int]:
    """Record the trainable parameters of the model the loop wraps."""
    import kineflow.train.loop as loop

    seen = {"params": 0}
    wrap = getattr(loop, "wrap_model", None)
    if wrap is None:  # an older checkout (--baseline-repo): its loop wraps the model inline
        return seen

    def counting(model, *args, **kwargs):
        seen["params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return wrap(model, *args, **kwargs)

    loop.wrap_model = counting
    return seen


def measure_tiny(spec: dict[str, Any]) -> dict[str, Any]:
    """One tiny-config training run (in this process); see the module docstring."""
    import torch

    torch.set_num_threads(spec["threads"])
    tokens, params = _count_tokens(), _count_params()
    kind = spec["model"]
    if kind == "fudoki":
        from kineflow.train.fudoki import FudokiTrainConfig as Config
        from kineflow.train.fudoki import train_fudoki as train
    else:
        from kineflow.train.unifluid import UnifluidTrainConfig as Config
        from kineflow.train.unifluid import train_unifluid as train
    import yaml

    raw = yaml.safe_load((REPO / CONFIGS[kind]).read_text())
    # Packing is this run's choice, not the config's (an older checkout has no such key).
    data = raw.setdefault("data", {})
    data.pop("pack", None), data.pop("pack_length", None)
    if spec.get("pack"):
        data.update(pack=True, pack_length=spec.get("pack_length"))
    config = Config.from_dict(raw)
    with tempfile.TemporaryDirectory() as out:
        config.out = out
        config.log_every, config.ckpt_every = 1, 10**6
        o = config.optim
        o.steps, o.loader_workers, o.device = spec["steps"], spec["workers"], spec["device"]
        o.compile = bool(spec.get("compile"))
        if spec.get("batch_size"):
            o.batch_size = spec["batch_size"]
        if spec.get("objective"):
            config.objective.kind = spec["objective"]
        if spec.get("shards"):
            config.data.shards = spec["shards"]
        for name in ("vq", "vae", "vision", "text_tokenizer"):
            if isinstance(getattr(config, name, None), str):
                setattr(config, name, str(REPO / getattr(config, name)))
        summary = train(config, progress=False)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").open()]
    # The mean over the steps after the warm-up ("seconds" is rounded to 10 ms per row).
    seconds = [r["seconds"] for r in rows]
    step_s = (seconds[-1] - seconds[spec["warmup"] - 1]) / (len(seconds) - spec["warmup"])
    per_step_tokens = tokens["tokens"] / spec["steps"]
    result = {
        "seconds_per_step": round(step_s, 4),
        "samples_per_s": round(o.batch_size / step_s, 2),
        "tokens_per_step": per_step_tokens,
        "tokens_per_s": round(per_step_tokens / step_s, 1),
        "trainable_params": params["params"],
        # None for a checkout from before the loop timed its data (--baseline-repo).
        "data_wait_share": round(summary["data_seconds"] / summary["seconds_this_run"], 3)
        if "data_seconds" in summary
        else None,
        "seconds_per_step_all": round(summary["seconds_this_run"] / spec["steps"], 4),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "batch_size": o.batch_size,
    }
    if spec["device"].startswith("cuda"):
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def measure_real(spec: dict[str, Any]) -> dict[str, Any]:
    """The model step at Janus-1.3B shapes (``spec["size"]="tiny"``: a tiny config, for tests)."""
    import torch
    import torch.nn.functional as F

    from kineflow.models.fudoki import FudokiConfig, FudokiModel

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    if spec.get("size") == "tiny":
        config = FudokiConfig.from_dict(json.loads(spec["tiny_config"]))
    else:
        config = FudokiConfig.janus_1_3b()
    model = FudokiModel(config).to(device)
    for name in ("gen_vision_model", "vision_model"):  # frozen, as in training
        if getattr(model, name, None) is not None:
            getattr(model, name).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)
    B, n_text, n_img = spec["batch_size"], spec["text_tokens"], spec["image_tokens"]
    N = n_text + n_img
    V, K = config.language.vocab_size, config.gen_vision.codebook_size
    ids = torch.randint(0, V, (B, N), device=device)
    image_ids = torch.randint(0, K, (B, N), device=device)
    image_at = torch.zeros(B, N, dtype=torch.bool, device=device)
    image_at[:, n_text:] = True
    text_at = ~image_at
    text_at[:, 0] = False
    result: dict[str, Any] = {"trainable_params": sum(p.numel() for p in params)}
    steps = [("dfm", "full", model), ("ar", "causal", model)]
    if spec.get("compile"):
        steps.append(("dfm_compiled", "full", torch.compile(model)))
    for name, mask, runner in steps:
        times = []
        for _ in range(spec["warmup"] + spec["steps"]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                tl, il = runner(ids, image_ids=image_ids, image_mask=image_at, mask=mask,
                                heads=(text_at, image_at))  # fmt: skip
                loss = F.cross_entropy(tl.float(), ids[text_at]) + F.cross_entropy(
                    il.float(), image_ids[image_at]
                )
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        step_s = statistics.median(times[spec["warmup"] :])
        result[name] = {
            "seconds_per_step": round(step_s, 4),
            "samples_per_s": round(B / step_s, 2),
            "tokens_per_s": round(B * N / step_s, 1),
        }
    result["tokens_per_step"] = B * N
    result["dfm_over_ar_step"] = round(
        result["dfm"]["seconds_per_step"] / result["ar"]["seconds_per_step"], 3
    )
    if device.type == "cuda":
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        result["peak_memory_mb"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        )
    return result


def fresh(spec: dict[str, Any], repo: Path = REPO) -> dict[str, Any]:
    """``spec`` measured in a new process importing kineflow from ``repo`` (this checkout, or
    an older one for ``--baseline-repo``)."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    cmd = [sys.executable, __file__, "--measure", json.dumps(spec)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement {spec} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mfu(result: dict[str, Any], tokens_per_s: float, peak_tflops: float | None) -> float | None:
    if not peak_tflops:
        return None
    return round(6 * result["trainable_params"] * tokens_per_s / (peak_tflops * 1e12), 4)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=["fudoki"])
    p.add_argument("--steps", type=int, default=8, help="training steps per run (tiny)")
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    p.add_argument("--batch-size", type=int, default=None, help="override optim.batch_size")
    p.add_argument("--workers", type=int, default=2, help="loader workers of the new path")
    p.add_argument(
        "--baseline-repo",
        default=None,
        help="a checkout of an older kineflow: also time its data path (0 workers)",
    )
    p.add_argument(
        "--shards",
        default=None,
        help="a folder: encode the runs' samples there and time training from shards",
    )
    p.add_argument("--baseline-workers", type=int, default=0,
                   help="loader workers of the baseline (0: the old in-process path)")  # fmt: skip
    p.add_argument(
        "--oversubscribe",
        action="store_true",
        help="CPU: keep --threads with workers (default: threads - workers)",
    )
    p.add_argument("--no-ar", action="store_true", help="skip the FUDOKI AR objective run")
    p.add_argument(
        "--pack",
        action="store_true",
        help="also time FUDOKI from shards with packed rows (data.pack)",
    )
    p.add_argument("--pack-length", type=int, default=None,
                   help="data.pack_length of the packed run (default: longest sample)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)))
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak bf16 TFLOP/s for MFU (H100 SXM dense: 989)")  # fmt: skip
    p.add_argument("--real", action="store_true", help="Janus-1.3B shapes (model step only)")
    p.add_argument("--real-size", default="janus", choices=["janus", "tiny"],
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--tiny-config", default="{}", help=argparse.SUPPRESS)
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time the step with torch.compile (optim.compile)",
    )
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. the machine)")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps <= args.warmup:
        p.error("--warmup must be >= 1 and below --steps")
    return args


def _encode_shards(model: str, args: argparse.Namespace) -> Path:
    """``kineflow data encode`` the samples the measured run reads (once per model)."""
    import yaml

    out = Path(args.shards) / model
    if (out / "index.json").is_file():
        return out
    config = yaml.safe_load((REPO / CONFIGS[model]).read_text())
    batch = args.batch_size or config["optim"]["batch_size"]
    for name in ("vq", "vae", "vision", "text_tokenizer"):
        if isinstance(config.get(name), str):
            config[name] = str(REPO / config[name])
    config_file = Path(args.shards) / f"{model}.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "kineflow", "data", "encode", "--config", str(config_file),
           "--out", str(out), "--samples", str(batch * args.steps)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        spec = json.loads(args.measure)
        run = measure_real if spec["what"] == "real" else measure_tiny
        print(json.dumps(run(spec)))
        return 0
    import torch

    report: dict[str, Any] = {
        "torch": torch.__version__,
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "note": args.note,
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)
    base = {"what": "tiny", "steps": args.steps, "warmup": args.warmup, "device": args.device,
            "threads": args.threads, "batch_size": args.batch_size}  # fmt: skip
    if not args.real:
        for model in args.models:
            runs: dict[str, Any] = {}
            variants = [(f"workers_{args.baseline_workers}", args.baseline_workers, None),
                        (f"workers_{args.workers}", args.workers, None)]  # fmt: skip
            if args.baseline_repo:
                variants.insert(0, ("baseline_repo", 0, None))
            if args.shards:
                variants.append((f"shards_workers_{args.workers}", args.workers, None))
                if args.pack and model == "fudoki":
                    variants.append((f"shards_packed_workers_{args.workers}", args.workers, None))
            if model == "fudoki" and not args.no_ar:
                variants.append((f"ar_workers_{args.workers}", args.workers, "ar"))
            if args.compile:
                variants.append((f"compiled_workers_{args.baseline_workers}",
                                 args.baseline_workers, None))  # fmt: skip
            for name, workers, objective in variants:
                log(f"{model}: {name}")
                spec = {**base, "model": model, "workers": workers, "objective": objective,
                        "compile": name.startswith("compiled_")}  # fmt: skip
                if name.startswith("shards_"):
                    spec["shards"] = str(_encode_shards(model, args))
                spec["pack"], spec["pack_length"] = "_packed_" in name, args.pack_length
                if workers and args.device == "cpu" and not args.oversubscribe:
                    spec["threads"] = max(1, args.threads - workers)  # the cores are shared
                repo = Path(args.baseline_repo) if name == "baseline_repo" else REPO
                runs[name] = r = fresh(spec, repo)
                r["mfu"] = mfu(r, r["tokens_per_s"], args.peak_tflops)
                r["threads"] = spec["threads"]
            new, old = runs[f"workers_{args.workers}"], runs[f"workers_{args.baseline_workers}"]
            runs["speedup_samples_per_s"] = round(new["samples_per_s"] / old["samples_per_s"], 3)
            for name in (f"workers_{args.workers}", f"shards_workers_{args.workers}",
                         f"shards_packed_workers_{args.workers}"):  # fmt: skip
                if name in runs and "baseline_repo" in runs:
                    runs[f"{name}_over_baseline_repo"] = round(
                        runs[name]["samples_per_s"] / runs["baseline_repo"]["samples_per_s"], 3
                    )
            if args.compile:
                runs["compiled_over_eager"] = round(
                    runs[f"compiled_workers_{args.baseline_workers}"]["samples_per_s"]
                    / old["samples_per_s"], 3
                )  # fmt: skip
            if "ar_workers_" + str(args.workers) in runs:
                ar = runs[f"ar_workers_{args.workers}"]
                runs["dfm_over_ar_step"] = round(
                    new["seconds_per_step"] / ar["seconds_per_step"], 3
                )
            report[model] = runs
    else:
        log("real: Janus-1.3B shapes" if args.real_size == "janus" else "real: tiny shapes")
        spec = {"what": "real", "device": args.device, "steps": args.steps,
                "warmup": args.warmup, "batch_size": args.batch_size or 8, "text_tokens": 64,
                "image_tokens": 576, "size": args.real_size,
                "tiny_config": args.tiny_config, "compile": args.compile}  # fmt: skip
        r = fresh(spec)
        for name in ("dfm", "ar", "dfm_compiled"):
            if name in r:
                r[name]["mfu"] = mfu(r, r[name]["tokens_per_s"], args.peak_tflops)
        if "dfm_compiled" in r:
            r["compiled_over_eager"] = round(
                r["dfm"]["seconds_per_step"] / r["dfm_compiled"]["seconds_per_step"], 3
            )
        report["real"] = r
    report["peak_tflops"] = args.peak_tflops
    report["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
