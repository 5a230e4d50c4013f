"""UniFluid through the shared loop with a ``lora`` section (only the adapters and
``also_train`` change, the adapter folder, merged = base + adapter, exact resume) and from a
manifest of caption / VQA / edit records mixed by ``data.mix``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train_unifluid import assets, make_config  # noqa: F401 (the fixture)

import kineflow
from kineflow.data.manifest import write_manifest
from kineflow.pipelines.adapters import load_adapter
from kineflow.tokenizers.text import TextTokenizer
from kineflow.train.lora import LoraSettings
from kineflow.train.unifluid import UnifluidTask, build_unifluid, train_unifluid

TARGETS = ["q_proj", "v_proj", "up_proj"]
RANK, ALPHA = 2, 4.0
MIX = {"t2i": 0.4, "caption": 0.2, "vqa": 0.2, "edit": 0.2}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(assets, tmp_path_factory) -> str:  # noqa: F811
    out = tmp_path_factory.mktemp("unifluid_base")
    train_unifluid(make_config(assets, out, steps=1), progress=False)
    return str(out / "model")


def lora_config(assets, base, out: Path, steps: int = 4, **data):  # noqa: F811
    cfg = make_config(assets, out, steps=steps, **data)
    cfg.lora = LoraSettings(rank=RANK, alpha=ALPHA, targets=TARGETS,
                            also_train=["diffusion_head"], base=base)  # fmt: skip
    return cfg


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def per_sample(model: torch.nn.Module, cfg, assets) -> dict[str, torch.Tensor]:  # noqa: F811
    """The model's per-sample losses on a fixed mixed batch (its diffusion draws included):
    one call through every part of the network."""
    tok = TextTokenizer.load(assets["text"])
    task = UnifluidTask(model, tok, cfg)
    with torch.no_grad():
        return model.eval()(task.encoded(task.batch(list(range(12)))))


def test_unifluid_lora_run(assets, base, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "run"
    cfg = lora_config(assets, base, out)
    train_unifluid(cfg, progress=False)
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["kineflow_type"] == "unifluid" and meta["also_train"] == ["diffusion_head"]
    assert len(meta["modules"]) == 2 * 3  # 2 layers x 3 targets
    file = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    before = load_file(str(Path(base) / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapted = {f"{m}.weight" for m in meta["modules"]}
    head = {k for k in before if k.startswith("diffusion_head.")}
    assert adapted <= changed <= adapted | head and changed & head
    for m in meta["modules"]:
        delta = (ALPHA / RANK) * file[f"{m}.lora_B"] @ file[f"{m}.lora_A"]
        torch.testing.assert_close(after[f"{m}.weight"], before[f"{m}.weight"] + delta)
    for k in head:
        assert torch.equal(after[k], file[k])
    # Base + adapter (unmerged) computes what the merged folder computes, loss for loss.
    unmerged = per_sample(load_adapter(out / "adapter").model, cfg, assets)
    merged = per_sample(kineflow.load(out / "model").model, cfg, assets)
    plain = per_sample(kineflow.load(base).model, cfg, assets)
    for part in ("image", "text"):
        torch.testing.assert_close(unmerged[part], merged[part], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain["image"], merged["image"])  # and the adapter did something


def test_unifluid_lora_resume_is_exact(assets, base, tmp_path) -> None:  # noqa: F811
    train_unifluid(lora_config(assets, base, tmp_path / "once"), progress=False)
    real = UnifluidTask.batch

    def dies_at_step_4(self, indices):  # after the checkpoint at step 2
        if indices[0] == 3 * 6:
            raise KeyboardInterrupt
        return real(self, indices)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(UnifluidTask, "batch", dies_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            train_unifluid(lora_config(assets, base, tmp_path / "twice"), progress=False)
    assert len(losses(tmp_path / "twice")) == 3
    train_unifluid(lora_config(assets, base, tmp_path / "twice"), progress=False)
    assert losses(tmp_path / "once") == losses(tmp_path / "twice")
    one = load_file(str(tmp_path / "once" / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "twice" / "adapter" / "adapter_model.safetensors"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("unifluid_manifest")
    rng = np.random.default_rng(0)
    names = ["red", "green", "blue"]
    for name in names:
        pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)  # cropped + resized to 32
        Image.fromarray(pixels).save(root / f"{name}.png")
    records = []
    for a, b in zip(names, names[1:] + names[:1], strict=True):
        records.append({"image": f"{a}.png", "caption": f"a {a} square"})
        records.append({"image": f"{a}.png", "question": "what colour?", "answer": a})
        records.append({"image": f"{a}.png", "instruction": f"make it {b}.",
                        "target": f"{b}.png"})  # fmt: skip
    write_manifest(root / "manifest.jsonl", records)
    return str(root / "manifest.jsonl")


def test_unifluid_from_a_manifest(assets, manifest, tmp_path) -> None:  # noqa: F811
    cfg = make_config(assets, tmp_path / "run", steps=2, manifest=manifest, mix=MIX)
    tok = TextTokenizer.load(assets["text"])
    task = UnifluidTask(build_unifluid(cfg, tok), tok, cfg)
    indices = list(range(60))
    asked = {i: task.own.draw(i) for i in indices}
    counts = {t: sum(task_ == t for task_, _ in asked.values()) for t in MIX}
    assert all(counts[t] > 0 for t in MIX), counts
    batch = task.encoded(task.batch(indices))
    kinds = {"t2i": "gen", "edit": "edit", "caption": "und", "vqa": "und"}
    for part in ("gen", "edit", "und"):
        want = sum(kinds[t] == part for t, _ in asked.values())
        assert len(batch[part]["ids"]) == want, part
    records = task.own.dataset.records
    # Each sample holds its record: t2i prompts hold the caption, edits the instruction,
    # understanding answers the caption or the answer (then EOS), in index order per part.
    rows = {"gen": [], "edit": [], "und": []}
    for i in indices:
        t, at = asked[i]
        rows[kinds[t]].append((t, at, records[at]))
    for b, (_, _, rec) in enumerate(rows["gen"]):
        ids = batch["gen"]["ids"][b][batch["gen"]["mask"][b]]
        blank = bool((ids[1:-1] == tok.pad_id).all())  # CFG dropout: the prompt blanked
        assert blank or rec.caption in tok.decode(ids.tolist())
    und = batch["und"]
    for b, (t, _, rec) in enumerate(rows["und"]):
        answer = und["targets"][b][und["target_mask"][b]].tolist()
        text = rec.caption if t == "caption" else rec.answer
        expected = tok.encode(text)
        assert answer[: len(expected)] == expected and set(answer[len(expected) :]) <= {tok.eos_id}
    for b, (_, at, rec) in enumerate(rows["edit"]):
        assert rec.instruction in tok.decode(batch["edit"]["ids"][b].tolist())
        src = task._tokens(torch.from_numpy(task.own.picture(at))[None])[0]
        torch.testing.assert_close(batch["edit"]["source"][b], src, atol=1e-5, rtol=1e-5)
    summary = train_unifluid(cfg, progress=False)
    assert summary["steps"] == 2 and all(np.isfinite(losses(tmp_path / "run")))
    # The mix's key order does not change the run's samples.
    other = make_config(assets, tmp_path / "o", manifest=manifest, mix=dict(reversed(MIX.items())))
    again = UnifluidTask(task.model, tok, other)
    assert [again.own.draw(i) for i in indices] == [asked[i] for i in indices]
