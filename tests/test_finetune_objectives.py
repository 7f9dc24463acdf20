"""Fine-tuning objectives: caption prompt masking, retrieval ITC/ITM with duplicate image ids, VQA weighted answer loss,
and the weight hand-off pretrain -> objective -> task model by key name."""
import math

import pytest
import torch
import torch.nn.functional as F

import blip.objectives.momentum as bp
from blip.data.text import answer_weights
from blip.data.tokenizer import DEC_TOKEN_ID, ENC_TOKEN_ID
from blip.losses import FeatureQueue, lm_loss
from blip.models.blip import ARCHS, create
from blip.objectives.blip_finetune import CaptionObjective, RetrievalObjective, VQAObjective, wrap_objective
from blip.objectives.blip_pretrain import BlipPretrain, load_pretrain_weights
from blip.objectives.momentum import momentum_itc

PIX = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def tiny(task):
    torch.manual_seed(0)
    return create("blip_tiny", task, image_size=32)


def test_caption_prompt_and_padding_masked():
    obj = CaptionObjective(tiny("caption"))
    seen = []
    obj.text_decoder.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    out = obj({"pixel_values": PIX, "text": ["a dog", "two red cars"], "image_ids": torch.tensor([0, 1])})
    # bert-base-uncased ids: a 1037, picture 3861, of 1997, dog 3899, two 2048, red 2417, cars 3765, [SEP] 102
    want_ids = [[DEC_TOKEN_ID, 1037, 3861, 1997, 1037, 3899, 102, 0],
                [DEC_TOKEN_ID, 1037, 3861, 1997, 2048, 2417, 3765, 102]]
    assert seen[0].tolist() == want_ids
    targets = [[1037, 3899, 102], [2048, 2417, 3765, 102]]   # after the 4 prompt positions, padding excluded
    ids = torch.tensor(want_ids)
    with torch.no_grad():
        logits = obj.model(PIX, ids, (ids != 0).long()).logits
    eps, total, n = 0.1, 0.0, 0
    for b, tgt in enumerate(targets):
        for j, y in enumerate(tgt):
            logp = F.log_softmax(logits[b, 3 + j].double(), dim=-1)   # position t predicts token t + 1
            total += (1 - eps) * -logp[y].item() + eps * -logp.mean().item()
            n += 1
    assert out["loss"].item() == pytest.approx(total / n, rel=1e-5)
    assert set(out) == {"loss", "loss_lm"}


def test_retrieval_itc_targets_with_duplicate_ids_by_hand():
    q = FeatureQueue(2, 2)
    q.image_queue.copy_(torch.tensor([[0.0, -1.0], [1.0, 0.0]]))
    q.text_queue.copy_(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
    q.idx_queue.copy_(torch.tensor([[7, -100]]))
    img, txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.6, 0.8], [0.8, -0.6]])
    img_m, txt_m = torch.tensor([[1.0, 0.0], [0.6, 0.8]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    loss, _, _ = momentum_itc(img, txt, img_m, txt_m, q, torch.tensor(1.0), 0.0, image_ids=torch.tensor([7, 7]))
    # candidates' ids [7, 7, 7, -100]: each row's target is 1/3 on the first three
    txt_all = [[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [1.0, 0.0]]
    img_all = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]]

    def direction(rows, cands):
        total = 0.0
        for r in rows:
            s = [r[0] * c[0] + r[1] * c[1] for c in cands]
            lse = math.log(sum(math.exp(v) for v in s))
            total += -sum((v - lse) / 3 for v in s[:3])
        return total / len(rows)

    want = (direction(img.tolist(), txt_all) + direction(txt.tolist(), img_all)) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)


