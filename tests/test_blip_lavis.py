"""Original/LAVIS-format loading against the LAVIS reference fixtures (outputs computed by LAVIS's own code from
tiny random checkpoints in LAVIS's key layout; see tests/fixtures/lavis/README.md)."""

import pytest
import torch
import torch.nn.functional as F

import blip
from blip.checkpoints import CheckpointError, read_state_dict
from blip.models.blip import BlipCaption, BlipRetrieval, BlipVQA
from conftest import FIXTURES

FIX = FIXTURES / "lavis"
SPECIAL_COLS = [0, 100, 101, 102, 103, 30522, 30523]
HEADS = {"blip_caption": (4, 2), "blip_itm": (4, 2), "blip_vqa": (2, 2)}  # (vision, text): not stored in shapes


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def fixture(name):
    inputs = torch.load(FIX / name / "inputs.pt", weights_only=True)
    outputs = torch.load(FIX / name / "outputs.pt", weights_only=True)
    vh, th = HEADS[name]
    model = blip.load(FIX / name / "checkpoint.pth", vision={"heads": vh}, text={"num_heads": th})
    return model, inputs, outputs


def images(inputs, name):
    return [str((FIX / name / f).resolve()) for f in inputs["raw_image_files"]]


def close(a, b, tol=1e-4):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max() <= tol, (a - b).abs().max()


@pytest.fixture(scope="module")
def caption():
    return fixture("blip_caption")


def test_caption_logits_and_loss(caption):
    model, inp, out = caption
    assert isinstance(model, BlipCaption)
    ids, mask, labels = out["decoder_input_ids"], out["decoder_attention_mask"], out["decoder_labels"]
    with torch.no_grad():
        res = model(inp["image"], ids, mask)
    close(res.image_embeds, out["image_embeds"])
    logits = res.logits
    close(logits[..., ::32], out["lm_logits_every32nd_col"])
    close(logits[..., SPECIAL_COLS], out["lm_logits_special_cols"])
    close(logits.logsumexp(-1), out["lm_logits_logsumexp"])
    nxt = torch.cat([ids[:, 1:], ids[:, -1:]], 1)
    close(logits.gather(2, nxt[..., None])[..., 0], out["lm_logits_next_token_logit"])
    top = logits.topk(5, dim=-1)
    assert torch.equal(top.indices, out["lm_logits_top5_ids"])
    close(top.values, out["lm_logits_top5_values"])
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), label_smoothing=0.1)
    close(loss, out["lm_loss"])


TAGS = {"greedy": (1, 10, 10), "beam3": (3, 10, 10), "beam3_default": (3, 30, 10),
        "greedy_max20_min5": (1, 20, 5), "beam3_max20_min5": (3, 20, 5)}


@pytest.mark.parametrize("tag", list(TAGS))
def test_caption_generation(caption, tag):
    model, inp, out = caption
    beams, max_len, min_len = TAGS[tag]
    prompt = out[f"{tag}_prompt_ids"]
    assert prompt.tolist() == [[30522, 1037, 3861, 1997]] * 2
    # LAVIS counts the 4 prompt tokens in max/min length and ran transformers 4.26 beam scoring ("total")
    ids = model.generate(inp["image"], prompt, num_beams=beams, max_new_tokens=max_len - 4,
                         min_new_tokens=min_len - 4, beam_length_convention="total")
    assert torch.equal(ids, out[f"{tag}_ids"])
    assert model.tokenizer.batch_decode(ids, skip_special_tokens=True) == out[f"{tag}_decoded"]
    # the string API from the raw PNGs (our image transform + tokenizer) gives LAVIS's captions, "ries ..." included
    captions = model.caption(images(inp, "blip_caption"), num_beams=beams, max_new_tokens=max_len - 4,
                             min_new_tokens=min_len - 4)   # LAVIS's lengths count the 4 prompt tokens
    assert captions == out[f"{tag}_captions"]


def test_caption_string_api_pixels_match_lavis_processor(caption):
    model, inp, _ = caption
    close(model._pixels(images(inp, "blip_caption")), inp["image"], 1e-5)


