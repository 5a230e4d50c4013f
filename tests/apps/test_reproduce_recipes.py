"""Recipe chains (``kineflow/apps/reproduce/recipes.py``): the stages read back from the
configs' ``init_from`` links, the errors a broken link gives, and the scheduler's rule for a
job that nothing can run beside."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kineflow.apps.reproduce.jobs import Job, _waits_for
from kineflow.apps.reproduce.recipes import recipe_chain


def _write(root: Path, name: str, **fields: object) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"vq": "checkpoints/vq", "out": f"outputs/{name}", **fields}))
    return path


def test_chain_follows_init_from_back_to_the_first_stage(tmp_path: Path) -> None:
    _write(tmp_path, "a")
    _write(tmp_path, "b", init_from="outputs/a/model_step100")
    last = _write(tmp_path, "c", init_from="outputs/b/model")
    _write(tmp_path, "unrelated", init_from="outputs/a/model")
    (tmp_path / "notes.yaml").write_text("just: [a, list")  # not YAML: skipped
    chain = recipe_chain(last)
    assert [s.name for s in chain] == ["a", "b", "c"]
    assert [(s.before, s.start) for s in chain] == [
        (None, None), ("a", "model_step100"), ("b", "model")]  # fmt: skip
    assert {s.kind for s in chain} == {"fudoki"}
    assert recipe_chain(_write(tmp_path, "u", vae="kl"))[0].kind == "unifluid"


def test_a_broken_link_names_the_config_and_its_init_from(tmp_path: Path) -> None:
    last = _write(tmp_path, "b", init_from="outputs/missing/model")
    with pytest.raises(ValueError, match=r"b\.yaml: init_from outputs/missing/model: no config"):
        recipe_chain(last)
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml: no such config file"):
        recipe_chain(tmp_path / "nope.yaml")
    circle = _write(tmp_path, "x", init_from="outputs/y/model")
    _write(tmp_path, "y", init_from="outputs/x/model")
    with pytest.raises(ValueError, match="circle"):
        recipe_chain(circle)
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"out": "outputs/bare"}))
    with pytest.raises(ValueError, match=r"bare\.yaml: a recipe stage names its image tokenizer"):
        recipe_chain(bare)


def test_a_job_runs_alone_only_when_every_other_pending_job_waits_for_it() -> None:
    def job(name: str, *needs: str) -> Job:
        return Job(name, "fudoki", {}, Path(name), needs)

    a, b, c = job("a"), job("b", "a"), job("c", "b")
    assert _waits_for(a, [a, b, c])  # b and c come after a, through b
    other = job("other")
    assert not _waits_for(a, [a, b, other])  # other could run beside a
    assert _waits_for(a, [a])


def test_a_job_takes_every_core_once_the_job_beside_it_ends(tmp_path, monkeypatch) -> None:
    """Two jobs start side by side with ``threads`` each; when the short one ends the
    scheduler rewrites the long one's thread file to every core, and the long one (which
    records what it reads) sees the change while it runs."""
    import sys

    from kineflow.apps.reproduce import jobs as jobs_module
    from kineflow.train.threads import THREADS_FILE

    monkeypatch.setattr(jobs_module.os, "cpu_count", lambda: 4)
    long_job = (
        "import os, pathlib, time\n"
        f"f = pathlib.Path(os.environ[{THREADS_FILE!r}])\n"
        "seen = []\n"
        "for _ in range(400):\n"
        "    n = f.read_text()\n"
        "    if not seen or seen[-1] != n: seen.append(n)\n"
        "    if n == '4': break\n"
        "    time.sleep(0.05)\n"
        "pathlib.Path(os.environ['OUT_SEEN']).write_text(','.join(seen))\n"
    )
    commands = {"long": [sys.executable, "-c", long_job],
                "short": [sys.executable, "-c", "import time; time.sleep(1.5)"]}  # fmt: skip
    monkeypatch.setattr(Job, "command", lambda self, config_file: commands[self.name])
    monkeypatch.setenv("OUT_SEEN", str(tmp_path / "seen"))
    done: list[str] = []
    jobs = [Job(n, "fudoki", {}, tmp_path / n / "done") for n in ("long", "short")]
    jobs_module.run_jobs(jobs, tmp_path, 2, 2, lambda m: None, lambda n, s: done.append(n))
    assert done == ["short", "long"]
    assert (tmp_path / "seen").read_text() == "2,4"
    assert (tmp_path / "logs" / "long.threads").read_text() == "4"
