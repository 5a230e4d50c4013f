"""``kineflow serve``: a web page for a FUDOKI or UniFluid checkpoint (:mod:`kineflow.apps.serve`).

gradio is optional (``pip install 'kineflow[serve]'``): without it the command prints one
``error:`` line saying so and exits 2, before any model is loaded. A bad checkpoint or device
is reported the same way.
"""

from __future__ import annotations

import argparse

from kineflow.cli.args import DEVICE_FORMS, device_name, int_in_range
from kineflow.cli.command import Command
from kineflow.cli.sampling import CLI_ERRORS, DTYPES

__all__ = ["COMMANDS"]


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True,
        help="checkpoint folder, FUDOKI or UniFluid (or a Hugging Face hub id)",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every interface)")  # fmt: skip
    parser.add_argument("--port", type=int_in_range(1, 65535), default=7860, help="port")
    parser.add_argument("--device", type=device_name, default="cpu", help=DEVICE_FORMS)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="model precision")
    parser.add_argument(
        "--queue-size", type=int_in_range(1, 10000), default=16,
        help="requests that may wait while one runs (one runs at a time); more are turned away",
    )  # fmt: skip


def _run_serve(args: argparse.Namespace) -> int:
    import tempfile

    from kineflow.apps.serve.page import GradioMissingError, build_page, import_gradio, launch

    try:
        import_gradio()  # before loading the model: a missing gradio costs nothing
        import torch

        import kineflow
        from kineflow.apps.serve.handlers import Session

        pipe = kineflow.load(args.model, device=args.device, dtype=getattr(torch, args.dtype))
        workdir = tempfile.mkdtemp(prefix="kineflow-serve-")
        session = Session(pipe, args.model, workdir, args.device, args.dtype)
        page = build_page(session, max_queue=args.queue_size)
    except (GradioMissingError, *CLI_ERRORS) as err:
        print(f"error: {err}")
        return 2
    print(f"kineflow serve: {pipe.display_name} model {args.model} at "
          f"http://{args.host}:{args.port}", flush=True)  # fmt: skip
    launch(page, args.host, args.port, session)
    return 0


COMMANDS: list[Command] = [
    Command(
        name="serve",
        help="a web page for a FUDOKI or UniFluid checkpoint (needs kineflow[serve])",
        description="'kineflow serve --model checkpoints/fudoki-shapes' serves a page at "
        "http://127.0.0.1:7860 that adapts to the model: text-to-image (a prompt per line, "
        "seed / steps / CFG / temperature, the refinement as a GIF), questions and captions "
        "about an uploaded picture, editing and infill where the family has them, and the run "
        "card (exact settings) of every result, which reproduces it when fed back. One request "
        "runs at a time; the others queue.",
        options=_serve_options,
        handler=_run_serve,
    ),
]
