"""Static-shape decoding: the decode loop under torch.compile gives the eager loop's ids (greedy, beam 3, sampling
with per-row generators, rows stopping at different steps) for BLIP, the BLIP-2 Q-Former and HF OPT / T5 LLMs;
it compiles without graph breaks, once per chunk length, and a second call with new inputs compiles nothing.

A counting backend stands in for inductor: dynamo traces exactly what inductor would receive (``fullgraph=True``
turns any graph break into an error), without inductor's slow code generation."""
import pytest
import torch
from torch._dynamo.utils import counters

from blip import create_model as create_blip2
from blip.models.blip import create as create_blip
from blip.models.blip2_llm import create as create_blip2_llm
from tiny_weights import randomize


class CountingBackend:
    """A torch.compile backend that runs the traced graph as is and counts the graphs it was given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def fresh_dynamo(one_thread):
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def pixels(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def blip_caption():
    model = create_blip("blip_tiny", "caption", image_size=64)
    randomize(model, 0)
    return model.eval()


def qformer():
    model = create_blip2("blip2_tiny_qformer", "qformer")
    randomize(model, 0)
    return model.eval()


def llm(arch):
    model = create_blip2_llm(arch, "stage2")
    randomize(model, 0)
    return model.eval()


# (model, image size, prompt): LLM rows get different prompts, so that they decode different text
MODELS = {"blip": (blip_caption, 64, None), "qformer": (qformer, 56, None),
          "opt": (lambda: llm("blip2_tiny_opt"), 56, torch.tensor([[2, 17], [2, 230], [2, 401]])),
          "t5": (lambda: llm("blip2_tiny_t5"), 56, torch.tensor([[17, 1], [230, 1], [401, 1]]))}
MODES = {"greedy": {}, "beam3": {"num_beams": 3}, "sample": {"do_sample": True, "top_p": 0.9, "temperature": 1.5}}


def set_eos(name, model, kw, eos):
    if name == "blip":
        model.cfg.sep_token_id = eos
    else:
        kw["eos_token_id"] = eos


def first_hits(ids, start, token):
    return tuple(int((row[start:] == token).nonzero()[0]) if (row[start:] == token).any() else -1 for row in ids)


def eager_with_uneven_stops(name, model, px, prompt, kw):
    """Pick an eos among the tokens decoded without one such that rows stop at different steps (or never);
    return the eager ids with it and its start of the new tokens."""
    probe = run(model, px, prompt, kw)
    start = probe.shape[1] - 7
    for token in dict.fromkeys(probe[:, start + 1:].flatten().tolist()):
        set_eos(name, model, kw, token)
        eager = run(model, px, prompt, kw)
        hits = first_hits(eager, start, token)
        if len(set(hits)) > 1 and max(hits) >= 0:
            return eager
    raise AssertionError(f"no token stops the rows unevenly in {probe}")


def run(model, px, prompt, kw, **extra):
    if kw.get("do_sample"):  # fresh per-row generators for every run
        extra["generator"] = [torch.Generator().manual_seed(100 + i) for i in range(px.shape[0])]
    return model.generate(px, prompt, max_new_tokens=7, **kw, **extra)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_compiled_decoding_gives_eager_ids(name, mode):
    build, size, prompt = MODELS[name]
    model, px, kw = build(), pixels(3, size), dict(MODES[mode])
    eager = eager_with_uneven_stops(name, model, px, prompt, kw)

    backend = CountingBackend()
    compiled = run(model, px, prompt, kw, compile=backend, stop_check_every=3)
    assert torch.equal(compiled, eager), (compiled, eager)
    assert 1 <= backend.graphs <= 2  # chunks of 3 steps, then the final chunk: not one graph per step
    assert not counters["graph_break"], dict(counters["graph_break"])

    graphs = backend.graphs  # new images, same shapes: nothing is compiled again
    assert run(model, pixels(3, size, seed=1), prompt, kw, compile=backend, stop_check_every=3).shape[0] == 3
    assert backend.graphs == graphs


def test_chunked_stop_checks_do_not_change_ids():
    """Stop checks every k steps (extra steps after everyone stopped decode pad / are frozen) change nothing."""
    model, px = blip_caption(), pixels(4, 64)
    probe = model.generate(px, max_new_tokens=8)
    model.cfg.sep_token_id = int(probe[1, 2])
    for kw in ({}, {"num_beams": 3}, {"num_beams": 3, "beam_length_convention": "total"},
               {"repetition_penalty": 1.5, "min_new_tokens": 2}):
        eager = model.generate(px, max_new_tokens=8, **kw)
        for every in (2, 5, 8):
            assert torch.equal(model.generate(px, max_new_tokens=8, stop_check_every=every, **kw), eager), (kw, every)


def test_aot_autograd_keeps_in_place_state_updates():
    """inductor sees the graph after AOT autograd's functionalisation of the in-place state and cache updates."""
    model, px = blip_caption(), pixels(2, 64)
    eager = model.generate(px, max_new_tokens=5, num_beams=2)
    compiled = model.generate(px, max_new_tokens=5, num_beams=2, compile="aot_eager", stop_check_every=5)
    assert torch.equal(compiled, eager)


def test_load_compile_switch(tmp_path):
    """blip.load(compile=True) compiles every ViT block in place and makes compiled decoding generate()'s default."""
    import blip
    from transformers import BlipConfig, BlipForConditionalGeneration
    cfg = BlipConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=16),
                     text_config=dict(vocab_size=30524, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4))
    BlipForConditionalGeneration(cfg).save_pretrained(tmp_path)
    model = blip.load(tmp_path, compile=True)
    assert model.compile_decoding is True
    assert all(block._compiled_call_impl is not None for block in model.visual_encoder.blocks)
    assert list(model.state_dict()) == list(blip.load(tmp_path).state_dict())  # names unchanged

    captioner, px = blip_caption(), pixels(2, 64)
    eager = captioner.generate(px, max_new_tokens=4)
    captioner.compile_decoding = backend = CountingBackend()  # the model's default reaches the decode loop
    assert torch.equal(captioner.generate(px, max_new_tokens=4), eager) and backend.graphs >= 1
