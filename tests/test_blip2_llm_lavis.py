"""BLIP-2 OPT / FlanT5 against the LAVIS fixtures (real LAVIS 1.0.2 outputs under transformers 4.26).

Both checkpoint files are loaded through ``blip.load``: the full ``checkpoint.pth`` (ViT + LLM inside) and
``checkpoint_trainable_only.pth`` (ViT from ``eva_vit_tiny.pth``, LLM from the fixture's HF directory).
"""

import pytest
import torch

import blip
from blip.objectives.blip2_stage2 import Blip2Stage2Objective
from conftest import FIXTURES

LAVIS = FIXTURES / "lavis"
EVA = LAVIS / "eva_vit_tiny.pth"
FILES = ("checkpoint.pth", "checkpoint_trainable_only.pth")
Q = 8  # query tokens of the tiny fixtures


def fixture(name):
    return (torch.load(LAVIS / name / "inputs.pt", weights_only=True),
            torch.load(LAVIS / name / "outputs.pt", weights_only=True))


def load(name, llm_dir, file):
    """checkpoint.pth carries the ViT; the trainable-only file needs the EVA file (both need the tokenizer dir)."""
    vision = {} if file == "checkpoint.pth" else {"vision_weights": EVA}
    return blip.load(LAVIS / name / file, llm=LAVIS / name / llm_dir, **vision)


@pytest.fixture(scope="module", params=FILES)
def opt(request):
    return load("blip2_opt", "opt_llm", request.param), request.param


@pytest.fixture(scope="module", params=FILES)
def t5(request):
    return load("blip2_t5", "t5_llm", request.param), request.param


def test_key_origins_reported(opt, t5):
    for (model, file), name, llm_dir in ((opt, "blip2_opt", "opt_llm"), (t5, "blip2_t5", "t5_llm")):
        origins = model.load_report.origins
        ckpt = str(LAVIS / name / file)
        assert origins["qformer"] == origins["llm_proj"] == origins["image_encoder.ln_vision"] == ckpt
        full = file == "checkpoint.pth"
        assert origins["image_encoder.visual_encoder"] == (ckpt if full else str(EVA))
        assert origins["llm"] == (ckpt if full else str(LAVIS / name / llm_dir))
        assert model.load_report.unused == []


def test_opt_logits_loss_and_labels(opt):
    model, _ = opt
    inputs, out = fixture("blip2_opt")
    fed = inputs["tokens_as_fed"]
    text_mask = fed["opt_attention_mask"][:, Q:]
    with torch.no_grad():
        assert (model.query_embeds(inputs["image"]) - out["inputs_opt"]).abs().max() < 1e-4
        logits = model(inputs["image"], fed["opt_input_ids"], text_mask).logits
        # LAVIS's padded position uses OPT position -1: compare where the mask is 1 (fixture README)
        assert (logits - out["opt_logits"][:, Q:])[text_mask.bool()].abs().max() < 1e-4
        prompt = "a photo of "
        captions = [t[len(prompt):] for t in inputs["text_input"]]
        objective = Blip2Stage2Objective(model, prompt=prompt)
        batch = objective.causal_batch(captions)
        assert torch.equal(batch["input_ids"], out["opt_input_ids"])
        assert torch.equal(batch["labels"], out["opt_labels"][:, Q:])
        loss = objective({"pixel_values": inputs["image"], "text": captions})["loss"]
    assert abs(loss.item() - out["loss"].item()) < 1e-4


@pytest.mark.parametrize("tag,beams", [("greedy", 1), ("beam3", 3)])
def test_opt_generation(opt, tag, beams):
    model, _ = opt
    inputs, out = fixture("blip2_opt")
    prompt_ids = inputs["tokens_as_fed"][f"{tag}_input_ids"]
    assert model.eos_token_id == 202  # "\n", from the fixture's GPT2 tokenizer
    ids = model.generate(inputs["image"], prompt_ids, max_new_tokens=10, min_new_tokens=0, num_beams=beams,
                         beam_length_convention="total")
    assert torch.equal(ids, out[f"{tag}_ids"])
    text = [t.strip() for t in model.tokenizer.batch_decode(ids[:, prompt_ids.shape[1]:], skip_special_tokens=True)]
    assert text == out[f"{tag}_text"]
    # the string API builds the same prompt (bos + "a photo of") and decodes the same way
    assert model.caption(inputs["image"], "a photo of", num_beams=beams, max_new_tokens=10, min_new_tokens=0,
                         beam_length_convention="total") == out[f"{tag}_text"]


