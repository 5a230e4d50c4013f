"""``kineflow serve`` in a real browser: the server runs as its own process on 127.0.0.1 and
headless Chromium (Debian's ``chromium``, driven by the ``playwright`` package) uses the page
as a person would: types prompts and clicks Generate, uploads a picture and asks about it,
submits an empty prompt. A screenshot of each page lands in ``outputs/serve/``.

Skipped, saying why, only where Chromium, playwright or gradio is missing; ``make test``
installs all three, so CI runs it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
MODEL = "checkpoints/fudoki-shapes"
CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "outputs" / "serve"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]  # fmt: skip

if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_playwright = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is missing (pip install playwright)"
).sync_playwright
pytest.importorskip("gradio", reason="gradio is missing (pip install 'kineflow[serve]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """``python -m kineflow serve`` on a free port; its URL once the page answers."""
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "kineflow", "serve", "--model", MODEL,
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not _answers(url):
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"kineflow serve exited ({proc.returncode}):\n"
                                f"{log.read().decode()}")  # fmt: skip
                if time.monotonic() > deadline:
                    pytest.fail("kineflow serve did not answer within 180 s")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    profile = tempfile.mkdtemp(prefix="kineflow-chromium-")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=FLAGS, headless=True,
            viewport={"width": 1200, "height": 900},
        )  # fmt: skip
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser, server: str) -> Iterator[object]:
    page = browser.new_page()
    page.set_default_timeout(120_000)
    page.goto(server)
    page.wait_for_selector("#t2i-prompts textarea")
    yield page
    page.close()


def _image_size() -> int:
    config = json.loads((ROOT / MODEL / "config.json").read_text())
    return config["model"]["gen_vision"]["image_size"]


def _status(page, key: str, words: str) -> str:
    """The text of the tab's status box once it contains ``words``."""
    page.wait_for_function(
        "([sel, words]) => (document.querySelector(sel)?.innerText || '').includes(words)",
        arg=[f"#{key}-status", words],
    )
    return page.inner_text(f"#{key}-status")


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=True)


def test_generate_draws_pictures_of_the_models_size(page) -> None:
    prompts = ["a red circle and a blue square", "three squares", "a green circle",
               "a circle left of a square"]  # fmt: skip
    page.fill("#t2i-prompts textarea", "\n".join(prompts))
    page.click("#t2i-run")
    assert _status(page, "t2i", "Done").startswith("Done in")
    page.wait_for_selector("#t2i-gifs img")
    sources = page.eval_on_selector_all("#t2i-images img", "els => els.map(e => e.src)")
    assert len(sources) == len(prompts)
    size = _image_size()
    pictures = []
    for src in sources:
        response = page.request.get(src)
        assert response.ok, src
        picture = Image.open(io.BytesIO(response.body()))
        picture.load()  # decodes every pixel: a truncated or corrupt file raises here
        assert picture.format == "PNG" and picture.size == (size, size)
        pictures.append(picture)
    # The run card offered for download names these very pixels.
    link = page.wait_for_selector("#t2i-card-file a[href]")
    card = json.loads(page.request.get(link.get_attribute("href")).body())
    from kineflow.apps.serve.run_card import pixel_hash

    assert card["inputs"]["prompts"] == prompts
    assert card["options"]["seed"] == 0 and card["options"]["steps"] == 16
    assert card["outputs"]["image_sha256"] == [pixel_hash(p) for p in pictures]
    _shot(page, "text_to_image.png")


def test_a_question_about_an_uploaded_picture_gets_an_answer(page, tmp_path: Path) -> None:
    from kineflow.data.shapes.render import render_image
    from kineflow.data.shapes.scene import Obj, Scene

    scene = Scene((Obj(0, 0, "circle", "red", "large"), Obj(2, 2, "circle", "blue", "large")))
    picture = tmp_path / "scene.png"
    render_image(scene, 32).resize((128, 128), Image.Resampling.NEAREST).save(picture)
    page.click("button[role=tab]:has-text('Ask about a picture')")
    page.set_input_files("#vqa-picture input[type=file]", str(picture))
    page.wait_for_selector("#vqa-picture img")
    page.fill("#vqa-question textarea", "how many circles are there?")
    page.click("#vqa-run")
    _status(page, "vqa", "Done")
    answer = page.input_value("#vqa-answer textarea")
    assert answer.strip(), "no answer appeared"
    # The page's answer is the pipeline's own, at the page's defaults (steps 16, seed 0).
    import kineflow

    pipe = kineflow.load(ROOT / MODEL)
    expected = pipe.answer(Image.open(picture), "how many circles are there?", steps=16, seed=0)
    assert answer == expected.texts[0]
    _shot(page, "answer.png")


def test_an_empty_prompt_shows_the_error_in_the_page(page) -> None:
    page.fill("#t2i-prompts textarea", "   ")
    page.click("#t2i-run")
    status = _status(page, "t2i", "Error")
    assert status == "Error: enter at least one prompt (one per line)"
    assert page.query_selector_all("#t2i-images img") == []  # nothing was drawn
    _shot(page, "empty_prompt.png")
