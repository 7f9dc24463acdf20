"""Edge cases end in a clear ValueError, not an IndexError (or worse) deep inside: too many tokens for the position
table, empty inputs to the string API and to generate, invalid sampling settings, a pretraining batch of one image."""

from __future__ import annotations

import pytest
import torch

import blip
from blip.generation import GenerationConfig


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {task: blip.create_model("blip_tiny", task).eval() for task in ("caption", "retrieval", "vqa")}


@pytest.mark.parametrize("options, message", [
    (dict(temperature=0.0, do_sample=True), "temperature must be a positive number, got 0.0"),
    (dict(temperature=-1.0), "temperature must be a positive number"),
    (dict(top_p=0.0, do_sample=True), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(max_new_tokens=3, min_new_tokens=5), r"min_new_tokens \(5\) > max_new_tokens \(3\)"),
])
def test_invalid_generation_settings(options, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**options)


def test_generation_settings_are_checked_through_the_models(models):
    pixels = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="top_p must be in"):
        models["caption"].caption(pixels, do_sample=True, num_beams=1, top_p=0.0)
    with pytest.raises(ValueError, match=r"min_new_tokens \(11\) > max_new_tokens \(6\)"):
        models["caption"].caption(pixels, max_new_tokens=6, min_new_tokens=11)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        models["caption"].generate(pixels, do_sample=True, temperature=0.0)


def test_more_tokens_than_positions(models):
    model = models["caption"]
    limit = model.cfg.text.max_position_embeddings
    ids = torch.full((1, limit + 1), 1037)
    with pytest.raises(ValueError, match=rf"text: {limit + 1} tokens, but the model has {limit} positions"):
        model(pixel_values=torch.randn(1, 3, 64, 64), input_ids=ids)
    with pytest.raises(ValueError, match=rf"prompt \+ max_new_tokens: {limit + 4} tokens"):
        model.generate(torch.randn(1, 3, 64, 64), torch.full((1, limit - 1), 1037), max_new_tokens=5)


def test_empty_inputs_to_the_string_api_and_generate(models):
    pixels = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="no texts given"):
        models["retrieval"].match(pixels, [])
    with pytest.raises(ValueError, match="no texts given"):
        models["vqa"].answer(pixels, [])
    with pytest.raises(ValueError, match="no images given"):
        models["caption"].caption([])
    with pytest.raises(ValueError, match="no images given"):
        models["caption"].caption(torch.zeros(0, 3, 64, 64))
    for beams in (1, 3):
        with pytest.raises(ValueError, match="empty batch"):
            models["caption"].generate(torch.zeros(0, 3, 64, 64), num_beams=beams, max_new_tokens=3)


def test_a_pretraining_batch_needs_two_distinct_images():
    from blip.models.blip import ARCHS
    from blip.objectives.blip_pretrain import BlipPretrain

    torch.manual_seed(0)
    model = BlipPretrain(ARCHS["blip_tiny"].with_overrides(image_size=32), queue_size=8)
    one = {"pixel_values": torch.randn(1, 3, 32, 32), "text": ["a dog"], "image_ids": torch.tensor([0]),
           "progress": 0.0}
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        model(one)
    same = {**one, "pixel_values": one["pixel_values"].repeat(2, 1, 1, 1), "text": ["a dog", "a puppy"],
            "image_ids": torch.tensor([0, 0])}
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        model(same)
