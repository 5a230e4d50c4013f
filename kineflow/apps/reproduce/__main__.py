"""``python -m kineflow.apps.reproduce eval RUN CONFIG``: the evaluation job of one run (what
:class:`~kineflow.apps.reproduce.jobs.Job` launches for ``kind="eval"``)."""

from __future__ import annotations

import sys
from pathlib import Path

from kineflow.apps.reproduce.config import ReproduceConfig, read_yaml
from kineflow.apps.reproduce.evaluate import evaluate_run
from kineflow.io import atomic_write_json


def main(argv: list[str]) -> int:
    """``python -m kineflow.apps.reproduce eval RUN CONFIG``: the evaluation job of one run."""
    if len(argv) != 3 or argv[0] != "eval":
        print("usage: python -m kineflow.apps.reproduce eval RUN CONFIG_YAML")
        return 2
    run, path = argv[1], argv[2]
    raw = read_yaml(path)
    raw.pop("run", None)
    config = ReproduceConfig.from_dict(raw)
    out = Path(config.out)
    result = evaluate_run(run, out, config.eval, print)
    atomic_write_json(out / run / "eval.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
