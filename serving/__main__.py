"""``python -m serving serve``: what ``docker run IMAGE serve`` runs in the serving image.

SageMaker starts every hosting container with the single argument ``serve``; anything else is a
usage error. A setting that cannot work (SAGEMAKER_BIND_TO_PORT=abc, a port in use) ends the
process at once with one ``ERROR:`` line and status 2, which the endpoint's log shows. Both are
said before the ML stack (torch, transformers: seconds) is imported.
"""

from __future__ import annotations

import sys

from serving.settings import Settings
from steps.common.knobs import StageError

USAGE = "usage: python -m serving serve   (SageMaker runs the image as `docker run IMAGE serve`)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["serve"]:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        settings = Settings.from_environment()
        from serving.server import serve  # imports torch and transformers

        serve(settings)
    except StageError as err:
        print("ERROR: " + " ".join(str(err).split()), file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