def test_t5_logits_and_loss(t5):
    model, _ = t5
    inputs, out = fixture("blip2_t5")
    fed = inputs["tokens_as_fed"]
    with torch.no_grad():
        logits = model(inputs["image"], fed["t5_input_ids"], fed["t5_attention_mask"][:, Q:],
                       decoder_input_ids=fed["t5_decoder_input_ids"],
                       decoder_attention_mask=fed["t5_decoder_attention_mask"]).logits
        assert (logits - out["t5_logits"]).abs().max() < 1e-4
        objective = Blip2Stage2Objective(model)
        batch = objective.text_pair_batch(inputs["text_input"], inputs["text_output"])
        for key, ref in (("input_ids", "t5_input_ids"), ("labels", "t5_labels"),
                         ("decoder_input_ids", "t5_decoder_input_ids")):
            assert torch.equal(batch[key], out[ref]), key
        loss = objective({"pixel_values": inputs["image"], "text": inputs["text_input"],
                          "text_input": inputs["text_input"], "text_output": inputs["text_output"]})["loss"]
    assert abs(loss.item() - out["loss"].item()) < 1e-4


def test_t5_uses_lavis_exact_gelu(t5):
    model, _ = t5
    assert model.llm.config.dense_act_fn == "gelu"  # the saved config says gated-gelu (gelu_new)


@pytest.mark.parametrize("tag,beams", [("greedy", 1), ("beam3", 3)])
def test_t5_generation(t5, tag, beams):
    model, _ = t5
    inputs, out = fixture("blip2_t5")
    kw = dict(num_beams=beams, max_new_tokens=10, min_new_tokens=0, beam_length_convention="total")
    tok = model.tokenizer([inputs["generate_prompt"]] * 2, return_tensors="pt")
    ids = model.generate(inputs["image"], tok.input_ids, tok.attention_mask, **kw)
    assert torch.equal(ids, out[f"{tag}_ids"])
    assert model.caption(inputs["image"], inputs["generate_prompt"], **kw) == out[f"{tag}_text"]


def test_t5_vqa_beam5(t5):
    model, _ = t5
    inputs, out = fixture("blip2_t5")
    answers = model.answer(inputs["image"], inputs["text_input"], prompt=inputs["vqa_prompt"], num_beams=5,
                           max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0, beam_length_convention="total")
    assert answers == out["vqa_beam5_answers"]
    tok = model.tokenizer([inputs["vqa_prompt"].format(q) for q in inputs["text_input"]], padding="longest",
                          return_tensors="pt")
    ids = model.generate(inputs["image"], tok.input_ids, tok.attention_mask, num_beams=5, max_new_tokens=10,
                         min_new_tokens=1, length_penalty=-1.0, beam_length_convention="total")
    assert torch.equal(ids, out["vqa_beam5_ids"])


def test_missing_parts_are_named():
    from blip.checkpoints import CheckpointError
    with pytest.raises(CheckpointError, match="vision_weights"):
        blip.load(LAVIS / "blip2_opt" / "checkpoint_trainable_only.pth", llm=LAVIS / "blip2_opt" / "opt_llm")
    with pytest.raises(CheckpointError, match="llm="):
        blip.load(LAVIS / "blip2_t5" / "checkpoint_trainable_only.pth", vision_weights=EVA)
    with pytest.raises(CheckpointError, match="own visual_encoder"):
        blip.load(LAVIS / "blip2_t5" / "checkpoint.pth", llm=LAVIS / "blip2_t5" / "t5_llm", vision_weights=EVA)


