"""`run` reuses a definition built from the same inputs instead of importing the SDK again."""

import argparse

from pipelines import cli
from tests.pipelines.test_recipes import MINIMAL

TARGET = {"role_arn": "arn:aws:iam::123456789012:role/r", "bucket": "b", "region": "us-east-1"}


def test_the_same_inputs_reuse_the_definition_and_any_change_builds_anew(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PIPELINE_HOME", str(tmp_path / "home"))
    path = tmp_path / "custom.yaml"
    path.write_text(MINIMAL)
    builds = []

    def build(args, target):
        builds.append(target["bucket"])
        return cli.recipe.load(args.recipe), f'{{"built": {len(builds)}}}'

    monkeypatch.setattr(cli, "_build_for", build)
    args = argparse.Namespace(recipe=str(path), image_tag="tag1", spot=False)
    first = cli._build_cached(args, TARGET)[1]
    assert cli._build_cached(args, TARGET)[1] == first and len(builds) == 1

    # Whatever the definition depends on makes another: the target, the image tag, spot, the recipe.
    cli._build_cached(args, {**TARGET, "bucket": "other"})
    cli._build_cached(argparse.Namespace(recipe=str(path), image_tag="tag2", spot=False), TARGET)
    cli._build_cached(argparse.Namespace(recipe=str(path), image_tag="tag1", spot=True), TARGET)
    path.write_text(MINIMAL.replace("max_steps: 5", "max_steps: 6"))
    cli._build_cached(args, TARGET)
    assert len(builds) == 5
    assert len(list((tmp_path / "home" / "definitions").glob("*.json"))) == 5

