"""BLIP-2 LLM models: stage-2 objective (hand-computed labels on the real fixture tokenizers), gradients, padding,
precision, the stage-1 hand-off and the string API."""

import pytest
import torch

import blip
from blip.models.blip2_llm import create
from blip.objectives.blip2_stage2 import Blip2Stage2Objective
from blip.models.blip2_llm_strings import chat_prompt
from tiny_weights import randomize
from conftest import FIXTURES

LAVIS = FIXTURES / "lavis"
OPT_DIR, T5_DIR = LAVIS / "blip2_opt" / "opt_llm", LAVIS / "blip2_t5" / "t5_llm"




def tiny(arch: str, seed: int = 0, **kw):
    model = create(arch, "stage2", **kw)
    randomize(model, seed)
    return model.eval()


def pixels(n=2, seed=0):
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


# ---- stage-2 objective: labels by hand ------------------------------------------------------------------------

def test_opt_labels_hand_computed():
    # fixture GPT2 BPE: bos "</s>"=2, pad=1, "\n"=202; "a photo of" -> 68 279 75 401 82 276 73 (7 tokens + bos = the
    # prompt length LAVIS masks); " a dog sitting on a bench" -> 263 414 388 305 263 390; " two red cars" -> 261 339
    # 416 350 86
    model = create("blip2_tiny_opt", "stage2", tokenizer=OPT_DIR)
    objective = Blip2Stage2Objective(model, prompt="a photo of ")
    assert objective.prompt_length() == 8
    batch = objective.causal_batch(["a dog sitting on a bench", "two red cars"])
    prompt = [2, 68, 279, 75, 401, 82, 276, 73]
    assert batch["input_ids"].tolist() == [prompt + [263, 414, 388, 305, 263, 390, 202],
                                           prompt + [261, 339, 416, 350, 86, 202, 1]]
    assert batch["labels"].tolist() == [[-100] * 8 + [263, 414, 388, 305, 263, 390, 202],
                                        [-100] * 8 + [261, 339, 416, 350, 86, 202, -100]]
    model.tokenizer.padding_side = "left"  # training batches are right padded whatever the tokenizer says
    assert torch.equal(objective.causal_batch(["a dog sitting on a bench", "two red cars"])["labels"], batch["labels"])
    # no prompt: only the bos and the padding are excluded; "two" at the start of the text has no leading space:
    # vocab.json "two" = 404 (merge "t wo"), unlike " two" = "Ġt" "wo" = 261 339 above
    plain = Blip2Stage2Objective(model).causal_batch(["two red cars", "a photo of"])
    assert plain["labels"].tolist() == [[-100, 404, 416, 350, 86, 202, -100, -100, -100],
                                        [-100, 68, 279, 75, 401, 82, 276, 73, 202]]


def test_opt_bos_target_restores_lavis_last_query_term():
    # LAVIS Blip2OPT, empty prompt: targets = [-100] * Q + ids (pad -> -100), HF's shift scores position Q - 1 (the
    # last query) against the bos. bos_target=True computes that loss; the default leaves the bos term out.
    model = tiny("blip2_tiny_opt", 2, tokenizer=OPT_DIR)
    texts, px = ["two red cars", "a photo of"], pixels(2, 3)
    lavis = Blip2Stage2Objective(model, bos_target=True)
    batch = lavis.causal_batch(texts)
    assert batch["labels"].tolist() == [[2, 404, 416, 350, 86, 202, -100, -100, -100],
                                        [2, 68, 279, 75, 401, 82, 276, 73, 202]]
    with torch.no_grad():
        queries = model.query_embeds(px)
        q = queries.shape[1]
        embeds = torch.cat([queries, model.llm.get_input_embeddings()(batch["input_ids"])], dim=1)
        mask = torch.cat([torch.ones(2, q, dtype=torch.long), batch["attention_mask"]], dim=1)
        logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits.float()   # [B, Q + T, V]
        targets = torch.cat([torch.full((2, q), -100), batch["input_ids"].masked_fill(mask[:, q:] == 0, -100)], 1)
        per_pos = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets[:, 1:],
                                                    ignore_index=-100, reduction="none")   # [B, Q + T - 1]
        supervised = targets[:, 1:] != -100
        assert supervised[:, :q - 1].sum() == 0 and supervised[:, q - 1].all()   # the last query -> bos
        by_hand = per_pos[supervised].mean()
        without_bos = per_pos[:, q:][supervised[:, q:]].mean()
        loss = lavis({"pixel_values": px, "text": texts})["loss"]
        default = Blip2Stage2Objective(model)({"pixel_values": px, "text": texts})["loss"]
    assert abs(loss.item() - by_hand.item()) < 1e-5
    assert abs(default.item() - without_bos.item()) < 1e-5 and abs(loss.item() - default.item()) > 1e-4
    # with a prompt LAVIS masks the prompt and its bos: the switch changes nothing
    prompted = Blip2Stage2Objective(model, prompt="a photo of ", bos_target=True).causal_batch(texts)["labels"]
    assert torch.equal(prompted, Blip2Stage2Objective(model, prompt="a photo of ").causal_batch(texts)["labels"])