def test_retrieval_objective_step(monkeypatch):
    calls = []
    real = bp.sample_hard_negatives
    monkeypatch.setattr(bp, "sample_hard_negatives",
                        lambda sim, pos, **kw: calls.append((pos, real(sim, pos, **kw))) or calls[-1][1])
    obj = RetrievalObjective(tiny("retrieval"), queue_size=8)
    ids = torch.tensor([3, 3, 3, 4])
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "text": ["a cat", "the cat", "cat on a mat", "a car"],
             "image_ids": ids, "progress": 0.5}
    out = obj(batch)
    assert set(out) == {"loss", "loss_itc", "loss_itm"} and torch.isfinite(out["loss"])
    for pos, picks in calls:
        assert torch.equal(pos, ids[:, None] == ids[None, :]) and not pos[torch.arange(4), picks].any()
    assert obj.queue.idx_queue[0, :4].tolist() == [3, 3, 3, 4] and obj.queue.queue_ptr.item() == 4
    out["loss"].backward()
    assert all(p.grad is None for n, p in obj.named_parameters() if n.split(".")[0].endswith("_m"))
    assert [n for n, p in obj.named_parameters() if p.requires_grad and p.grad is None] == []
    before = obj.text_proj_m.weight.clone()
    with torch.no_grad():
        obj.text_proj.weight.add_(1.0)
        obj.temp.fill_(0.0)
    obj.after_optimizer_step()
    assert torch.allclose(obj.text_proj_m.weight, 0.995 * before + 0.005 * obj.text_proj.weight, atol=1e-6)
    assert obj.temp.item() == pytest.approx(0.001)


def test_vqa_weighted_answer_loss():
    assert answer_weights(["yes", "yes", "no", "yes"]) == (["yes", "no"], [0.75, 0.25])
    obj = VQAObjective(tiny("vqa"))
    questions, answers = ["what is it", "how many dogs are there"], [["yes", "yes", "no"], ["2"]]
    out = obj({"pixel_values": PIX, "text": questions, "image_ids": torch.tensor([0, 1]), "answers": answers})
    tok = obj.tokenizer
    want = 0.0
    with torch.no_grad():
        for b, ans in enumerate([[("yes", 2 / 3), ("no", 1 / 3)], [("2", 1.0)]]):
            q = torch.tensor([tok(questions[b])["input_ids"]])
            q[:, 0] = ENC_TOKEN_ID
            for a, w in ans:
                a_ids = torch.tensor([tok(a)["input_ids"]])
                a_ids[:, 0] = DEC_TOKEN_ID
                logits = obj.model(PIX[b:b + 1], q, decoder_input_ids=a_ids).logits
                want += w * lm_loss(logits, a_ids, 0.1, reduction="sum_per_sequence").item()
    assert out["loss"].item() == pytest.approx(want / 2, rel=1e-4)
    # explicit weights (BLIP gives VG answers 0.2)
    out2 = obj({"pixel_values": PIX, "text": questions, "image_ids": torch.tensor([0, 1]),
                "answers": [["yes", "no"], ["2"]], "weights": [[2 / 3, 1 / 3], [1.0]]})
    assert out2["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-5)


def test_weights_flow_pretrain_to_objective_to_task_model():
    torch.manual_seed(1)
    pre = BlipPretrain(ARCHS["blip_tiny"].with_overrides(image_size=32), queue_size=8)
    ret = RetrievalObjective(tiny("retrieval"), queue_size=8)
    load_pretrain_weights(ret, pre.state_dict(), "pretrain")        # every key, momentum + queue + temp included
    assert torch.equal(ret.visual_encoder_m.pos_embed, pre.visual_encoder_m.pos_embed)
    assert torch.equal(ret.queue.image_queue, pre.queue.image_queue)
    cap = CaptionObjective(tiny("caption"))
    load_pretrain_weights(cap, pre.state_dict(), "pretrain")
    assert cap.text_decoder.transformer.layers[0].ffn.fc1.weight.data_ptr() != \
        pre.text_decoder.transformer.layers[0].ffn.fc1.weight.data_ptr()
    assert torch.equal(cap.text_decoder.transformer.layers[0].ffn.fc1.weight,
                       pre.text_encoder.layers[0].ffn.fc1.weight)   # the decoder's FFN is the encoder's
    task = tiny("retrieval")
    load_pretrain_weights(task, ret.state_dict(), "fine-tuned objective")
    assert torch.equal(task.itm_head.weight, pre.itm_head.weight)
    vqa = VQAObjective(tiny("vqa"))
    load_pretrain_weights(vqa, pre.state_dict(), "pretrain")   # tiny: vision width == text width, so K/V fit
    with pytest.raises(KeyError):
        wrap_objective("snli_ve", task)
    assert isinstance(wrap_objective("caption", tiny("caption"), prompt="a photo of "), CaptionObjective)
