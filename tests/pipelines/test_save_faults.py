"""save_pretrained replaces a model folder atomically (kineflow.folders): a save that fails or
is killed at any point leaves the previous folder whole and loadable, never old files mixed
with new ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from janus_fixture import tiny_pipeline
from safetensors.torch import load_file

import kineflow
from kineflow import folders, io
from kineflow.pipelines import FudokiPipeline
from kineflow.pipelines.unifluid import UnifluidPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
EMBED = "language_model.model.embed_tokens.weight"


@pytest.fixture(scope="module")
def pipelines() -> tuple[FudokiPipeline, FudokiPipeline]:
    """Two pipelines with different weights and pipeline settings."""
    old = tiny_pipeline()
    new = tiny_pipeline()
    with torch.no_grad():
        for p in new.model.parameters():
            p.add_(1.0)
    new.config.steps = 7
    return old, new


def siblings(folder: Path) -> list[str]:
    """Everything beside ``folder`` that a save may leave (its temporary siblings)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def assert_is(folder: Path, pipe: FudokiPipeline) -> None:
    """``folder`` loads, whole, as ``pipe``: weights, pipeline settings and tokenizer."""
    loaded = kineflow.load(folder)
    assert loaded.config.steps == pipe.config.steps
    for key, value in pipe.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert loaded.tokenizer.vocab_size == pipe.tokenizer.vocab_size


def test_save_over_a_model_replaces_it_whole(tmp_path, pipelines) -> None:
    old, new = pipelines
    folder = tmp_path / "model"
    assert old.save_pretrained(folder) == folder
    new.save_pretrained(folder)
    assert_is(folder, new)
    assert siblings(folder) == []  # no temporary folder left behind


@pytest.mark.parametrize("fail_at", ["config", "weights"])
def test_failed_save_leaves_the_previous_folder_intact(
    tmp_path, pipelines, monkeypatch, fail_at
) -> None:
    old, new = pipelines
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    before = {f.name: f.read_bytes() for f in folder.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    # The tokenizer and metric tables are written first, then the weights, then the config.
    name = "atomic_write_json" if fail_at == "config" else "atomic_save_safetensors"
    monkeypatch.setattr(io, name, crash)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(folder)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    assert siblings(folder) == []
    assert_is(folder, old)


def test_failed_unifluid_save_leaves_the_previous_folder_intact(tmp_path, monkeypatch) -> None:
    pipe = UnifluidPipeline.from_pretrained(ROOT / "checkpoints" / "unifluid-shapes")
    folder = tmp_path / "unifluid"
    pipe.save_pretrained(folder)
    before = {f.name: f.read_bytes() for f in folder.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        pipe.save_pretrained(folder, dtype=torch.float16)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    assert siblings(folder) == []


def test_save_onto_a_file_is_refused(tmp_path, pipelines) -> None:
    file = tmp_path / "model"
    file.write_text("not a folder")
    with pytest.raises(ValueError) as info:
        pipelines[0].save_pretrained(file)
    assert str(info.value) == f"cannot save to {file}: it is a file, not a folder"
    assert file.read_text() == "not a folder"
    with pytest.raises(ValueError, match="a parent of it is a file"):
        pipelines[0].save_pretrained(file / "inside")
    assert siblings(file) == []


def test_save_onto_a_folder_of_other_files_is_refused(tmp_path, pipelines) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"project: it holds notes\.txt, which a kineflow save"):
        pipelines[0].save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["config.json", "notes.txt"]
    pipelines[0].save_pretrained(tmp_path / "empty")  # a new folder is fine
    (tmp_path / "made").mkdir()
    pipelines[0].save_pretrained(tmp_path / "made")  # and so is an empty one


# A save killed (SIGKILL) right when it moves its new folder in: the old one is set aside.
KILLED_SAVE = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from janus_fixture import tiny_pipeline
from kineflow import folders
rename = os.rename
def kill_at_swap(src, dst):
    if ".saving-" in str(src):
        os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst)
folders.os.rename = kill_at_swap
pipe = tiny_pipeline()
pipe.config.steps = 9
pipe.save_pretrained(sys.argv[1])
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL and liveness checks are POSIX")
def test_save_killed_mid_swap_is_recovered(tmp_path, pipelines) -> None:
    old = pipelines[0]
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", KILLED_SAVE, str(folder), str(ROOT / "tests")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    # The kill left no folder: the old one beside it, the new one complete in its temp.
    assert not folder.exists()
    left = siblings(folder)
    assert [n.split("-")[0] for n in left] == [".model.replaced", ".model.saving"]
    assert_is(folder, old)  # kineflow.load moves the previous folder back
    assert [n.split("-")[0] for n in siblings(folder)] == [".model.saving"]
    pipelines[1].save_pretrained(folder)  # the next save clears the dead one's leftovers
    assert siblings(folder) == []
    assert_is(folder, pipelines[1])


def test_loaders_of_kineflow_folders_recover_too(tmp_path) -> None:
    """io.load_pretrained_folder (VQ, KL-VAE, SigLIP towers) restores a set-aside folder."""
    folder = io.save_pretrained_folder(tmp_path / "vq", {"w": torch.ones(2)}, {"a": 1}, "toy")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    aside = folder.with_name(f".vq.replaced-{int(dead.stdout)}-0123abcd")
    folder.rename(aside)
    config, weights = io.load_pretrained_folder(folder, "toy", "toy model")
    assert config == {"a": 1} and torch.equal(weights["w"], torch.ones(2))
    assert not aside.exists()


def test_a_live_savers_folders_are_left_alone(tmp_path) -> None:
    folder = tmp_path / "model"
    aside = folder.with_name(f".model.replaced-{os.getpid()}-0123abcd")  # this process: alive
    aside.mkdir()
    assert folders.recover_interrupted_save(folder) is None
    assert aside.is_dir() and not folder.exists()


def test_saved_weights_are_the_new_ones(tmp_path, pipelines) -> None:
    """The swap moves the complete new folder in: its weights file is the new save's."""
    folder = tmp_path / "m"
    pipelines[0].save_pretrained(folder)
    pipelines[1].save_pretrained(folder)
    stored = load_file(str(folder / "model.safetensors"))
    assert torch.equal(stored[EMBED], pipelines[1].model.state_dict()[EMBED])
