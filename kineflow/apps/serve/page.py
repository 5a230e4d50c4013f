"""The page of ``kineflow serve``: gradio components wired to a :class:`~.handlers.Session`.

The tabs and controls come from :mod:`.controls` (the Pipeline interface decides them); every
button calls a :class:`~.handlers.Session` method. A user mistake never reaches the browser as
a traceback: the tab's status box shows its one-line message and the outputs stay as they
were. Progress is live: the pipelines' tqdm bars (FUDOKI: one tick per solver step; UniFluid:
per image token) are tracked by ``gr.Progress(track_tqdm=True)``; the refinement itself is
shown as a GIF per picture once the run ends (the pipelines return the trajectory at the end).

A queue (``default_concurrency_limit=1``, every button in one ``concurrency_id``) runs one
request at a time, so concurrent users wait instead of running the model side by side out of
memory; ``max_size`` bounds the waiting line.

gradio is an optional dependency (``pip install 'kineflow[serve]'``), imported only here, by
:func:`build_page`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kineflow import __version__
from kineflow.apps.serve.controls import CONTROLS, default_value, tabs_for, visible_controls
from kineflow.apps.serve.handlers import Outcome, Session

__all__ = ["USER_ERRORS", "GradioMissingError", "build_page", "import_gradio", "launch"]

#: What a handler raises for a user mistake: shown in the status box, never as a traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)
#: Pictures are tiny (32 px): enlarge them on the page without blurring.
CSS = """
.pixelated img { image-rendering: pixelated; }
#header { margin-bottom: 0.2rem; }
.status p { font-size: 1rem; }
.status strong { color: #b91c1c; }
"""


class GradioMissingError(ImportError):
    """gradio is not installed (the message says how to install it)."""


def import_gradio() -> Any:
    """The ``gradio`` module.

    Raises:
        GradioMissingError: it is not installed: ``pip install 'kineflow[serve]'``.
    """
    # gradio reports usage over the network by default; this machine's pages stay local.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise GradioMissingError(
            "kineflow serve needs gradio: pip install 'kineflow[serve]'"
        ) from None
    return gradio


def _controls(gr: Any, session: Session, task: str) -> dict[str, Any]:
    """A number box per :data:`CONTROLS` entry, by name, in order; those ``task`` does not use
    are hidden (the session ignores their value). No bounds on the boxes themselves: gradio
    would refuse an out-of-range value with a pop-up (and a hidden box's empty value too);
    the session refuses it with a message in the status box instead."""
    shown = visible_controls(session.pipe, task)
    boxes = {}
    with gr.Row():
        for name, control in CONTROLS.items():
            used = name in shown
            value = default_value(session.pipe, task, name) if used else None
            if value is None and control.zero_is_none:
                value = 0
            # No precision=0 for whole numbers: gradio would round 2.5 silently.
            boxes[name] = gr.Number(
                value=value,
                label=control.label,
                info=control.info,
                visible=used,
                elem_id=f"{task}-{name}",
                min_width=120,
            )
    return boxes


def _results(gr: Any, key: str, pictures: bool, texts: bool) -> dict[str, Any]:
    """The outputs of a tab: the status box, pictures + their GIFs and/or a text box, and the
    run card (shown, and as a file to download)."""
    # The status first: an error must be seen without scrolling past the previous result.
    out: dict[str, Any] = {"status": gr.Markdown(elem_id=f"{key}-status", elem_classes=["status"])}
    if pictures:
        out["images"] = gr.Gallery(label="result", format="png", columns=4, fit_columns=False,
                                   height="auto", object_fit="contain", elem_id=f"{key}-images",
                                   elem_classes=["pixelated"])  # fmt: skip
        out["gifs"] = gr.Gallery(label="refinement (GIF: one frame per step)", columns=4,
                                 fit_columns=False, height="auto", object_fit="contain",
                                 elem_id=f"{key}-gifs", elem_classes=["pixelated"])  # fmt: skip
    if texts:
        out["texts"] = gr.Textbox(label="answer", lines=2, interactive=False,
                                  elem_id=f"{key}-answer")  # fmt: skip
    with gr.Row():
        out["card"] = gr.Code(label="run card: the exact settings (feed it back to reproduce)",
                              language="json", interactive=False, elem_id=f"{key}-card",
                              max_lines=12, scale=3)  # fmt: skip
        out["card_file"] = gr.File(label="download the run card", elem_id=f"{key}-card-file",
                                   scale=1)  # fmt: skip
    return out


def _wire(
    gr: Any, button: Any, run: Callable[..., Outcome], inputs: list, boxes: dict, out: dict
) -> None:
    """On click call ``run(*inputs, options, progress=True)`` (``options``: the values of the
    number ``boxes``, by name) and fill ``out``; a user mistake fills the status box only."""
    names = list(out)

    # The inputs go as a set (gradio then passes one dict): a fixed signature whose
    # positional ``progress`` gradio sees and injects, whatever the tab's number of inputs.
    def click(values: dict, progress: Any = gr.Progress(track_tqdm=True)) -> list[Any]:  # noqa: B008
        start = time.perf_counter()
        options = {name: values[box] for name, box in boxes.items()}
        try:
            outcome = run(*[values[c] for c in inputs], options, progress=True)
        except USER_ERRORS as err:
            return [f"**Error:** {err}" if n == "status" else gr.skip() for n in names]
        seconds = time.perf_counter() - start
        filled = {
            "images": [(im, _caption(outcome, i)) for i, im in enumerate(outcome.images)],
            "gifs": [str(p) for p in outcome.gifs],
            "texts": "\n".join(outcome.texts),
            "status": f"Done in {seconds:.1f} s. {outcome.note}".strip(),
            "card": outcome.card.to_json(),
            "card_file": str(outcome.card_path),
        }
        return [filled[n] for n in names]

    # One concurrency group for every button: default_concurrency_limit=1 alone would allow
    # one run per button at a time, i.e. several model calls side by side.
    button.click(click, inputs={*inputs, *boxes.values()}, outputs=[out[n] for n in names],
                 concurrency_id="model")  # fmt: skip


def _caption(outcome: Outcome, i: int) -> str:
    prompts = outcome.card.inputs.get("prompts")
    return prompts[i] if prompts else outcome.card.task


def _picture(gr: Any, key: str, label: str) -> Any:
    """An upload box for a picture (RGB, PIL; shown enlarged without blurring)."""
    return gr.Image(label=label, type="pil", image_mode="RGB", format="png", height=256,
                    elem_id=f"{key}-picture", elem_classes=["pixelated"])  # fmt: skip


def _text_to_image_tab(gr: Any, s: Session) -> None:
    prompts = gr.Textbox(label="prompts, one picture per line", lines=4, elem_id="t2i-prompts",
                         placeholder="a red circle\nthree squares")  # fmt: skip
    boxes = _controls(gr, s, "text_to_image")
    button = gr.Button("Generate", variant="primary", elem_id="t2i-run")
    out = _results(gr, "t2i", pictures=True, texts=False)
    _wire(gr, button, s.text_to_image, [prompts], boxes, out)


def _answer_tab(gr: Any, s: Session) -> None:
    picture = _picture(gr, "vqa", "picture")
    question = gr.Textbox(label="question", placeholder="how many circles are there?",
                          elem_id="vqa-question")  # fmt: skip
    boxes = _controls(gr, s, "answer")
    with gr.Row():
        button = gr.Button("Answer", variant="primary", elem_id="vqa-run")
        caption = gr.Button("Caption", visible=s.pipe.supports("caption"), elem_id="vqa-caption")
    out = _results(gr, "vqa", pictures=False, texts=True)
    _wire(gr, button, s.answer, [picture, question], boxes, out)
    if s.pipe.supports("caption"):
        _wire(gr, caption, s.caption, [picture], boxes, out)


def _edit_tab(gr: Any, s: Session) -> None:
    picture = _picture(gr, "edit", "picture to edit")
    instruction = gr.Textbox(label="instruction", placeholder="make the circle green.",
                             elem_id="edit-instruction")  # fmt: skip
    boxes = _controls(gr, s, "edit")
    button = gr.Button("Edit", variant="primary", elem_id="edit-run")
    out = _results(gr, "edit", pictures=True, texts=False)
    _wire(gr, button, s.edit, [picture, instruction], boxes, out)


def _infill_tab(gr: Any, s: Session) -> None:
    picture = _picture(gr, "infill", "picture")
    box = gr.Textbox(label="region to regenerate: X0,Y0,X1,Y1 in pixels (end exclusive)",
                     value="8,8,24,24", elem_id="infill-box")  # fmt: skip
    prompt = gr.Textbox(label="prompt for the region", placeholder="a green square",
                        elem_id="infill-prompt")  # fmt: skip
    boxes = _controls(gr, s, "infill")
    button = gr.Button("Infill", variant="primary", elem_id="infill-run")
    out = _results(gr, "infill", pictures=True, texts=False)
    _wire(gr, button, s.infill, [picture, box, prompt], boxes, out)


def _read_text(path: str | None) -> str:
    return "" if path is None else Path(path).read_text(encoding="utf-8")


def _replay_tab(gr: Any, s: Session) -> None:
    card = gr.Code(label="run card (JSON)", language="json", interactive=True,
                   elem_id="replay-card")  # fmt: skip
    upload = gr.File(label="or upload a run card file", file_types=[".json"], type="filepath",
                     elem_id="replay-upload")  # fmt: skip
    upload.upload(_read_text, upload, card)
    picture = _picture(gr, "replay", "the card's picture (tasks on a picture)")
    button = gr.Button("Run the card again", variant="primary", elem_id="replay-run")
    out = _results(gr, "replay", pictures=True, texts=True)
    # The card holds its own options: the number boxes are not shown here.
    _wire(gr, button, lambda c, im, _options, progress: s.replay(c, im, progress),
          [card, picture], {}, out)  # fmt: skip


#: Each tab's builder, by the task it runs (None: the run-card replay).
_TABS: dict[str | None, Callable[[Any, Session], None]] = {
    "text_to_image": _text_to_image_tab,
    "answer": _answer_tab,
    "edit": _edit_tab,
    "infill": _infill_tab,
    None: _replay_tab,
}


def build_page(session: Session, max_queue: int = 16) -> Any:
    """The ``gr.Blocks`` page for ``session``'s pipeline, its queue set (module docstring)."""
    gr = import_gradio()
    pipe = session.pipe
    with gr.Blocks(title=f"kineflow · {pipe.display_name}", analytics_enabled=False) as page:
        gr.Markdown(
            f"## kineflow serve: {pipe.display_name}\n"
            f"Model `{session.model}` on {session.device} ({session.dtype}), kineflow "
            f"{__version__}. Every result comes with its run card: the exact settings, which "
            "give the same result when fed back in the last tab.",
            elem_id="header",
        )
        with gr.Tabs():
            for tab in tabs_for(pipe):
                with gr.Tab(tab.title, elem_id=f"tab-{tab.task or 'replay'}"):
                    _TABS[tab.task](gr, session)
    page.queue(default_concurrency_limit=1, max_size=max_queue)
    return page


def launch(page: Any, host: str, port: int, session: Session) -> None:
    """Serve ``page`` on ``host:port`` until interrupted (no public share link)."""
    gr = import_gradio()
    theme = gr.themes.Soft(
        primary_hue="indigo",
        # System fonts: the default theme fonts are downloaded, and this page works offline.
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    )
    page.launch(server_name=host, server_port=port, share=False, theme=theme, css=CSS,
                allowed_paths=[str(session.workdir)], ssr_mode=False,
                footer_links=[])  # fmt: skip
