"""Acceptance 4: options that cannot coexist are refused at config load, naming both."""

from __future__ import annotations

import pytest

from sdlora.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("overrides", "first", "second"),
    [
        (["data.cache_latents=true", "data.crop=random"], "data.cache_latents", "data.crop"),
        (["data.cache_text_embeddings=true", "data.captions.shuffle_tags=true"], "data.cache_text_embeddings",
         "data.captions.shuffle_tags"),
        (["data.cache_text_embeddings=true", "data.captions.dropout=0.1"], "data.cache_text_embeddings",
         "data.captions.dropout"),
        (["data.cache_text_embeddings=true", "data.sources=[{path: x, captions: {tag_dropout: 0.2}}]"],
         "data.cache_text_embeddings", "data.sources[0].captions.tag_dropout"),
        (["data.cache_text_embeddings=true", "lora.train_text_encoder=true"], "data.cache_text_embeddings",
         "lora.train_text_encoder"),
    ],
)
def test_incompatible_options_are_refused_naming_both(overrides, first, second):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    message = str(caught.value)
    assert first in message and second in message and "drop" in message


def test_compatible_combinations_load():
    config = load_config(None, ["data.cache_latents=true", "data.random_flip=true", "data.cache_text_embeddings=true",
                                "data.captions.prefix=sks", "data.bucketing.enabled=true"])
    assert config.data.cache_latents and config.data.bucketing.step == 64
    assert config.data.resolved_sources()[0].captions.prefix == "sks"


def test_bucket_step_must_be_a_multiple_of_8():
    with pytest.raises(ConfigError, match="data.bucketing.step: .*multiple of 8"):
        load_config(None, ["data.bucketing.step=12"])
