"""Recipes: YAML files naming a lifecycle path, its parameter defaults and stage settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipelines import UserError

RECIPES_DIR = Path(__file__).parent / "recipes"
_KEYS = {"name", "description", "model_package_group", "parameters", "stages", "gate"}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    model_package_group: str
    parameters: dict[str, object]
    stages: dict[str, dict[str, object]]
    gate_metric: str
    source: Path = field(compare=False)


def available() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load(name_or_path: str) -> Recipe:
    """A recipe by name (`sft-lora`) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"recipe {name_or_path!r} not found; available: {', '.join(available())} "
                        "(or give a path to a recipe YAML file)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping with keys {', '.join(sorted(_KEYS))}")
    unknown = set(data) - _KEYS
    if unknown:
        raise UserError(f"{path}: unknown recipe key(s) {', '.join(sorted(unknown))}; "
                        f"valid keys: {', '.join(sorted(_KEYS))}")
    for key in ("name", "model_package_group", "parameters", "stages", "gate"):
        if key not in data:
            raise UserError(f"{path}: missing recipe key {key!r}")
    for key in ("parameters", "stages", "gate"):
        if not isinstance(data[key], dict):
            raise UserError(f"{path}: {key!r} must be a mapping")
    for stage, settings in data["stages"].items():
        if not isinstance(settings, dict):
            raise UserError(f"{path}: stages.{stage} must be a mapping of settings")
    if "metric" not in data["gate"]:
        raise UserError(f"{path}: gate.metric is required (a metric name of evaluation.json)")
    return Recipe(
        name=str(data["name"]),
        description=" ".join(str(data.get("description", "")).split()),
        model_package_group=str(data["model_package_group"]),
        parameters=dict(data["parameters"]),
        stages={k: dict(v) for k, v in data["stages"].items()},
        gate_metric=str(data["gate"]["metric"]),
        source=path,
    )
