"""The BLIP-2 / InstructBLIP fine-tuning recipes (configs/task/blip2_*.yaml, instruct.yaml; their settings in
configs/recipe/): what trains and what does not, the fp32 ViT, the 364-px position embedding, BLIP's VQA answer
weighting on the LLM, the question-aware Q-Former, and a few steps from the LAVIS fixtures."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import blip
from blip.convert.blip2_handoff import question_aware
from blip.models.blip2_finetune import is_question_text_part, set_vit_trainable
from blip.objectives.blip2_stage2 import Blip2Stage2Objective
from blip.predictor import Decoding, Predictor
from blip.runs import build_model
from blip.train.precision import PrecisionPolicy
from conftest import FIXTURES
from test_configs import compose_cfg, resolved

LAVIS = FIXTURES / "lavis"
TINY_OPT = ["model=blip2_tiny_opt", "model.image_size=56"]
TINY_QFORMER = ["model=blip2_tiny_qformer", "model.image_size=56"]
# recipe -> (task, tiny model overrides, stage)
RECIPES = {"caption": ("blip2_caption_coco", TINY_OPT, "2"), "retrieval": ("blip2_retrieval_coco", TINY_QFORMER, "1"),
           "vqa": ("blip2_vqa", TINY_OPT, "2"), "instruct": ("instruct", TINY_OPT, "2")}
BATCHES = {   # the tiny OPT's synthetic word tokenizer knows the shape words
    "caption": {"text": ["a red circle", "a blue square"]},
    "retrieval": {"text": ["a red circle", "a blue square"], "image_ids": torch.tensor([1, 2])},
    "vqa": {"text": ["what color is the circle", "is it large"], "answers": [["red", "blue"], ["large"]],
            "weights": [[0.7, 0.3], [1.0]]},
    "instruct": {"text": ["describe the circle", "where is the square"], "text_output": ["a red circle", "left"]},
}


def recipe_cfg(name: str, *extra: str):
    task, tiny, stage = RECIPES[name]
    return compose_cfg([f"stage={stage}", f"task={task}", *tiny, *extra])


def built(name: str, *extra: str):
    """The recipe's objective at a tiny size, frozen towers cast as the recipe's precision policy casts them."""
    cfg = recipe_cfg(name, *extra)
    torch.manual_seed(0)
    objective = build_model(cfg.model)
    policy = PrecisionPolicy(cfg.trainer.precision, cfg.trainer.frozen_dtype, device_type="cpu")
    policy.cast_frozen(objective)
    return cfg, objective


def grads_after_one_backward(objective, name: str) -> dict[str, bool]:
    objective.train()
    torch.manual_seed(1)
    batch = {"pixel_values": torch.randn(2, 3, 56, 56), **BATCHES[name]}
    objective(batch)["loss"].backward()
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in objective.named_parameters()}


def parts(grads: dict[str, bool], prefix: str) -> set[bool]:
    return {g for n, g in grads.items() if n.startswith(prefix)}


# ---- the composed recipes ------------------------------------------------------------------------------------
def test_recipes_compose_with_the_lavis_and_paper_values():
    caption = resolved(recipe_cfg("caption"))
    assert caption["model"]["freeze_vit"] is False and caption["model"]["task"] == "stage2"
    assert caption["model"]["objective"] | {} == {"prompt": "a photo of ", "max_txt_len": 32}
    assert caption["eval_task"]["name"] == "caption_coco"
    # LAVIS caption_coco_ft.yaml: init_lr 1e-5, min_lr 0, warmup_lr 1e-8, warmup_steps 1000, wd 0.05, 5 epochs, 16
    t = caption["trainer"]
    assert (t["optimizer"]["lr"], t["optimizer"]["weight_decay"], t["epochs"], t["batch_size"]) == (1e-5, 0.05, 5, 16)
    assert t["schedule"] | {} == {"name": "cosine", "warmup_steps": 1000, "warmup_lr": 1e-8, "min_lr": 0.0,
                                  "decay_rate": 0.9}
    paper_size = resolved(compose_cfg(["stage=2", "task=blip2_caption_coco"]))["model"]
    assert (paper_size["arch"], paper_size["image_size"], paper_size["overrides"]["image_size"]) == (
        "blip2_vitg_opt2.7b", 364, 364)
    retrieval = resolved(recipe_cfg("retrieval"))   # LAVIS retrieval_coco_ft.yaml: batch 14, lr_layer_decay 0.95
    assert retrieval["model"]["task"] == "stage1" and retrieval["model"]["freeze_vit"] is False
    assert (retrieval["trainer"]["batch_size"], retrieval["trainer"]["optimizer"]["layer_decay"]) == (14, 0.95)
    assert retrieval["eval_task"]["name"] == "retrieval_coco"
    vqa = resolved(recipe_cfg("vqa"))
    assert (vqa["model"]["task"], vqa["model"]["freeze_vit"]) == ("instruct", False)
    assert vqa["model"]["objective"]["question_prompt"] == "Question: {} Answer:"   # BLIP-2 paper Table 8
    instruct = resolved(recipe_cfg("instruct"))   # LAVIS InstructBLIP max_txt_len 128, max_output_txt_len 256
    assert (instruct["model"]["task"], instruct["model"]["freeze_vit"]) == ("instruct", True)
    assert instruct["model"]["objective"] | {} == {"max_txt_len": 128, "max_output_len": 256}
    assert instruct["trainer"]["max_steps"] == 60000 and instruct["eval_task"] is None


@pytest.mark.parametrize("name", list(RECIPES))
def test_gradients_go_where_the_recipe_trains_and_nowhere_else(name):
    _, objective = built(name)
    grads = grads_after_one_backward(objective, name)
    vit = parts(grads, "model.image_encoder.visual_encoder.")
    assert vit == ({False} if name == "instruct" else {True}), "the ViT trains in caption / VQA / retrieval only"
    assert parts(grads, "model.image_encoder.ln_vision.") == {True}
    assert parts(grads, "model.qformer.query_tokens") == {True}
    if name == "retrieval":
        return
    assert parts(grads, "model.llm.") == {False}, "the LLM never trains"
    assert not any(p.requires_grad for p in objective.model.llm.parameters())
    assert parts(grads, "model.llm_proj.") == {True}
    text = {n: g for n, g in grads.items() if n.startswith("model.") and is_question_text_part(n[len("model."):])}
    if name in ("vqa", "instruct"):   # the question / instruction reaches the Q-Former's text parts
        last = f"model.qformer.transformer.layers.{len(objective.model.qformer.transformer.layers) - 1}.ffn."
        # ... all but the last layer's text FFN, whose output no query reads (only query outputs reach the LLM)
        assert text and all(g for n, g in text.items() if not n.startswith(last))
        assert not any(g for n, g in text.items() if n.startswith(last))
        word = objective.model.qformer.transformer.embeddings.word.weight.grad
        assert 0 < int((word.abs().sum(1) > 0).sum()) < word.shape[0]   # only the rows of the tokens read
    else:
        assert not text   # a stage-2 Q-Former has none


@pytest.mark.parametrize("name", ["caption", "vqa"])
def test_the_trainable_vit_stays_fp32_while_the_frozen_llm_is_cast(name):
    cfg, objective = built(name)
    assert cfg.trainer.frozen_dtype == "bf16"
    vit = objective.model.image_encoder.visual_encoder
    assert {p.dtype for p in vit.parameters()} == {torch.float32}
    assert objective.model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    objective.train()
    assert vit.training and not objective.model.llm.training   # dropout / drop-path active in the trainable ViT


def test_frozen_vit_switch_is_todays_default():
    frozen = build_model(compose_cfg(["stage=2"]).model)
    assert frozen.model.config.freeze_vit and not any(
        p.requires_grad for p in frozen.model.image_encoder.visual_encoder.parameters())
    stage1 = build_model(compose_cfg(["stage=1", "model.freeze_vit=false"]).model)
    assert all(p.requires_grad for p in stage1.model.image_encoder.visual_encoder.parameters())


@pytest.mark.parametrize("name", ["retrieval", "vqa"])
def test_layer_decay_covers_the_trainable_vit(name, tmp_path):
    from blip.train.distributed import DistInfo
    from blip.train.run import build_trainer

    cfg, objective = built(name)
    trainer = build_trainer(objective, cfg, DistInfo(), PrecisionPolicy(), SimpleNamespace(batches_per_epoch=10),
                            tmp_path)
    scale = {id(p): g["lr_scale"] for g in trainer.optimizer.param_groups for p in g["params"]}
    vit = objective.model.image_encoder.visual_encoder
    depth = len(vit.blocks)   # LAVIS get_optimizer_params: lr_scale ** (L + 1 - layer), stem 0, block i -> i + 1
    assert scale[id(vit.pos_embed)] == pytest.approx(0.95 ** (depth + 1))
    assert scale[id(vit.blocks[-1].mlp.fc1.weight)] == pytest.approx(0.95)
    assert scale[id(objective.model.qformer.query_tokens)] == 1.0


def test_364_px_position_embedding_is_interpolated_from_a_224_px_checkpoint(tmp_path):
    """init_from a 224-px stage-1 checkpoint into the retrieval recipe at 364 px (patch 14: 16x16 -> 26x26), as
    BLIP / LAVIS ``interpolate_pos_embed``: bicubic, align_corners=False, the class position kept."""
    from safetensors.torch import save_file

    from blip.train.init import init_from_checkpoint

    source = blip.create_model("blip2_tiny_qformer", "qformer", image_size=224)
    torch.nn.init.normal_(source.image_encoder.visual_encoder.pos_embed)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "stage1.safetensors")
    cfg = recipe_cfg("retrieval", "model.image_size=364")
    objective = build_model(cfg.model)
    init_from_checkpoint(objective, tmp_path / "stage1.safetensors")
    old = source.image_encoder.visual_encoder.pos_embed.detach()
    grid = old[0, 1:].reshape(16, 16, -1).permute(2, 0, 1)[None]
    want = F.interpolate(grid, size=(26, 26), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(676, -1)
    new = objective.model.image_encoder.visual_encoder.pos_embed.detach()
    assert new.shape == (1, 677, old.shape[-1])
    torch.testing.assert_close(new[0, 0], old[0, 0])
    torch.testing.assert_close(new[0, 1:], want)


# ---- VQA answer weighting ------------------------------------------------------------------------------------
def answer_nll(model, pixels, question: str, answer: str) -> torch.Tensor:
    """-log p(answer tokens + eos | image, question) by hand: one row through the model's plain forward."""
    tok = model.tokenizer
    head = tok(question).input_ids
    tail = tok(answer + "\n", add_special_tokens=False).input_ids
    ids = torch.tensor([head + tail])
    q = model.qformer_tokenizer([question], return_tensors="pt")
    logits = model(pixels, ids, qformer_input_ids=q.input_ids, qformer_attention_mask=q.attention_mask).logits
    logp = logits[0].float().log_softmax(-1)
    return -sum(logp[len(head) - 1 + i, t] for i, t in enumerate(tail))