def test_t5_prefix_split_hand_computed():
    # fixture sentencepiece (LAVIS's t5_input_ids / t5_labels): "what color is the car?" -> 11 295 296 75 11 68 45 282
    # 45 298 90 7 57 15 (14 tokens), "a dog" -> 3 33 58; </s> = 1, pad = 0, decoder start = 0
    model = create("blip2_tiny_t5", "stage2", tokenizer=T5_DIR)
    objective = Blip2Stage2Objective(model)
    batch = objective.prefix_lm_batch(["what color is the car?", "a dog"], splits=[3, 1])
    assert batch["input_ids"].tolist() == [[11, 295, 296, 1], [3, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[75, 11, 68, 45, 282, 45, 298, 90, 7, 57, 15, 1], [33, 58, 1] + [-100] * 9]
    assert batch["decoder_input_ids"].tolist() == [[0, 75, 11, 68, 45, 282, 45, 298, 90, 7, 57, 15],
                                                   [0, 33, 58, 1] + [0] * 8]
    assert batch["decoder_attention_mask"].tolist() == [[1] * 12, [1, 1, 1] + [0] * 9]


def test_t5_split_point_is_uniform_from_1_to_midpoint():
    model = create("blip2_tiny_t5", "stage2", tokenizer=T5_DIR)
    objective = Blip2Stage2Objective(model, generator=torch.Generator().manual_seed(0))
    draws = [objective.split_point(10) for _ in range(300)]
    assert set(draws) == {1, 2, 3, 4, 5}
    assert all(objective.split_point(n) == 1 for n in (1, 2, 3))
    # drawn splits: encoder prefix + decoder suffix always give back the caption
    ids = model.tokenizer("what color is the car?", add_special_tokens=False).input_ids
    for _ in range(20):
        b = objective.prefix_lm_batch(["what color is the car?"])
        enc = b["input_ids"][0, :-1].tolist()
        dec = b["labels"][0, :-1].tolist()
        assert enc + dec == ids and 1 <= len(enc) <= len(ids) // 2


@pytest.mark.parametrize("arch,tok", [("blip2_tiny_opt", OPT_DIR), ("blip2_tiny_t5", T5_DIR)])
def test_gradients_reach_qformer_and_projection_only(arch, tok):
    model = tiny(arch, 1, tokenizer=tok).train()
    objective = Blip2Stage2Objective(model, generator=torch.Generator().manual_seed(0))
    loss = objective({"pixel_values": pixels(), "text": ["a dog sitting on a bench", "two red cars"]})["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        frozen = name.startswith("llm.") or name.startswith("image_encoder.visual_encoder.")
        assert p.requires_grad == (not frozen), name
        if frozen:
            assert p.grad is None, name
    trained = ("qformer.query_tokens", "llm_proj.weight", "image_encoder.ln_vision.weight",
               "qformer.transformer.layers.0.cross_attn.kv.weight")
    grads = dict(model.named_parameters())
    for name in trained:
        assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, name
    assert not model.llm.training and not model.image_encoder.visual_encoder.training  # frozen towers stay eval


# ---- padding --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["blip2_tiny_llama", "blip2_tiny_opt", "blip2_tiny_t5"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batch_of_different_prompt_lengths_equals_each_alone(arch, num_beams):
    model = tiny(arch, 2)
    pad = model.pad_token_id
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    ids = torch.tensor([r + [pad] * (5 - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (5 - len(r)) for r in rows])
    px = pixels(3, 7)
    batch = model.generate(px, ids, mask, max_new_tokens=6, num_beams=num_beams, eos_token_id=None)
    left = model.generate(px, torch.tensor([[pad] * (5 - len(r)) + r for r in rows]), mask.flip(1), max_new_tokens=6,
                          num_beams=num_beams, eos_token_id=None)  # the padding side of the input does not matter
    assert torch.equal(left, batch)
    for i, r in enumerate(rows):
        alone = model.generate(px[i:i + 1], torch.tensor([r]), max_new_tokens=6, num_beams=num_beams,
                               eos_token_id=None)
        assert torch.equal(alone[0, -6:], batch[i, -6:]), (arch, i)
    # the teacher-forced logits of a padded row equal the unpadded row's (positions come from the mask)
    with torch.no_grad():
        if model.is_seq2seq:
            dec = torch.tensor([[0, 3, 4]] * 3)
            full = model(px, torch.tensor([[pad] * (5 - len(r)) + r for r in rows]), mask.flip(1),
                         decoder_input_ids=dec).logits
            one = model(px[1:2], torch.tensor([rows[1]]), decoder_input_ids=dec[:1]).logits
            assert (full[1] - one[0]).abs().max() < 1e-4
        else:
            full = model(px, ids, mask).logits
            one = model(px[1:2], torch.tensor([rows[1]])).logits
            assert (full[1, :2] - one[0]).abs().max() < 1e-4


# ---- precision, hand-off, API ---------------------------------------------------------------------------------

def test_frozen_towers_in_bf16_trainable_parts_in_fp32():
    ref = tiny("blip2_tiny_opt", 3)
    model = create("blip2_tiny_opt", "stage2", dtype="bf16").eval()
    model.load_state_dict(ref.state_dict())
    vit = model.image_encoder.visual_encoder
    assert vit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16 and vit.blocks[0].norm1.weight.dtype == torch.float32
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.qformer.parameters())
    assert model.llm_proj.weight.dtype == torch.float32 and model.image_encoder.ln_vision.weight.dtype == torch.float32
    ids = torch.tensor([[2, 5, 6, 7]])
    out = model(pixels(1), ids)
    assert out.query_embeds.dtype == torch.bfloat16
    with torch.no_grad():
        want = ref(pixels(1), ids).logits
    assert (out.logits.float() - want).abs().max() < 0.05 * want.abs().max()
    out.logits.float().sum().backward()
    assert model.qformer.query_tokens.grad.dtype == torch.float32
    # the same policy after loading: cast_frozen (model.to(dtype) would also cast the Q-Former)
    ref.cast_frozen("fp16")
    assert ref.llm.get_input_embeddings().weight.dtype == torch.float16
    assert ref.qformer.query_tokens.dtype == torch.float32 and ref.llm_proj.weight.dtype == torch.float32


def test_stage1_checkpoint_hands_off_in_one_line(tmp_path):
    # a stage-1 model (word embeddings, text FFN, heads) with the tiny stage-2 Q-Former's sizes
    stage2 = create("blip2_tiny_opt", "stage2")
    text = stage2.config.qformer.text
    qcfg = type(stage2.config.qformer)(type(text)(**{**text.__dict__, "word_embeddings": True, "text_ffn": True}),
                                       stage2.config.qformer.num_query_tokens)
    stage1 = blip.create_model("blip2_tiny_qformer", "qformer", qformer=qcfg)
    torch.save(stage1.state_dict(), tmp_path / "stage1.pth")
    model = blip.create_model("blip2_tiny_opt", "stage2", qformer_from=tmp_path / "stage1.pth")
    s1 = stage1.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith("qformer.") or k.startswith("image_encoder.ln_vision."):
            assert torch.equal(v, s1[k]), k
    assert "qformer.transformer.embeddings.word.weight" not in model.state_dict()
    instruct = blip.create_model("blip2_tiny_opt", "instruct", qformer_from=tmp_path / "stage1.pth")
    assert torch.equal(instruct.qformer.transformer.embeddings.word.weight,
                       s1["qformer.transformer.embeddings.word.weight"])


def test_lavis_stage1_checkpoint_hands_off():
    from blip.models.qformer import QFormerConfig, qformer_config
    lavis = torch.load(LAVIS / "blip2_qformer" / "checkpoint.pth", weights_only=True)["model"]
    sizes = qformer_config(48, hidden_size=16, num_heads=2, num_layers=4, intermediate_size=64, word_embeddings=False,
                           text_ffn=False)  # the blip2_qformer fixture's Q-Former
    model = blip.create_model("blip2_tiny_opt", "stage2", qformer=QFormerConfig(sizes, 8),
                              qformer_from=LAVIS / "blip2_qformer" / "checkpoint.pth")
    layer = "Qformer.bert.encoder.layer.2."
    ours = model.qformer.transformer.layers[2]
    assert torch.equal(model.qformer.query_tokens, lavis["query_tokens"])
    assert torch.equal(model.image_encoder.ln_vision.weight, lavis["ln_vision.weight"])
    assert torch.equal(ours.ffn_query.fc1.weight, lavis[layer + "intermediate_query.dense.weight"])
    assert torch.equal(ours.cross_attn.kv.weight, torch.cat([lavis[layer + "crossattention.self.key.weight"],
                                                             lavis[layer + "crossattention.self.value.weight"]]))
    assert model.stage1_report.origins["qformer"].endswith("checkpoint.pth")


def test_chat_prompt_and_string_api():
    assert chat_prompt(["what is it?", "a dog.", "what color?"]) == \
        "Question: what is it? Answer: a dog. Question: what color? Answer:"
    with pytest.raises(ValueError):
        chat_prompt(["q", "a"])
    model = tiny("blip2_tiny_opt", 4, tokenizer=OPT_DIR)
    images = [LAVIS / "images" / "img0.png", LAVIS / "images" / "img1.png"]
    caps = model.caption(images, max_new_tokens=5, num_beams=2)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    ans = model.answer(images, ["what is it?", "where?"], max_new_tokens=4)
    assert len(ans) == 2
    assert len(model.chat(images, ["what is it?", "a dog", "what color?"], max_new_tokens=4)) == 2


def test_image_never_reaches_the_llm_without_queries():
    model = tiny("blip2_tiny_opt", 5)
    with pytest.raises(ValueError, match="pixel_values"):
        model.generate(None, torch.tensor([[2, 5]]))
    with pytest.raises(ValueError, match="no text input"):
        model(pixels(1), torch.tensor([[2, 5]]), qformer_input_ids=torch.tensor([[101, 102]]))
    out = model(pixels(1), torch.tensor([[2, 5]]))
    assert out.query_embeds.shape == (1, 8, 48)


@pytest.mark.parametrize("arch,start", [("blip2_tiny_opt", 2), ("blip2_tiny_t5", 1), ("blip2_tiny_llama", 1)])
def test_default_prompt_and_seeded_sampling(arch, start):
    """No prompt = the bos (T5 has none: its "" tokenizes to </s>, as LAVIS's empty prompt); sampling is seeded."""
    model = tiny(arch, 6)
    px = pixels(2, 1)
    assert torch.equal(model.generate(px, max_new_tokens=4), model.generate(px, torch.full((2, 1), start),
                                                                             max_new_tokens=4))
    runs = [model.generate(px, max_new_tokens=5, do_sample=True, top_p=0.9, temperature=0.7,
                           generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_llm_train_mode_option():
    """Default: the frozen LLM stays in eval (no dropout); llm_train_mode=True follows LAVIS (dropout while
    training)."""
    lavis_like = create("blip2_tiny_opt", "stage2", llm_train_mode=True).train()
    assert lavis_like.llm.training and not lavis_like.image_encoder.visual_encoder.training
    assert not lavis_like.eval().llm.training
    assert not create("blip2_tiny_opt", "stage2").train().llm.training


@pytest.mark.parametrize("arch,tok", [("blip2_tiny_opt", OPT_DIR), ("blip2_tiny_t5", T5_DIR)])
def test_few_steps_fit_two_captions(arch, tok):
    """Only the Q-Former / projection learn, yet the image-conditioned loss on two captions drops."""
    torch.manual_seed(0)
    model = tiny(arch, 7, tokenizer=tok).train()
    objective = Blip2Stage2Objective(model, generator=torch.Generator().manual_seed(0))
    batch = {"pixel_values": pixels(2, 3), "text_input": ["a photo of", "a photo of"],
             "text_output": ["a dog sitting on a bench", "two red cars"]}
    params = [p for p in model.parameters() if p.requires_grad]
    frozen_before = model.llm.get_input_embeddings().weight.clone()
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    losses = []
    for _ in range(40):
        loss = objective(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses  # the frozen random LLM limits how far a prefix can go
    assert torch.equal(model.llm.get_input_embeddings().weight, frozen_before)
