"""``python -m kineflow.apps.reproduce eval RUN CONFIG``: the evaluation job of one run."""

import sys

from kineflow.apps.reproduce import _main

raise SystemExit(_main(sys.argv[1:]))
