"""InstructBLIP (instruction-aware Q-Former) against HF ``InstructBlipForConditionalGeneration`` (float32, CPU, tiny
random configs): HF directories via ``blip.load``, LAVIS-layout files (full and trainable-only + EVA file + LLM dir)
written from the HF weights with the renaming rules of HF's conversion script, and blip's HF export."""

import pytest
import torch
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, OPTConfig, T5Config

import blip
from blip.convert.blip2_hf import export_hf_llm as export_hf
from tiny_weights import randomize
from conftest import FIXTURES

NQ = 4
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=14)
QFORMER = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               cross_attention_frequency=1, max_position_embeddings=64, pad_token_id=0)
OPT = OPTConfig(vocab_size=99, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2, pad_token_id=1)
T5 = T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
              feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, bos_token_id=1)
QIDS = torch.tensor([[1, 20, 21, 22, 3], [1, 30, 31, 3, 0]])
PROMPT = torch.tensor([[2, 5, 6, 7], [2, 8, 9, 10]])




def hf_model(text, seed, vision=VISION, qformer=QFORMER, nq=NQ, image_token=98):
    cfg = InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text.to_dict() if hasattr(
        text, "to_dict") else text, num_query_tokens=nq, image_token_index=image_token)
    model = InstructBlipForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    return model


def images(n=2, seed=0, size=28):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def expand(ids, nq=NQ, token=98):
    return torch.cat([torch.full((ids.shape[0], nq), token), ids], 1)


def hf_generate(hf, px, prompt, nq=NQ, token=98, **kw):
    return hf.generate(pixel_values=px, qformer_input_ids=QIDS, qformer_attention_mask=(QIDS != 0).long(),
                       input_ids=expand(prompt, nq, token), do_sample=False, **kw)


def ours_generate(model, px, prompt, **kw):
    return model.generate(px, prompt, qformer_input_ids=QIDS, qformer_attention_mask=(QIDS != 0).long(), **kw)


@pytest.fixture(scope="module")
def opt_pair(tmp_path_factory):
    hf = hf_model(OPT, 3)
    d = tmp_path_factory.mktemp("instructblip_opt")
    hf.save_pretrained(d)
    return hf, blip.load(d)


def test_hf_opt_generate_and_logits(opt_pair):
    hf, ours = opt_pair
    assert type(ours).__name__ == "InstructBlipLanguageModel"
    px = images(seed=5)
    for kw in (dict(num_beams=1), dict(num_beams=3), dict(num_beams=3, eos_token_id=39)):
        ref = hf_generate(hf, px, PROMPT, max_new_tokens=8, **kw)
        got = ours_generate(ours, px, PROMPT, max_new_tokens=8, **kw)
        assert torch.equal(got, ref[:, NQ:]), (got, ref)
    with torch.no_grad():
        ref = hf(pixel_values=px, qformer_input_ids=QIDS, qformer_attention_mask=(QIDS != 0).long(),
                 input_ids=expand(PROMPT)).logits[:, NQ:]
        got = ours(px, PROMPT, qformer_input_ids=QIDS, qformer_attention_mask=(QIDS != 0).long()).logits
    assert (got - ref).abs().max() < 1e-4
    with pytest.raises(ValueError, match="qformer_input_ids"):
        ours(px, PROMPT)
    # the instruction changes what the queries carry
    other = ours.query_embeds(px, QIDS.flip(1), (QIDS.flip(1) != 0).long())
    assert (other - ours.query_embeds(px, QIDS, (QIDS != 0).long())).abs().max() > 1e-3


def test_hf_t5_generate(tmp_path):
    hf = hf_model(T5, 4)
    hf.save_pretrained(tmp_path)
    ours = blip.load(tmp_path)
    px, ids = images(seed=6), torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    for kw in (dict(num_beams=1), dict(num_beams=3)):
        ref = hf.generate(pixel_values=px, qformer_input_ids=QIDS, qformer_attention_mask=(QIDS != 0).long(),
                          input_ids=expand(ids), attention_mask=expand((ids != 0).long(), token=1), max_new_tokens=7,
                          do_sample=False, **kw)
        got = ours.generate(px, ids, (ids != 0).long(), qformer_input_ids=QIDS,
                            qformer_attention_mask=(QIDS != 0).long(), max_new_tokens=7, **kw)
        assert torch.equal(got, ref), (got, ref)


def test_export_round_trip(opt_pair, tmp_path):
    hf, ours = opt_pair
    export_hf(ours, tmp_path)
    again = InstructBlipForConditionalGeneration.from_pretrained(tmp_path).eval()
    px = images(seed=7)
    assert torch.equal(hf_generate(again, px, PROMPT, max_new_tokens=6, num_beams=3),
                       hf_generate(hf, px, PROMPT, max_new_tokens=6, num_beams=3))


# ---- LAVIS layout (blip2_vicuna_instruct), sizes of the tiny Llama arch ------------------------------------------

