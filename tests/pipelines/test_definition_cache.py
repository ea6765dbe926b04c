"""`run` reuses a definition built from the same inputs instead of importing the SDK again."""

from pipelines import definition, recipe
from tests.pipelines.test_recipes import MINIMAL

SETTINGS = {"role_arn": "arn:aws:iam::123456789012:role/r", "bucket": "b",
            "region": "us-east-1", "image_tag": "tag1", "spot": False}


def test_the_same_inputs_reuse_the_definition_and_any_change_builds_anew(tmp_path, monkeypatch):
    path = tmp_path / "custom.yaml"
    path.write_text(MINIMAL)
    cache = tmp_path / "home" / "definitions"
    builds = []

    def build(chosen, **settings):
        builds.append(settings["bucket"])
        return f'{{"built": {len(builds)}}}'

    def cached(**changed):
        return definition.cached_definition_json(recipe.load(str(path)), cache,
                                                 **{**SETTINGS, **changed})

    monkeypatch.setattr(definition, "definition_json", build)
    first = cached()
    assert cached() == first and len(builds) == 1

    # Whatever the definition depends on makes another: the target, the image tag, spot, the recipe.
    cached(bucket="other")
    cached(image_tag="tag2")
    cached(spot=True)
    path.write_text(MINIMAL.replace("max_steps: 5", "max_steps: 6"))
    cached()
    assert len(builds) == 5
    assert len(list(cache.glob("*.json"))) == 5
