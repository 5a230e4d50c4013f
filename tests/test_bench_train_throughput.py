"""bench/train_throughput.py runs (tiny sizes) and prints one JSON object with its keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kineflow.models.fudoki import FudokiConfig
from kineflow.models.llama import LlamaConfig
from kineflow.tokenizers.vq import VQConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "train_throughput.py"
STEP_KEYS = {"seconds_per_step", "samples_per_s", "tokens_per_s"}


def bench(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.slow  # three short training runs in fresh processes (15-30 s)
def test_tiny_fudoki_baseline_and_workers():
    report = bench("--steps", "3", "--warmup", "1", "--batch-size", "4", "--threads", "1",
                   "--peak-tflops", "1")  # fmt: skip
    runs = report["fudoki"]
    for name in ("workers_0", "workers_2", "ar_workers_2"):
        run = runs[name]
        assert STEP_KEYS | {"mfu", "data_wait_share", "peak_memory_mb"} <= run.keys()
        assert run["batch_size"] == 4 and run["tokens_per_step"] > 0
        assert run["samples_per_s"] == pytest.approx(4 / run["seconds_per_step"], rel=0.02)
        expected_mfu = 6 * run["trainable_params"] * run["tokens_per_s"] / 1e12
        assert run["mfu"] == pytest.approx(expected_mfu, rel=1e-2, abs=1e-4)
        assert 0 <= run["data_wait_share"] <= 1
    assert runs["workers_0"]["tokens_per_step"] == runs["workers_2"]["tokens_per_step"]
    assert {"speedup_samples_per_s", "dfm_over_ar_step"} <= runs.keys()
    assert {"load_average_1min_at_start", "load_average_1min_at_end"} <= report.keys()


@pytest.mark.slow  # encodes shards, then two short training runs in fresh processes
def test_shards_and_packing_variants(tmp_path):
    report = bench("--steps", "3", "--warmup", "1", "--batch-size", "8", "--threads", "1",
                   "--workers", "0", "--no-ar", "--shards", str(tmp_path), "--pack",
                   "--pack-length", "256")  # fmt: skip
    runs = report["fudoki"]
    shards, packed = runs["shards_workers_0"], runs["shards_packed_workers_0"]
    assert (tmp_path / "fudoki" / "index.json").is_file()
    # The same samples in fewer token slots: packing drops the padding.
    assert packed["tokens_per_step"] < shards["tokens_per_step"]
    assert runs["workers_0"]["tokens_per_step"] == shards["tokens_per_step"]


def tiny_real_config() -> FudokiConfig:
    return FudokiConfig(
        language=LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=128,
        ),
        gen_vision=VQConfig.from_dict(
            {
                k: v
                for k, v in json.loads(
                    (REPO / "checkpoints/vq-shapes/config.json").read_text()
                ).items()
                if k != "kineflow_type"
            }
        ),
        gen_aligner_hidden=32,
        gen_head_hidden=32,
    )


def test_real_mode_at_tiny_shapes():
    config = tiny_real_config()
    report = bench("--real", "--real-size", "tiny", "--tiny-config", json.dumps(config.to_dict()),
                   "--steps", "2", "--warmup", "1", "--batch-size", "2")  # fmt: skip
    real = report["real"]
    assert real["tokens_per_step"] == 2 * (64 + 576)
    for name in ("dfm", "ar"):
        assert STEP_KEYS | {"mfu"} <= real[name].keys() and real[name]["mfu"] is None
    assert real["dfm_over_ar_step"] > 0 and real["trainable_params"] > 0


@pytest.mark.slow  # compiles a tiny FUDOKI (about half a minute on a CPU)
def test_real_mode_times_the_compiled_step_too():
    config = json.loads(json.dumps(tiny_real_config().to_dict()))
    report = bench("--real", "--real-size", "tiny", "--tiny-config", json.dumps(config),
                   "--steps", "2", "--warmup", "1", "--batch-size", "2", "--compile")  # fmt: skip
    real = report["real"]
    assert STEP_KEYS | {"mfu"} <= real["dfm_compiled"].keys()
    assert real["compiled_over_eager"] == pytest.approx(
        real["dfm"]["seconds_per_step"] / real["dfm_compiled"]["seconds_per_step"], rel=1e-2
    )
