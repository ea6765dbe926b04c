"""``python -m serving serve``: what ``docker run IMAGE serve`` runs in the serving image.

SageMaker starts every hosting container with the single argument ``serve``; anything else is a
usage error. A setting that cannot work (SAGEMAKER_BIND_TO_PORT=abc, a port in use) ends the
process at once with one ``ERROR:`` line and status 2, which the endpoint's log shows.
"""

from __future__ import annotations

import sys

from serving.server import serve
from serving.settings import Settings
from steps.common.contract import StageError

USAGE = "usage: python -m serving serve   (SageMaker runs the image as `docker run IMAGE serve`)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["serve"]:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        serve(Settings.from_environment())
    except StageError as err:
        print("ERROR: " + " ".join(str(err).split()), file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