def test_vqa_loss_is_blips_weighted_answer_loss():
    """loss = sum_q sum_k w_qk * NLL(answer_qk) / B (BLIP blip_vqa.py: ``(weights * loss).sum() / B``)."""
    _, objective = built("vqa")
    objective.eval()
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 56, 56)
    batch = {"pixel_values": pixels, **BATCHES["vqa"]}
    with torch.no_grad():
        got = objective(batch)["loss"]
        want = 0.0
        for i, (question, answers, weights) in enumerate(zip(batch["text"], batch["answers"], batch["weights"])):
            for answer, w in zip(answers, weights):
                want += w * answer_nll(objective.model, pixels[i:i + 1], f"Question: {question} Answer:",
                                       answer)
    torch.testing.assert_close(got, want / 2, rtol=1e-5, atol=1e-5)


def test_a_vqa_run_answers_and_is_evaluated_with_the_template_it_trained_with():
    """The VQA recipe's template (BLIP-2 paper Table 8) is recorded in the model: answer() uses it, and the benchmark
    evaluation of the run puts it in place of the protocol's. A caption run leaves question templates alone (its
    caption prompt replaces only caption prompts)."""
    from blip.evaluation.runner import own_prompt_protocol
    from test_recipes import compose_eval

    vqa_task, caption_task = (compose_eval([f"task={t}"]).task for t in ("vqa_v2", "caption_coco"))
    assert vqa_task.protocol.blip2_llm.prompt == "Question: {} Short answer:"   # LAVIS's zero-shot template
    _, vqa = built("vqa")
    _, caption = built("caption")
    assert vqa.model.config.question_prompt == "Question: {} Answer:"
    assert own_prompt_protocol(vqa_task, vqa.model).protocol.blip2_llm.prompt == "Question: {} Answer:"
    assert own_prompt_protocol(vqa_task, caption.model).protocol.blip2_llm.prompt == "Question: {} Short answer:"
    assert own_prompt_protocol(caption_task, caption.model).protocol.blip2_llm.prompt == "a photo of "
    seen = {}
    for model, want in ((vqa.model, "Question: what is it? Answer:"),
                        (caption.model, "Question: what is it? Short answer:")):
        model.complete = lambda images, prompts, **kw: seen.update(prompts=prompts) or prompts
        model.answer(torch.randn(1, 3, 56, 56), "What is it?")
        assert seen["prompts"] == [want]
        del model.complete
    _, own = built("vqa", "model.objective.question_prompt='Q: {} A:'")   # serve / `blip ask` follow a run's template
    own.model.complete = lambda images, prompts, **kw: seen.update(prompts=prompts) or prompts
    Predictor(own.model).answer(torch.randn(1, 3, 56, 56), ["what is it?"], Decoding(num_beams=1))
    assert seen["prompts"] == ["Q: what is it? A:"]


