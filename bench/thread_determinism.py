"""Does a float64 evaluation draw the same pictures on any thread count, run after run?

Each run is a fresh process (this script with ``--measure``) that loads ``--model`` in float64,
sets torch's thread count and generates the test split's prompts the way the reproduction's
evaluation does (``evaluate_model``: ``--prompts-per-category`` prompts per GenEval category,
2 pictures each, 16 solver steps, guidance 3, batch ``k`` seeded ``k``). It reports the
GenEval-style and strict scores and a SHA-256 of every picture's pixels; ``same_as_first``
compares a run's digest with the first run's. Fresh processes matter: torch 2.13's CPU ``cos``
gave another answer on a second thread in some processes and not in others
(``kineflow/models/rope.py``), so one process repeating itself proves nothing.

    python bench/thread_determinism.py --model checkpoints/fudoki-shapes --threads 1 2 --runs 3

Output: one JSON object on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(model: str, threads: int, per_category: int) -> dict:
    import numpy as np
    import torch

    import kineflow
    from kineflow.eval.benchmark import evaluate_model

    torch.set_num_threads(threads)
    pipe = kineflow.load(model, dtype=torch.float64)
    report = evaluate_model(pipe, images_per_prompt=2, heldout_images_per_prompt=0,
                            max_prompts_per_category=per_category, vqa_items=0, caption_items=0,
                            steps=16, cfg_scale=3.0, progress=False)  # fmt: skip
    t2i = report["t2i_test"]
    digest = hashlib.sha256(b"".join(np.asarray(p).tobytes() for p in t2i["pictures"]))
    return {"threads": threads, "pictures": len(t2i["pictures"]), "geneval": t2i["accuracy"],
            "strict": t2i["strict_accuracy"], "sha256": digest.hexdigest()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="checkpoints/fudoki-shapes")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=3, help="fresh processes per thread count")
    p.add_argument("--prompts-per-category", type=int, default=24)
    p.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # a thread count: one run
    args = p.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args.model, args.measure, args.prompts_per_category)))
        return 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = []
    for threads in args.threads:
        for _ in range(args.runs):
            print(f"[thread_determinism] {threads} thread(s)", file=sys.stderr)
            done = subprocess.run(
                [sys.executable, __file__, "--model", args.model, "--measure", str(threads),
                 "--prompts-per-category", str(args.prompts_per_category)],
                env={**env, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True,
                check=True,
            )  # fmt: skip
            runs.append(json.loads(done.stdout.splitlines()[-1]))
    first = runs[0]["sha256"]
    for run in runs:
        run["same_as_first"] = run["sha256"] == first
    report = {"model": args.model, "prompts_per_category": args.prompts_per_category,
              "runs": runs, "all_identical": all(r["same_as_first"] for r in runs)}  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