def test_image_size_follows_a_fine_tuned_vit(tmp_path):
    """LAVIS fine-tuned files carry the ViT (e.g. at 364 px); the grid of their pos_embed sets the image size."""
    from blip.nn.vit import resize_pos_embed
    sd = torch.load(LAVIS / "blip2_opt" / "checkpoint.pth", weights_only=True)["model"]
    sd["visual_encoder.pos_embed"] = resize_pos_embed(sd["visual_encoder.pos_embed"], 25)  # 4x4 -> 5x5 patches
    torch.save({"model": sd}, tmp_path / "finetuned.pth")
    model = blip.load(tmp_path / "finetuned.pth", llm=LAVIS / "blip2_opt" / "opt_llm")
    assert model.config.vision.image_size == 70
    assert torch.equal(model.image_encoder.visual_encoder.pos_embed, sd["visual_encoder.pos_embed"])


def lavis_stage2_layout(proj: str, out_dim: int, instruct: bool = False, image_width: int = 1408) -> dict:
    """The real-size LAVIS stage-2 / InstructBLIP file layout, written from lavis-and-blip-facts §3.4 (bert-base
    Q-Former, 32 queries, cross-attention in even layers reading image features of ``image_width``: EVA ViT-g 1408,
    CLIP ViT-L 1024), as meta tensors."""
    def t(*shape):
        return torch.empty(shape, device="meta")
    sd = {"query_tokens": t(1, 32, 768), "ln_vision.weight": t(image_width), "ln_vision.bias": t(image_width),
          "Qformer.bert.embeddings.LayerNorm.weight": t(768), "Qformer.bert.embeddings.LayerNorm.bias": t(768),
          "Qformer.bert.embeddings.position_ids": t(1, 512), f"{proj}.weight": t(out_dim, 768),
          f"{proj}.bias": t(out_dim)}
    if instruct:
        sd["Qformer.bert.embeddings.word_embeddings.weight"] = t(30523, 768)
        sd["Qformer.bert.embeddings.position_embeddings.weight"] = t(512, 768)
    for i in range(12):
        p = f"Qformer.bert.encoder.layer.{i}."
        linears = {"attention.self.query": (768, 768), "attention.self.key": (768, 768),
                   "attention.self.value": (768, 768), "attention.output.dense": (768, 768),
                   "intermediate_query.dense": (3072, 768), "output_query.dense": (768, 3072)}
        norms = ["attention.output.LayerNorm", "output_query.LayerNorm"]
        if i % 2 == 0:
            linears.update({"crossattention.self.query": (768, 768), "crossattention.self.key": (768, image_width),
                            "crossattention.self.value": (768, image_width), "crossattention.output.dense": (768, 768)})
            norms.append("crossattention.output.LayerNorm")
        if instruct:
            linears.update({"intermediate.dense": (3072, 768), "output.dense": (768, 3072)})
            norms.append("output.LayerNorm")
        for name, shape in linears.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = t(*shape), t(shape[0])
        for name in norms:
            sd[p + name + ".weight"], sd[p + name + ".bias"] = t(768), t(768)
    return sd


@pytest.mark.parametrize("proj,dim,instruct,image_width,arch", [
    ("opt_proj", 2560, False, 1408, "blip2_vitg_opt2.7b"), ("opt_proj", 4096, False, 1408, "blip2_vitg_opt6.7b"),
    ("t5_proj", 2048, False, 1408, "blip2_vitg_flant5xl"), ("t5_proj", 2048, True, 1408, "instructblip_flant5xl"),
    ("t5_proj", 4096, False, 1408, "blip2_vitg_flant5xxl"), ("llm_proj", 4096, True, 1408, "instructblip_vicuna7b"),
    ("t5_proj", 2048, False, 1024, "blip2_vitL_flant5xl")])   # blip2_pretrained_flant5xl_vitL.pth: CLIP ViT-L