LLAMA = dict(model_type="llama", vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
EVA = dict(hidden_size=48, intermediate_size=209, num_hidden_layers=2, num_attention_heads=4, image_size=56,
           patch_size=14, layer_norm_eps=1e-6)
QF_LAVIS = dict(vocab_size=30523, hidden_size=32, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                cross_attention_frequency=2, max_position_embeddings=512, pad_token_id=0)


def hf_to_lavis(sd: dict) -> dict:
    """Inverse of HF's convert_instructblip_original_to_pytorch.py renaming (reference facts §2.3), written here."""
    out = {}
    for k, v in sd.items():
        if k.startswith("vision_model."):
            k = (k.replace("vision_model.embeddings.class_embedding", "visual_encoder.cls_token")
                  .replace("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed")
                  .replace("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj")
                  .replace("vision_model.post_layernorm", "ln_vision")
                  .replace("vision_model.encoder.layers", "visual_encoder.blocks")
                  .replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
                  .replace("self_attn.projection", "attn.proj").replace("self_attn.qkv", "attn.qkv"))
            if k.endswith("attn.qkv.bias"):
                q, _, vb = v.chunk(3)
                out[k.replace("qkv.bias", "q_bias")], out[k.replace("qkv.bias", "v_bias")] = q, vb
                continue
        elif k.startswith("qformer."):
            k = ("Qformer.bert." + k[len("qformer."):]).replace("embeddings.layernorm", "embeddings.LayerNorm")
            k = k.replace("attention.attention.", "attention.self.")
        k = k.replace("language_projection.", "llm_proj.").replace("language_model.", "llm_model.")
        out[k] = v
    return out


@pytest.mark.parametrize("trainable_only", [False, True])
def test_lavis_layout_vicuna_style(tmp_path, trainable_only):
    hf = hf_model(LLAMA, 8, vision=EVA, qformer=QF_LAVIS, nq=8, image_token=511)
    lavis = hf_to_lavis(hf.state_dict())
    kw = {}
    if trainable_only:  # LAVIS saves trainable parameters only; the ViT and LLM come from their own files
        torch.save({k[len("visual_encoder."):]: v for k, v in lavis.items() if k.startswith("visual_encoder.")},
                   tmp_path / "eva.pth")
        hf.language_model.save_pretrained(tmp_path / "llm")
        lavis = {k: v for k, v in lavis.items() if not k.startswith(("visual_encoder.", "llm_model."))}
        kw = dict(vision_weights=tmp_path / "eva.pth", llm=tmp_path / "llm")
    torch.save({"model": lavis}, tmp_path / "checkpoint.pth")
    # HF uses the ViT's eps for post_layernorm (ln_vision); LAVIS's ln_vision has 1e-5
    ours = blip.load(tmp_path / "checkpoint.pth", ln_vision_eps=1e-6, **kw)
    assert type(ours).__name__ == "InstructBlipLanguageModel"
    origins = ours.load_report.origins
    assert origins["llm"] == (str(tmp_path / "llm") if trainable_only else str(tmp_path / "checkpoint.pth"))
    px, prompt = images(seed=9, size=56), torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    for beams in (1, 3):
        ref = hf_generate(hf, px, prompt, nq=8, token=511, max_new_tokens=6, num_beams=beams)
        assert torch.equal(ours_generate(ours, px, prompt, max_new_tokens=6, num_beams=beams), ref[:, 8:])


def test_string_api_feeds_the_instruction_to_the_qformer():
    opt_dir = FIXTURES / "lavis" / "blip2_opt" / "opt_llm"
    model = blip.create_model("blip2_tiny_opt", "instruct", tokenizer=opt_dir).eval()
    inputs = model._encode_prompts(["Question: what is it? Short answer:"])
    assert inputs["qformer_input_ids"][0, 0].item() == 101  # [CLS] ... [SEP], BERT ids for the Q-Former
    assert len(model.answer(images(1, size=56), "what is it?", max_new_tokens=3)) == 1


def test_instruction_tuning_objective():
    from blip.objectives.blip2_stage2 import Blip2Stage2Objective
    opt_dir = FIXTURES / "lavis" / "blip2_opt" / "opt_llm"
    model = blip.create_model("blip2_tiny_opt", "instruct", tokenizer=opt_dir).train()
    objective = Blip2Stage2Objective(model)
    # fixture GPT2 BPE: bos 2; "a photo of" 68 279 75 401 82 276 73; "two" (no leading space) 404, " red" 416,
    # " cars" 350 86, "\n" 202, pad 1. The loss covers the output part only.
    batch = objective.causal_pair_batch(["a photo of", "a photo of"], ["two red cars", "two"])
    head = [2, 68, 279, 75, 401, 82, 276, 73]
    assert batch["input_ids"].tolist() == [head + [404, 416, 350, 86, 202], head + [404, 202, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100] * 8 + [404, 416, 350, 86, 202], [-100] * 8 + [404, 202] + [-100] * 3]
    loss = objective({"pixel_values": images(2, size=56), "text_input": ["what is it?", "where is it?"],
                      "text_output": ["a dog", "a park"]})["loss"]
    loss.backward()
    word = model.qformer.transformer.embeddings.word.weight
    assert word.grad is not None and word.grad[2054].abs().sum() > 0  # "what" reached the Q-Former
    assert all(p.grad is None for p in model.llm.parameters())
    with pytest.raises(ValueError, match="text_input"):
        objective({"pixel_values": images(2, size=56), "text": ["a dog", "a park"]})
