"""``python -m kineflow``: the command-line interface (see :mod:`kineflow.cli`)."""

from kineflow.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