def test_itm_and_itc():
    model, inp, out = fixture("blip_itm")
    assert isinstance(model, BlipRetrieval)
    img, txt = zip(*inp["itm_pairs"])
    with torch.no_grad():
        close(model.image_embeds(inp["image"]), out["image_embeds"])
        itm = model.itm_logits(inp["image"][list(img)], out["itm_input_ids"], out["itm_attention_mask"])
        close(itm, out["itm_logits"])
        close(itm.softmax(-1)[:, 1], out["itm_scores"])
        ids, mask = out["itc_input_ids"], out["itc_attention_mask"]
        close(model.text_embeds(ids, mask)[:, 0], out["itc_text_cls"])
        close(model.itc_similarity(inp["image"], ids, mask), out["itc_sim"])
    # string API: [ENC] for ITM, [CLS] for ITC, from the raw images
    files = images(inp, "blip_itm")
    res = model.match([files[i] for i in img], [inp["text_input"][j] for j in txt])
    close(res.itm_prob.diagonal(), out["itm_scores"])   # every image against every text: the pairs on the diagonal
    close(res.itc_sim.diagonal(), out["itc_sim"][list(img), list(txt)])


@pytest.fixture(scope="module")
def vqa():
    return fixture("blip_vqa")


def test_vqa_question_states_and_answer_losses(vqa):
    model, inp, out = vqa
    assert isinstance(model, BlipVQA)
    q_ids, q_mask = out["question_input_ids"], out["question_attention_mask"]
    with torch.no_grad():
        states = model.encode_question(inp["image"], q_ids, q_mask)
        close(states, out["question_states"])
        n = inp["n_answers"]  # the tensor-level forward, one (image, question) row per answer
        res = model(inp["image"].repeat_interleave(n, 0), q_ids.repeat_interleave(n, 0), q_mask.repeat_interleave(n, 0),
                    decoder_input_ids=out["answer_input_ids"], decoder_attention_mask=out["answer_attention_mask"])
        close(res.question_states, out["question_states"].repeat_interleave(n, 0))
        logits = res.logits
    labels = out["answer_labels"]
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], label_smoothing=0.1, reduction="none").sum(1)
    close(loss, out["answer_loss_per_answer"])
    close((inp["weight"] * loss).sum() / 2, out["train_loss"])


@pytest.mark.parametrize("tag,k", [("rank_all", 128), ("rank_top3", 3)])
def test_vqa_rank(vqa, tag, k):
    model, inp, out = vqa
    answer_list = inp["answer_list"]
    tok = model.tokenizer(answer_list, padding="longest", return_tensors="pt")
    a_ids = tok["input_ids"].clone()
    a_ids[:, 0] = 30522
    ranked = model.rank_answers(inp["image"], out["question_input_ids"], out["question_attention_mask"], a_ids,
                                tok["attention_mask"], k=k)
    assert torch.equal(ranked.candidate_index, out[f"{tag}_candidate_answer_index"])
    assert torch.equal(a_ids[ranked.candidate_index.flatten()], out[f"{tag}_candidate_input_ids"])
    close(ranked.candidate_loss, out[f"{tag}_candidate_loss"])
    assert [answer_list[i] for i in ranked.answer_index] == out[f"{tag}_answers"]
    got = model.answer(images(inp, "blip_vqa"), inp["text_input"], method="rank", answer_list=answer_list, k=k)
    assert got == out[f"{tag}_answers"]


def test_vqa_rank_first_token_logits(vqa):
    model, inp, out = vqa
    with torch.no_grad():
        states = model.encode_question(inp["image"], out["question_input_ids"], out["question_attention_mask"])
        logits = model.text_decoder(out["rank_start_ids"], encoder_hidden_states=states,
                                    encoder_attention_mask=out["question_attention_mask"])[:, 0]
    close(logits, out["rank_first_token_logits"])


@pytest.mark.parametrize("tag,beams", [("gen_greedy", 1), ("gen_beam3", 3)])
def test_vqa_generate(vqa, tag, beams):
    model, inp, out = vqa
    # LAVIS: max_len=10 / min_len=1 count [DEC] (so the empty answer is allowed); all-ones question mask
    ids = model.generate(inp["image"], out["question_input_ids"], out["question_attention_mask"], num_beams=beams,
                         max_new_tokens=9, min_new_tokens=0, beam_length_convention="total")
    assert torch.equal(ids, out[f"{tag}_ids"])
    got = model.answer(images(inp, "blip_vqa"), inp["text_input"], num_beams=beams, max_new_tokens=9,
                       min_new_tokens=0)
    assert got == out[f"{tag}_answers"]


