"""The tiny tokenizer and model every generation test module samples from (one of each
per module: a test may change a model's config)."""

import pytest

from sampling_cases import make_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok))
