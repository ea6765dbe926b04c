"""A small Dockerfile reader: enough to check and build the project's images without Docker.

It joins continuation lines, drops comments and parser directives, and splits each
instruction into its keyword and arguments, keeping the line it starts on for messages.
Heredocs (`RUN <<EOF`) are not supported: the project's Dockerfiles do not use them.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

INSTRUCTIONS = frozenset({
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
})
# Instructions whose arguments may be a JSON array ("exec form").
_EXEC_FORM = frozenset({"CMD", "ENTRYPOINT", "SHELL", "RUN", "COPY", "ADD", "VOLUME"})


class DockerfileError(ValueError):
    """A Dockerfile that Docker would refuse; the message names the file and line."""


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


def parse(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile, in order; DockerfileError when it is malformed."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        # Comment and empty lines are dropped, even inside a continued instruction (as Docker does).
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        instructions.append(_instruction(path, " ".join(p for p in pending if p), start))
        pending = []
    if pending:
        raise DockerfileError(f"{path}:{start}: the instruction ends with a line continuation "
                              "(\\) at the end of the file; remove the trailing backslash")
    _check_order(path, instructions)
    return instructions


def _instruction(path: Path, text: str, line: int) -> Instruction:
    keyword, _, arguments = text.partition(" ")
    keyword = keyword.upper()
    if keyword not in INSTRUCTIONS:
        raise DockerfileError(f"{path}:{line}: unknown instruction {keyword!r}; "
                              f"valid: {', '.join(sorted(INSTRUCTIONS))}")
    arguments = arguments.strip()
    if not arguments:
        raise DockerfileError(f"{path}:{line}: {keyword} needs arguments")
    if keyword in _EXEC_FORM and arguments.startswith("["):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise DockerfileError(f"{path}:{line}: {keyword} exec form is not a JSON array "
                                  f'({err}); write it as ["executable", "arg", ...]') from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DockerfileError(f"{path}:{line}: {keyword} exec form must be a JSON array of "
                                  "strings")
    return Instruction(keyword, arguments, line)


def _check_order(path: Path, instructions: list[Instruction]) -> None:
    first = next((i for i in instructions if i.keyword != "ARG"), None)
    if first is None or first.keyword != "FROM":
        where = f"{path}:{first.line}" if first else str(path)
        raise DockerfileError(f"{where}: a Dockerfile must start with FROM (only ARG may come "
                              "before it)")


def build_args(instructions: list[Instruction]) -> dict[str, str | None]:
    """`ARG NAME[=default]` declarations: name -> default (None when it has none)."""
    args: dict[str, str | None] = {}
    for instruction in instructions:
        if instruction.keyword == "ARG":
            name, sep, default = instruction.arguments.partition("=")
            args[name.strip()] = " ".join(shlex.split(default)) if sep else None
    return args


def base_images(instructions: list[Instruction]) -> list[str]:
    """The images named by FROM, with `${ARG}` references replaced by the ARG defaults."""
    defaults = build_args(instructions)
    images = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            image = next(t for t in instruction.arguments.split() if not t.startswith("--"))
            for name, value in defaults.items():
                image = image.replace(f"${{{name}}}", value or "").replace(f"${name}", value or "")
            images.append(image)
    return images


def copied_sources(instructions: list[Instruction]) -> list[str]:
    """What COPY and ADD take from the build context (not from other build stages)."""
    sources: list[str] = []
    for instruction in instructions:
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        arguments = instruction.arguments
        words = json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        if any(flag.startswith("--from=") for flag in flags):
            continue
        sources += paths[:-1]
    return sources


def environment(instructions: list[Instruction]) -> dict[str, str]:
    """What the image's ENV instructions set, in order (a later ENV wins).

    Both forms: `ENV NAME=value [NAME=value ...]` (values quoted as in a shell) and the legacy
    `ENV NAME value`. `$NAME` and `${NAME}` refer to earlier ENVs and ARG defaults; a reference to
    anything else (what the base image sets, such as `$PATH`) is kept as written, since only the
    built image knows its value.
    """
    known: dict[str, str] = {k: v for k, v in build_args(instructions).items() if v is not None}
    values: dict[str, str] = {}

    def substitute(text: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                      lambda m: known.get(m.group(1) or m.group(2), m.group(0)), text)

    for instruction in instructions:
        if instruction.keyword != "ENV":
            continue
        words = shlex.split(instruction.arguments)
        if "=" in words[0]:
            pairs = [word.partition("=")[::2] for word in words]
        else:  # ENV NAME value with spaces
            pairs = [(words[0], instruction.arguments.split(None, 1)[1] if len(words) > 1 else "")]
        for name, value in pairs:
            known[name] = values[name] = substitute(value)
    return values