def test_vqa_weights_default_to_blips_vqav2_rule():
    """Without "weights": unique answers weighted by their share of the annotators (3 x "red", 1 x "blue")."""
    _, objective = built("vqa")
    objective.eval()
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        got = objective({"pixel_values": pixels, "text": ["what color"], "answers": [["red", "red", "blue", "red"]]})
        explicit = objective({"pixel_values": pixels, "text": ["what color"], "answers": [["red", "blue"]],
                              "weights": [[0.75, 0.25]]})
    torch.testing.assert_close(got["loss"], explicit["loss"])
    with pytest.raises(ValueError, match="answers and weights"):
        objective({"pixel_values": pixels, "text": ["what color"], "answers": [["red"]], "weights": [[0.5, 0.5]]})


# ---- question_aware / set_vit_trainable on a loaded model ------------------------------------------------------
def lavis_opt():
    return blip.load(LAVIS / "blip2_opt" / "checkpoint.pth", llm=LAVIS / "blip2_opt" / "opt_llm")


@pytest.fixture(scope="module")
def opt_model():
    return lavis_opt()


def test_question_aware_shares_every_weight_and_keeps_the_query_outputs(opt_model):
    before = {k: v.clone() for k, v in opt_model.state_dict().items()}
    aware = question_aware(opt_model)
    assert aware.instruct and not opt_model.instruct
    own = dict(aware.named_parameters())
    for name, param in opt_model.named_parameters():
        assert own[name] is param, name   # shared, not copied
    assert set(opt_model.state_dict()) == set(before)   # the stage-2 model keeps its structure
    assert {k for k in own if k not in dict(opt_model.named_parameters())} == {
        k for k in own if is_question_text_part(k)}
    pixels = torch.randn(2, 3, 56, 56)
    q = aware.qformer_tokenizer(["what is it?", "is it red?"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        plain = opt_model.query_embeds(pixels)
        # the question masked out: the queries attend only to each other, as in the stage-2 model
        hidden = aware.query_embeds(pixels, q.input_ids, torch.zeros_like(q.attention_mask))
        asked = aware.query_embeds(pixels, q.input_ids, q.attention_mask)
    torch.testing.assert_close(hidden, plain)
    assert (asked - plain).abs().max() > 1e-3   # the question now conditions the queries
    assert question_aware(aware) is aware


def test_question_aware_without_text_init_copies_the_query_ffn(opt_model):
    aware = question_aware(opt_model)
    for layer in aware.qformer.transformer.layers:
        for (n, a), (_, b) in zip(layer.ffn.state_dict().items(), layer.ffn_query.state_dict().items()):
            torch.testing.assert_close(a, b, msg=n)
    assert "query FFN" in aware.question_report.source


@pytest.fixture(scope="module")
def stage1_file(tmp_path_factory):
    """A stage-1 Q-Former of the fixtures' sizes (the tiny arch), saved as blip's export: (path, its state)."""
    from safetensors.torch import save_file

    torch.manual_seed(3)
    stage1 = blip.create_model("blip2_tiny_qformer", "qformer")
    for p in stage1.parameters():   # no tensor at a default value (norms at 1 / 0)
        p.data.add_(0.02 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in stage1.state_dict().items()}
    path = tmp_path_factory.mktemp("stage1") / "stage1.safetensors"
    save_file(state, path)
    return path, state


def test_question_aware_loads_the_text_parts_from_a_stage1_checkpoint(opt_model, stage1_file):
    path, state = stage1_file
    aware = question_aware(opt_model, text_init=path)
    own = aware.state_dict()
    text = [k for k in own if is_question_text_part(k)]
    assert len(text) == 2 + 6 * len(aware.qformer.transformer.layers)   # embeddings + fc1, fc2, norm (w, b)
    for k in text:
        torch.testing.assert_close(own[k], state[k], msg=k)
    shared = "qformer.transformer.layers.0.ffn_query.fc1.weight"   # not a text part: stays the stage-2 model's
    torch.testing.assert_close(own[shared], opt_model.state_dict()[shared])


def test_question_aware_refuses_a_file_without_fitting_text_parts(opt_model):
    from blip.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="missing .*ffn"):   # a stage-2 file has no text parts
        question_aware(opt_model, text_init=LAVIS / "blip2_opt" / "checkpoint.pth")
    with pytest.raises(CheckpointError, match=r"file \(30523, 16\) vs model \(30523, 32\)"):   # another width
        question_aware(opt_model, text_init=LAVIS / "blip2_qformer" / "checkpoint.pth")


def test_set_vit_trainable_on_a_loaded_model_and_a_qformer():
    model = blip.create_model("blip2_tiny_opt", "stage2", frozen_dtype="bf16")
    vit = model.image_encoder.visual_encoder
    assert vit.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    set_vit_trainable(model)
    assert model.config.freeze_vit is False and {p.dtype for p in vit.parameters()} == {torch.float32}
    assert all(p.requires_grad for p in vit.parameters()) and model.train().image_encoder.visual_encoder.training
    model.cast_frozen("bf16")   # a trainable ViT is no frozen tower
    assert vit.blocks[0].mlp.fc1.weight.dtype == torch.float32
    set_vit_trainable(model, False)
    assert not any(p.requires_grad for p in vit.parameters())
    assert not model.train().image_encoder.visual_encoder.training
    objective = blip.create_model("blip2_tiny_qformer", "stage1")   # an objective wrapping a Blip2Qformer
    set_vit_trainable(objective)
    assert objective.model.cfg.freeze_vit is False
    assert all(p.requires_grad for p in objective.model.image_encoder.visual_encoder.parameters())
    with pytest.raises(TypeError, match="no BLIP-2 model"):
        set_vit_trainable(blip.create_model("blip_tiny", "caption"))


# ---- a few steps from the LAVIS fixtures ----------------------------------------------------------------------
def losses_over_steps(objective, batch, steps: int = 8, lr: float = 1e-3) -> list[float]:
    """The loss on ``batch`` (eval mode: no dropout noise) before and after each of ``steps`` AdamW steps on it."""
    from blip.train.optim import build_optimizer

    optimizer = build_optimizer(objective, lr=lr, weight_decay=0.0)

    def evaluated() -> float:
        with torch.no_grad():
            return objective.eval()(batch)["loss"].item()

    out = [evaluated()]
    for _ in range(steps):
        optimizer.zero_grad()
        objective.train()(batch)["loss"].backward()
        optimizer.step()
        out.append(evaluated())
    return out


def lavis_model(name: str):
    llm = {"blip2_opt": "opt_llm", "blip2_t5": "t5_llm"}[name]
    return blip.load(LAVIS / name / "checkpoint.pth", llm=LAVIS / name / llm)


@pytest.mark.parametrize("name", ["blip2_opt", "blip2_t5"])
def test_vqa_fine_tuning_from_a_lavis_checkpoint_learns(name, stage1_file):
    torch.manual_seed(0)
    model = question_aware(lavis_model(name), text_init=stage1_file[0])
    set_vit_trainable(model)
    objective = Blip2Stage2Objective(model, question_prompt="Question: {} Short answer:")
    batch = {"pixel_values": torch.randn(2, 3, 56, 56), "text": ["what is shown", "how many"],
             "answers": [["a dog", "dog"], ["two"]], "weights": [[0.6, 0.4], [1.0]]}
    vit_before = model.image_encoder.visual_encoder.blocks[0].mlp.fc1.weight.clone()
    losses = losses_over_steps(objective, batch)
    assert losses[-1] < 0.85 * losses[0], losses   # the repeated batch is being learnt
    assert not torch.equal(vit_before, model.image_encoder.visual_encoder.blocks[0].mlp.fc1.weight)


@pytest.mark.parametrize("name", ["blip2_opt", "blip2_t5"])
def test_instruction_tuning_from_a_lavis_checkpoint_learns_with_vit_and_llm_frozen(name):
    torch.manual_seed(0)
    model = question_aware(lavis_model(name))
    objective = Blip2Stage2Objective(model, max_txt_len=128, max_output_len=256)
    batch = {"pixel_values": torch.randn(2, 3, 56, 56), "text_input": ["Describe the image.", "What is in it?"],
             "text_output": ["a dog on the grass", "a cat"]}
    frozen = {n: p.clone() for n, p in model.named_parameters() if n.startswith(("image_encoder.visual", "llm."))}
    # only the Q-Former and llm_proj move the tiny random LLM: slower than with the ViT trainable (5.8 -> 5.4 for T5)
    losses = losses_over_steps(objective, batch, steps=10, lr=3e-3)
    assert losses[-1] < 0.95 * losses[0], losses   # the repeated batch is being learnt
    after = dict(model.named_parameters())
    assert all(torch.equal(v, after[n]) for n, v in frozen.items())


def test_the_training_run_starts_vqa_from_a_stage2_file_and_text_parts_from_a_stage1_file(tmp_path, stage1_file):
    """scripts/train.py's initialisation for task=blip2_vqa: a LAVIS stage-2 file by name (not the stage-1
    hand-off), the question-aware text parts from model.text_init, the ViT trainable."""
    from blip.train.distributed import DistInfo
    from blip.train.run import initialised_model

    stage2, (stage1, state) = LAVIS / "blip2_opt" / "checkpoint.pth", stage1_file
    cfg = recipe_cfg("vqa", f"init_from={stage2}", f"model.text_init={stage1}", "model.vision_init=null",
                     f"model.llm={LAVIS / 'blip2_opt' / 'opt_llm'}", "model.llm_tokenizer=null",
                     "model.allow_random_frozen=false")
    objective = initialised_model(cfg, tmp_path, None, [], DistInfo())
    reference = lavis_opt()
    t = objective.model.qformer.transformer
    torch.testing.assert_close(t.embeddings.word.weight, state["qformer.transformer.embeddings.word.weight"])
    torch.testing.assert_close(t.layers[1].ffn.fc2.weight, state["qformer.transformer.layers.1.ffn.fc2.weight"])
    torch.testing.assert_close(objective.model.llm_proj.weight, reference.llm_proj.weight)   # from the stage-2 file
    torch.testing.assert_close(objective.model.qformer.query_tokens, reference.qformer.query_tokens)
    assert all(p.requires_grad for p in objective.model.image_encoder.visual_encoder.parameters())
