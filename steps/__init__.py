"""The code that runs inside the containers: one module per stage, and steps.common."""

import logging

# bitsandbytes, imported by PEFT, tries at import to fetch a CPU 4-bit kernel from the Hugging Face
# Hub through the optional `kernels` package, and logs a warning in every job when it cannot. A job
# never reaches the Hub, so installing `kernels` would only move the failure; bitsandbytes' own CPU
# kernel, which it falls back to, is the one that runs. The logger is set before any stage imports
# PEFT; it logs nothing else.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
