"""The Train tab's form is the config schema: every field, with its default; its values become a config dict."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from sdlora.config import ConfigError, RunConfig, validate_config
from sdlora.ui import form


def _leaves(model, prefix=""):
    for name, info in model.model_fields.items():
        annotation = form._plain(info.annotation)[0]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaves(annotation, prefix + name + ".")
        else:
            yield prefix + name


def test_every_schema_field_is_in_the_form_with_its_description():
    schema = form.fields()
    assert [f.key for f in schema] == list(_leaves(RunConfig))
    steps = next(f for f in schema if f.key == "train.steps")
    assert steps.kind == "int" and steps.default == RunConfig().train.steps
    assert steps.description == RunConfig.model_fields["train"].annotation.model_fields["steps"].description
    scheduler = next(f for f in schema if f.key == "train.lr_scheduler")
    assert scheduler.kind == "choice" and "cosine" in scheduler.choices


def test_defaults_give_an_empty_config_and_changed_values_round_trip():
    schema = form.fields()
    assert form.to_config_dict(schema, [f.default for f in schema]) == {}
    wanted = {"model": {"base": "sdlora:tiny"}, "train": {"steps": 3, "lr_scheduler": "cosine"},
              "sample": {"prompts": ["a b", "c"]}, "data": {"resolution": 64}}
    data = form.to_config_dict(schema, form.from_config_dict(schema, wanted))
    config = validate_config(data)
    assert config.train.steps == 3 and config.sample.prompts == ("a b", "c") and config.model.base == "sdlora:tiny"


def test_a_field_whose_yaml_cannot_parse_is_named():
    schema = form.fields()
    values = [("[a, b" if f.key == "sample.prompts" else f.default) for f in schema]
    with pytest.raises(ConfigError, match="sample.prompts"):
        form.to_config_dict(schema, values)


def test_each_error_belongs_to_its_field():
    schema = form.fields()
    values = {"train.steps": -3, "sample.prompts": "[a, b", "validation.fraction": 0.5, "validation.path": "held-out"}
    errors = form.field_errors(schema, [values.get(f.key, f.default) for f in schema])
    assert set(errors) == {"train.steps", "sample.prompts", "validation.path"}
    assert errors["train.steps"] == "the form: train.steps: Input should be greater than or equal to 1 (got -3)"
    assert errors["sample.prompts"].startswith("sample.prompts: cannot parse")
    # An error of the whole section goes to the first field its message names.
    assert "validation.path cannot be combined with validation.fraction" in errors["validation.path"]
    assert form.field_errors(schema, [f.default for f in schema]) == {}
