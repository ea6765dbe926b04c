"""`run` reuses a definition built from the same inputs instead of importing the SDK again."""

import argparse
import dataclasses

from pipelines import cli
from tests.pipelines.test_recipes import MINIMAL

TARGET = cli.Target(region="us-east-1", account="123456789012",
                    role_arn="arn:aws:iam::123456789012:role/r", bucket="b", endpoint="local")


def test_the_same_inputs_reuse_the_definition_and_any_change_builds_anew(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PIPELINE_HOME", str(tmp_path / "home"))
    path = tmp_path / "custom.yaml"
    path.write_text(MINIMAL)
    builds = []

    def build(args, chosen, target):
        builds.append(target.bucket)
        return f'{{"built": {len(builds)}}}'

    def cached(args, target):
        return cli._build_cached(args, cli.recipe.load(args.recipe), target)

    monkeypatch.setattr(cli, "_build_for", build)
    args = argparse.Namespace(recipe=str(path), image_tag="tag1", spot=False)
    first = cached(args, TARGET)
    assert cached(args, TARGET) == first and len(builds) == 1

    # Whatever the definition depends on makes another: the target, the image tag, spot, the recipe.
    cached(args, dataclasses.replace(TARGET, bucket="other"))
    cached(argparse.Namespace(recipe=str(path), image_tag="tag2", spot=False), TARGET)
    cached(argparse.Namespace(recipe=str(path), image_tag="tag1", spot=True), TARGET)
    path.write_text(MINIMAL.replace("max_steps: 5", "max_steps: 6"))
    cached(args, TARGET)
    assert len(builds) == 5
    assert len(list((tmp_path / "home" / "definitions").glob("*.json"))) == 5