def test_real_size_lavis_layouts(proj, dim, instruct, image_width, arch):
    from blip.convert.blip2_lavis import guess_llm_arch as guess_arch, lavis_llm_to_ours as lavis_to_ours
    from blip.models.blip2_llm import create
    sd = lavis_stage2_layout(proj, dim, instruct, image_width)
    task = "instruct" if instruct else "stage2"
    assert guess_arch(sd) == (arch, task)
    # a subset without ln_vision (e.g. a Q-Former-only export): the cross-attention keys tell the ViT
    assert guess_arch({k: v for k, v in sd.items() if not k.startswith("ln_vision.")}) == (arch, task)
    llm = (dict(model_type="t5", d_model=dim, num_layers=1, num_heads=2, d_kv=8, d_ff=16, vocab_size=8)
           if proj == "t5_proj" else dict(model_type="llama", hidden_size=dim, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=16, vocab_size=8))
    with torch.device("meta"):
        model = create(arch, task, llm=llm)
    out, used = lavis_to_ours(sd)
    assert used == set(sd)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(("llm.", "image_encoder.visual_encoder."))}
    assert set(out) == set(own)
    assert all(out[k].shape == own[k].shape for k in own)


def test_the_vit_l_arch_has_lavis_clip_vit_l():
    """LAVIS's clip_L: OpenAI CLIP ViT-L/14 at 224 px without its last block (23 of 24) and without ln_post, then
    ln_vision over its 1024 features (LAVIS ``create_clip_vit_L`` + ``LayerNorm(visual_encoder.num_features)``)."""
    from blip.models.blip2_llm import create
    with torch.device("meta"):
        model = create("blip2_vitL_flant5xl", "stage2", llm=dict(model_type="t5", d_model=2048, num_layers=1,
                                                                 num_heads=2, d_kv=8, d_ff=16, vocab_size=8))
    vit = model.config.vision
    assert (vit.width, vit.depth, vit.heads, vit.patch_size, vit.image_size) == (1024, 23, 16, 14, 224)
    assert len(model.image_encoder.visual_encoder.blocks) == 23
    assert model.image_encoder.ln_vision.weight.shape == (1024,)
    from blip.checkpoints import CheckpointError
    from blip.convert.blip2_parts import add_vision_weights
    hint = r"vitL\.pth has no visual_encoder.*=<clip_vit_L\.pth> \(or the zoo name 'blip2-clip-vit-l'\)"
    with pytest.raises(CheckpointError, match=hint):
        add_vision_weights({}, None, vit, "blip2_pretrained_flant5xl_vitL.pth")   # LAVIS saved it without the ViT


def test_an_unknown_image_width_asks_for_the_arch(tmp_path):
    """A projection to FlanT5-XL's width over image features no known ViT gives (1280): refused, naming the width."""
    from blip.checkpoints import CheckpointError
    sd = {"query_tokens": torch.zeros(1, 32, 768), "ln_vision.weight": torch.ones(1280),
          "ln_vision.bias": torch.zeros(1280), "t5_proj.weight": torch.zeros(2048, 768, dtype=torch.float16),
          "t5_proj.bias": torch.zeros(2048)}
    torch.save({"model": sd}, tmp_path / "odd_vit.pth")
    with pytest.raises(CheckpointError, match=r"odd_vit\.pth.*image features of width 1280\): pass arch="):
        blip.load(tmp_path / "odd_vit.pth", llm=LAVIS / "blip2_t5" / "t5_llm")
    stage1 = {k: v for k, v in sd.items() if not k.startswith("t5_")}   # the same widths in a stage-1 file
    torch.save({"model": stage1}, tmp_path / "odd_stage1.pth")
    with pytest.raises(CheckpointError, match=r"odd_stage1\.pth: a Q-Former of width 768 on image features of width "
                                              r"1280; pass arch="):
        blip.load(tmp_path / "odd_stage1.pth")


def test_captions_from_the_raw_png_files(opt, t5):
    """End to end from the image files: LAVIS eval preprocessing, then the same greedy captions as LAVIS."""
    (opt_model, _), (t5_model, _) = opt, t5
    for model, name in ((opt_model, "blip2_opt"), (t5_model, "blip2_t5")):
        inputs, out = fixture(name)
        files = [LAVIS / name / f for f in inputs["raw_image_files"]]
        torch.testing.assert_close(model.pixel_values(files), inputs["image"], atol=1e-5, rtol=0)
        captions = model.caption(files, "a photo of", num_beams=1, max_new_tokens=10, min_new_tokens=0)
        assert captions == out["greedy_text"]
