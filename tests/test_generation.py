"""blip.generation against HF transformers' own generate(), driving the same tiny HF LM through our loops."""
import pytest
import torch
from transformers import DynamicCache, OPTConfig, OPTForCausalLM

from blip.generation import GenerationConfig, apply_repetition_penalty, generate, top_p_filter
from blip.models.frozen_llm import _cache_kwarg


def tiny_lm(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32, init_std=0.3, bos_token_id=2,
                    eos_token_id=2, pad_token_id=1)
    return OPTForCausalLM(cfg).eval()


class HFStep:
    """Our step/reorder protocol over an HF causal LM with its DynamicCache."""

    def __init__(self, lm):
        self.lm, self.cache = lm, DynamicCache()
        self.cache_kwarg = _cache_kwarg(lm)  # transformers renamed past_key_values -> cache

    def __call__(self, ids, mask):  # mask spans the final length: HF's dynamic cache wants the keys so far
        mask = mask[:, :self.cache.get_seq_length() + ids.shape[1]]
        out = self.lm(input_ids=ids, attention_mask=mask, use_cache=True, **{self.cache_kwarg: self.cache})
        return out.logits[:, -1]

    def reorder(self, index):
        self.cache.reorder_cache(index)


PROMPT = torch.tensor([[2, 10, 11, 12], [2, 20, 21, 22]])


def ours(lm, prompt, **kw):
    cfg = GenerationConfig(eos_token_id=kw.pop("eos", 5), pad_token_id=1, **kw)
    ids = prompt.repeat_interleave(cfg.num_beams, 0)
    step = HFStep(lm)
    return generate(step, ids, torch.ones_like(ids), cfg, reorder=step.reorder)


def theirs(lm, prompt, **kw):
    eos = kw.pop("eos", 5)
    return lm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), eos_token_id=eos, pad_token_id=1,
                       do_sample=False, **kw)


def compare_until_eos(a, b, eos):
    """HF fills finished beams with pad or eos depending on pad's truthiness; compare through the first eos."""
    assert a.shape == b.shape, (a, b)
    for ra, rb in zip(a.tolist(), b.tolist()):
        cut = ra.index(eos) + 1 if eos in ra else len(ra)
        assert ra[:cut] == rb[:cut], (ra, rb)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_hf(seed):
    lm = tiny_lm(seed)
    for eos in (5, int(lm(input_ids=PROMPT).logits[0, -1].argmax())):  # the second makes row 0 stop at once
        kw = dict(max_new_tokens=8, min_new_tokens=0, eos=eos)
        assert torch.equal(ours(lm, PROMPT, **kw), theirs(lm, PROMPT, **kw))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_matches_hf(seed, num_beams):
    lm = tiny_lm(seed)
    # pick an eos that the beams actually produce, so finished hypotheses and early stopping are exercised
    probe = theirs(lm, PROMPT, max_new_tokens=6, num_beams=num_beams, eos=63)
    eos = int(probe[0, PROMPT.shape[1] + 2])
    for kw in (dict(max_new_tokens=8), dict(max_new_tokens=8, min_new_tokens=3),
               dict(max_new_tokens=6, length_penalty=0.5),
               dict(max_new_tokens=7, repetition_penalty=1.3), dict(max_new_tokens=8, early_stopping=True)):
        a = ours(lm, PROMPT, num_beams=num_beams, eos=eos, **kw)
        b = theirs(lm, PROMPT, num_beams=num_beams, eos=eos, **kw)
        compare_until_eos(a, b, eos)


def test_repetition_penalty_and_min_tokens_greedy():
    lm = tiny_lm(4)
    kw = dict(max_new_tokens=10, min_new_tokens=4, repetition_penalty=1.5, eos=7)
    assert torch.equal(ours(lm, PROMPT, **kw), theirs(lm, PROMPT, **kw))


def test_repetition_penalty_hand_computed():
    scores = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seqs = torch.tensor([[0, 1, 1]])
    out = apply_repetition_penalty(scores, seqs, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, 0.5]]))


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = top_p_filter(probs.log(), 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert top_p_filter(probs.log(), 0.01).isfinite().sum() == 1


def test_sampling_is_seeded_and_respects_nucleus():
    lm = tiny_lm(5)
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, top_p=0.5, eos_token_id=None, pad_token_id=1)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(123)
        step = HFStep(lm)
        runs.append(generate(step, PROMPT, None, cfg, generator=g))
    assert torch.equal(runs[0], runs[1])
    # every sampled token lies inside the nucleus of its step (checked by teacher forcing)
    seq = runs[0]
    logits = lm(input_ids=seq).logits[:, PROMPT.shape[1] - 1:-1]
    for t in range(seq.shape[1] - PROMPT.shape[1]):
        allowed = top_p_filter(logits[:, t], 0.5).isfinite()
        assert allowed.gather(1, seq[:, PROMPT.shape[1] + t, None]).all()


def test_per_row_generators_make_rows_independent_of_the_batch():
    lm = tiny_lm(6)
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, top_p=0.8, eos_token_id=None, pad_token_id=1)
    prompts = torch.tensor([[2, 10, 11, 12], [2, 20, 21, 22], [2, 30, 31, 32]])
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = generate(HFStep(lm), prompts, None, cfg, generator=gens([7, 8, 9]))
    alone = generate(HFStep(lm), prompts[1:2], None, cfg, generator=gens([8]))
    assert torch.equal(batch[1:2], alone)
    # the sampled tokens follow the nucleus of each step (teacher forcing)
    logits = lm(input_ids=batch).logits[:, prompts.shape[1] - 1:-1]
    for t in range(batch.shape[1] - prompts.shape[1]):
        allowed = top_p_filter(logits[:, t], 0.8).isfinite()
        assert allowed.gather(1, batch[:, prompts.shape[1] + t, None]).all()
    with pytest.raises(ValueError, match="one per row"):
        generate(HFStep(lm), prompts, None, cfg, generator=gens([1]))


def test_per_row_sampling_follows_the_distribution():
    # a fixed distribution: the step ignores its inputs
    probs = torch.tensor([0.5, 0.3, 0.2])
    step = lambda ids, mask: probs.log().expand(ids.shape[0], 3)  # noqa: E731
    cfg = GenerationConfig(max_new_tokens=1, do_sample=True, eos_token_id=None)
    rows = 3000
    out = generate(step, torch.zeros(rows, 1, dtype=torch.long), None, cfg,
                   generator=[torch.Generator().manual_seed(i) for i in range(rows)])
    freq = torch.bincount(out[:, 1], minlength=3).float() / rows
    assert torch.allclose(freq, probs, atol=0.03)
