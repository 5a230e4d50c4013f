"""Wall-clock timing shared by the benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["median_time", "timing_parser", "write_result"]


def timing_parser(doc: str, name: str, repeats: int) -> argparse.ArgumentParser:
    """The options every timing benchmark takes: ``--threads``, ``--repeats`` (default
    ``repeats``) and ``--out`` (default ``bench/results/{name}.json``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats)
    default_out = Path(__file__).parent / "results" / f"{name}.json"
    parser.add_argument("--out", type=Path, default=default_out)
    return parser


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """``(median seconds of `repeats` calls, the last call's result)`` after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def write_result(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Write ``{"threads", "load_avg", "rows", "torch"}`` to ``args.out`` and print it."""
    import torch

    result = {"threads": args.threads, "load_avg": os.getloadavg(), "rows": rows,
              "torch": torch.__version__}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