def test_vqa_generate_question_mask_option(vqa):
    model, inp, out = vqa
    assert out["gen_greedy_encoder_attention_mask"].all()
    q_ids, q_mask = out["question_input_ids"], out["question_attention_mask"]
    with torch.no_grad():
        states = model.encode_question(inp["image"], q_ids, q_mask)
        start = torch.full((2, 1), 30522)
        lavis = model.text_decoder(start, encoder_hidden_states=states)[:, 0]
        masked = model.text_decoder(start, encoder_hidden_states=states, encoder_attention_mask=q_mask)[:, 0]
    close(lavis[:, ::32], out["gen_greedy_step0_every32nd_col"])
    close(lavis[:, SPECIAL_COLS], out["gen_greedy_step0_special_cols"])
    close(lavis.logsumexp(-1), out["gen_greedy_step0_logsumexp"])
    assert torch.equal(lavis.topk(5).indices, out["gen_greedy_step0_top5_ids"])
    assert (masked[1] - lavis[1]).abs().max() > 0.1 and torch.allclose(masked[0], lavis[0], atol=1e-5)
    ids = model.generate(inp["image"], q_ids, q_mask, max_new_tokens=9, mask_question_padding=True)
    assert ids.shape[0] == 2  # the option runs; its answers differ from LAVIS's by design


def test_pos_embed_interpolated_for_larger_model(tmp_path):
    """A checkpoint trained at 224 px (14x14 grid) loaded into a 384-px model (24x24): bicubic, CLS kept."""
    sd = read_state_dict(FIX / "blip_caption" / "checkpoint.pth")
    pos = torch.randn(1, 197, 64, generator=torch.Generator().manual_seed(0))
    sd["visual_encoder.pos_embed"] = pos
    torch.save({"model": sd}, tmp_path / "ckpt224.pth")
    model = blip.load(tmp_path / "ckpt224.pth", image_size=384, vision={"heads": 4}, text={"num_heads": 2})
    grid = pos[:, 1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, 576, 64)
    assert model.cfg.image_size == 384
    assert torch.allclose(model.visual_encoder.pos_embed, torch.cat([pos[:, :1], grid], 1), atol=1e-6)
    assert model.load_report.resized
    native = blip.load(tmp_path / "ckpt224.pth", vision={"heads": 4}, text={"num_heads": 2})
    assert native.cfg.image_size == 224
    px = torch.randn(1, 3, 384, 384)
    with torch.no_grad():  # the 224 model resizes on the fly to the same grid
        close(model.visual_encoder(px), native.visual_encoder(px), 1e-5)


def test_pretrain_keys_are_expected_unused_and_unknown_keys_fail(tmp_path):
    sd = read_state_dict(FIX / "blip_itm" / "checkpoint.pth")
    extra = {"temp": torch.tensor(0.07), "image_queue": torch.randn(24, 8), "text_queue": torch.randn(24, 8),
             "queue_ptr": torch.zeros(1, dtype=torch.long), "vision_proj_m.weight": torch.randn(24, 64)}
    heads = dict(vision={"heads": 4}, text={"num_heads": 2})
    torch.save({"model": {**sd, **extra}}, tmp_path / "retrieval.pth")  # like BLIP's retrieval checkpoints
    model = blip.load(tmp_path / "retrieval.pth", **heads)
    assert isinstance(model, BlipRetrieval)
    assert set(model.load_report.unused) >= {"temp", "queue.image_queue", "queue.text_queue", "queue.queue_ptr",
                                             "vision_proj_m.weight", "text_encoder.embeddings.position_ids"}
    decoder = {k: v for k, v in read_state_dict(FIX / "blip_caption" / "checkpoint.pth").items()
               if k.startswith("text_decoder.")}
    torch.save({"model": {**sd, **extra, **decoder}}, tmp_path / "pre.pth")  # a pretraining checkpoint holds all
    with pytest.raises(CheckpointError, match="task="):
        blip.load(tmp_path / "pre.pth", **heads)
    model = blip.load(tmp_path / "pre.pth", task="retrieval", **heads)
    assert any(k.startswith("text_decoder.") for k in model.load_report.unused)
    model = blip.load(tmp_path / "pre.pth", task="caption", **heads)
    assert isinstance(model, BlipCaption) and "itm_head.weight" in model.load_report.unused
    torch.save({"model": {**sd, "surprise.weight": torch.zeros(2)}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="surprise.weight"):
        blip.load(tmp_path / "bad.pth", vision={"heads": 4}, text={"num_heads": 2})
    del sd["itm_head.bias"]
    torch.save({"model": sd}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="itm_head.bias"):
        blip.load(tmp_path / "missing.pth", vision={"heads": 4}, text={"num_heads": 2})
