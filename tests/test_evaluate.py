"""Every benchmark task end to end on a tiny model and a tiny dataset in the official format; the metrics in
metrics.json are recomputed from predictions.json with the reference tools (pycocoevalcap's COCOEvalCap flow,
the official VQA accuracy formula, recall from the score matrix) and must agree."""
from __future__ import annotations

import json

import pytest
import torch
from eval_fixtures import (run_task, tiny_blip, write_coco_karpathy, write_gqa, write_nlvr2, write_nocaps,
                           write_retrieval, write_vqa)


def cocoevalcap_reference(gt_file, predictions_file, monkeypatch, image_ids=None) -> dict:
    """pycocoevalcap's own flow (COCO -> loadRes -> COCOEvalCap.evaluate); SPICE stubbed: it needs CoreNLP jars."""
    from pycocoevalcap import eval as cocoeval
    from pycocotools.coco import COCO

    from blip.metrics.captioning import meteor

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, []

        def method(self):
            return "SPICE"

    monkeypatch.setattr(cocoeval, "Spice", NoSpice)
    monkeypatch.setattr(cocoeval, "Meteor", meteor)  # the same pycocoevalcap scorer; its JVM starts once
    coco = COCO(str(gt_file))
    results = coco.loadRes(str(predictions_file)) if image_ids is None else coco.loadRes(
        [r for r in json.loads(predictions_file.read_text()) if r["image_id"] in image_ids])
    ev = cocoeval.COCOEvalCap(coco, results)
    ev.params["image_id"] = results.getImgIds()
    ev.evaluate()
    return {k: v for k, v in ev.eval.items() if k != "SPICE"}


def test_caption_coco_matches_cocoevalcap(tmp_path, fixtures, java, monkeypatch, one_thread):
    root, out = tmp_path / "data", tmp_path / "out"
    ids = write_coco_karpathy(fixtures, root)
    model = tiny_blip("caption")
    metrics = run_task(model, "caption_coco", "test", root, out, ("task.spice=false",))
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted(p["image_id"] for p in predictions) == ids and all(set(p) == {"image_id", "caption"}
                                                                     for p in predictions)
    # BLIP's protocol (prompt, beam 3, lengths 20/5 counting the prompt) through the string API, on the files
    direct = model.caption([str(root / f"val2014/COCO_val2014_{i:012d}.jpg") for i in ids])
    assert [p["caption"] for p in predictions] == direct
    reference = cocoevalcap_reference(root / "annotations/coco_karpathy_test_gt.json", out / "predictions.json",
                                      monkeypatch)
    assert set(reference) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    for name, value in reference.items():
        assert metrics[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert "disabled" in metrics["SPICE_skipped"]
    assert json.loads((out / "metrics.json").read_text())["CIDEr"] == metrics["CIDEr"]


def test_nocaps_scores_each_domain_on_its_own(tmp_path, fixtures, java, monkeypatch):
    root, out = tmp_path / "data", tmp_path / "out"
    write_nocaps(fixtures, root)
    metrics = run_task(tiny_blip("caption"), "caption_nocaps", "val", root, out, ("task.spice=false",))
    gt = root / "annotations/nocaps_val_4500_captions.json"
    assert set(metrics) >= {"in-domain", "near-domain", "out-domain", "CIDEr"}
    overall = cocoevalcap_reference(gt, out / "predictions.json", monkeypatch)
    assert metrics["CIDEr"] == pytest.approx(overall["CIDEr"], rel=1e-9)
    out_domain = cocoevalcap_reference(gt, out / "predictions.json", monkeypatch, image_ids={2, 5})
    assert metrics["out-domain"]["CIDEr"] == pytest.approx(out_domain["CIDEr"], rel=1e-9)
    assert metrics["out-domain"]["Bleu_4"] == pytest.approx(out_domain["Bleu_4"], rel=1e-9)


def official_vqa_accuracy(predictions: list[dict], annotations: list[dict]) -> dict:
    """The official formula on answers that need no normalisation: mean over the 10 leave-one-out subsets of
    min(1, matches / 3), then averages (percent, 2 decimals) overall and per answer type."""
    by_id = {a["question_id"]: a for a in annotations}
    per_type: dict[str, list[float]] = {}
    accs = []
    for p in predictions:
        answers = [x["answer"] for x in by_id[p["question_id"]]["answers"]]
        acc = sum(min(1.0, sum(a == p["answer"] for a in answers[:k] + answers[k + 1:]) / 3)
                  for k in range(len(answers))) / len(answers)
        accs.append(acc)
        per_type.setdefault(by_id[p["question_id"]]["answer_type"], []).append(acc)
    return {"overall": round(100 * sum(accs) / len(accs), 2),
            "perAnswerType": {t: round(100 * sum(v) / len(v), 2) for t, v in per_type.items()}}


@pytest.mark.parametrize("method", ["rank", "generate"])
def test_vqa_v2_val_matches_the_official_accuracy(tmp_path, fixtures, method, one_thread):
    root, out = tmp_path / "data", tmp_path / "out"
    write_vqa(fixtures, root, "annotations/v2_OpenEnded_mscoco_val2014_questions.json",
              "annotations/v2_mscoco_val2014_annotations.json", "annotations/answer_list.json")
    model = tiny_blip("vqa", seed=3)
    metrics = run_task(model, "vqa_v2", "val", root, out, (f"task.protocol.blip.method={method}",))
    predictions = json.loads((out / "predictions.json").read_text())
    questions = json.loads((root / "annotations/v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    assert [p["question_id"] for p in predictions] == [q["question_id"] for q in questions["questions"]]
    assert set(predictions[0]) == {"question_id", "answer"}
    if method == "rank":
        answer_list = json.loads((root / "annotations/answer_list.json").read_text())
        assert {p["answer"] for p in predictions} <= set(answer_list)
    annotations = json.loads((root / "annotations/v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    expected = official_vqa_accuracy(predictions, annotations)
    assert metrics["overall"] == expected["overall"]
    assert metrics["perAnswerType"] == expected["perAnswerType"]
    assert set(expected["perAnswerType"]) == {"yes/no", "number", "other"}


def test_vqa_v2_test_dev_writes_the_server_file_only(tmp_path, fixtures, one_thread):
    root, out = tmp_path / "data", tmp_path / "out"
    write_vqa(fixtures, root, "annotations/v2_OpenEnded_mscoco_test-dev2015_questions.json", None,
              "annotations/answer_list.json", subset="test2015")
    assert run_task(tiny_blip("vqa"), "vqa_v2", "test", root, out) == {}
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 8 and all(set(p) == {"question_id", "answer"} for p in predictions)


def tiny_blip2_opt(fixtures):
    from blip import create_model as create
    torch.manual_seed(0)
    return create("blip2_tiny_opt", "stage2", tokenizer=fixtures / "lavis/blip2_opt/opt_llm").eval()


def test_okvqa_and_gqa_zero_shot_with_blip2(tmp_path, fixtures, one_thread):
    model = tiny_blip2_opt(fixtures)
    root = tmp_path / "data"
    write_vqa(fixtures, root, "annotations/OpenEnded_mscoco_val2014_questions.json",
              "annotations/mscoco_val2014_annotations.json", "annotations/okvqa_answer_list.json")
    metrics = run_task(model, "okvqa", "val", root, tmp_path / "okvqa", ("task.protocol.blip2_llm.num_beams=2",))
    predictions = json.loads((tmp_path / "okvqa/predictions.json").read_text())
    # the LAVIS prompt and settings, through the model's own string API
    questions = json.loads((root / "annotations/OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    direct = model.answer(str(root / f"val2014/COCO_val2014_{questions[0]['image_id']:012d}.jpg"),
                          questions[0]["question"], num_beams=2, beam_length_convention="total")
    assert predictions[0]["answer"] == direct[0]
    annotations = json.loads((root / "annotations/mscoco_val2014_annotations.json").read_text())["annotations"]
    if "lemmatizer_skipped" not in metrics:  # spaCy installed: the formula sees lemmatized answers, still exact
        assert metrics["overall"] == official_vqa_accuracy(predictions, annotations)["overall"]
    else:
        assert "en_core_web_sm" in metrics["lemmatizer_skipped"]
        assert metrics["overall"] == official_vqa_accuracy(predictions, annotations)["overall"]

    write_gqa(fixtures, root)
    metrics = run_task(model, "gqa", "test", root, tmp_path / "gqa", ("task.protocol.blip2_llm.num_beams=1",))
    predictions = json.loads((tmp_path / "gqa/predictions.json").read_text())
    gold = json.loads((root / "annotations/testdev_balanced_questions.json").read_text())
    assert [p["questionId"] for p in predictions] == list(gold)
    hits = [p["prediction"].strip().lower().rstrip(".") == gold[p["questionId"]]["answer"] for p in predictions]
    assert metrics["overall"] == pytest.approx(100 * sum(hits) / len(hits))


def recall_from_scores(scores: dict, img2txt: list[list[int]], n_txt: int) -> dict:
    """Recall@K straight from the stored top-k score rows (positions outside the top-k never reach the top 10)."""
    out = {}
    txt2img = {j: i for i, texts in enumerate(img2txt) for j in texts}
    for k in (1, 5, 10):
        hit_i2t = [any(j in img2txt[i] for j in scores["i2t_index"][i][:k].tolist()) for i in range(len(img2txt))]
        hit_t2i = [txt2img[j] in scores["t2i_index"][j][:k].tolist() for j in range(n_txt)]
        out[f"txt_r{k}"], out[f"img_r{k}"] = 100 * sum(hit_i2t) / len(hit_i2t), 100 * sum(hit_t2i) / len(hit_t2i)
    return out


def brute_force_scores(model, pixels, texts, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC for every pair, ITM for every pair (one pair at a time); score = ITM + ITC inside each query's top-k."""
    from blip.data.tokenizer import tokenize, with_first_token
    enc = tokenize(model.tokenizer, texts, 35)
    sim = model.encode_image(pixels) @ model.encode_text(enc["input_ids"], enc["attention_mask"]).t()
    itm_ids = with_first_token(enc["input_ids"], model.cfg.enc_token_id)
    itm = torch.stack([torch.stack([model.itm_logits(pixels[i:i + 1], itm_ids[j:j + 1], enc["attention_mask"][j:j + 1])
                                    [0, 1] for j in range(len(texts))]) for i in range(len(pixels))])
    i2t = torch.full_like(sim, -100.0)
    t2i = torch.full_like(sim.t(), -100.0)
    for i in range(sim.shape[0]):
        top = sim[i].topk(min(k, sim.shape[1])).indices
        i2t[i, top] = itm[i, top] + sim[i, top]
    for j in range(sim.shape[1]):
        top = sim[:, j].topk(min(k, sim.shape[0])).indices
        t2i[j, top] = itm[top, j] + sim[top, j]
    return i2t, t2i


def test_retrieval_coco_itm_rerank_matches_a_brute_force_score_matrix(tmp_path, fixtures, one_thread):
    from safetensors.torch import load_file

    from blip.data.images import load_image
    from blip.data.text import pre_caption
    from blip.data.transforms import image_transform
    root, out = tmp_path / "data", tmp_path / "out"
    paths = write_retrieval(fixtures, root, "annotations/coco_karpathy_test.json", "val2014")
    model = tiny_blip("retrieval", seed=1)
    metrics = run_task(model, "retrieval_coco", "test", root, out, ("task.protocol.blip.k=12",))
    entries = json.loads((root / "annotations/coco_karpathy_test.json").read_text())
    texts = [pre_caption(c, 30) for e in entries for c in e["caption"]]
    img2txt = [list(range(5 * i, 5 * i + 5)) for i in range(len(entries))]
    scores = load_file(str(out / "scores.safetensors"))
    assert metrics == pytest.approx({**recall_from_scores(scores, img2txt, len(texts)), **{
        k: metrics[k] for k in ("txt_r_mean", "img_r_mean", "r_mean")}})
    transform = image_transform(model.cfg.image_size)
    pixels = torch.stack([transform(load_image(root / p)) for p in paths])
    with torch.no_grad():
        i2t, t2i = brute_force_scores(model, pixels, texts, k=12)
    top_i2t = torch.gather(i2t, 1, scores["i2t_index"])
    assert torch.allclose(scores["i2t_score"], top_i2t, atol=1e-5)
    assert torch.allclose(scores["t2i_score"], torch.gather(t2i, 1, scores["t2i_index"]), atol=1e-5)
    assert torch.equal(scores["i2t_score"], scores["i2t_score"].sort(dim=1, descending=True).values)
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["i2t"] == scores["i2t_index"][:, :10].tolist()


def test_retrieval_flickr_blip2_and_itc_only(tmp_path, fixtures, one_thread):
    from blip.metrics.retrieval import recall_at_k
    from blip import create_model as create
    root = tmp_path / "data"
    write_retrieval(fixtures, root, "annotations/flickr30k_test.json", "flickr30k-images")
    torch.manual_seed(0)
    model = create("blip2_tiny_qformer", "qformer").eval()
    reranked = run_task(model, "retrieval_flickr", "test", root, tmp_path / "itm")
    itc = run_task(model, "retrieval_flickr", "test", root, tmp_path / "itc", ("task.itm=false",))
    assert set(reranked) == set(itc) == {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
                                         "img_r_mean", "r_mean"}
    # ITC only: the stored scores are the similarities (max over queries) themselves
    from safetensors.torch import load_file
    scores = load_file(str(tmp_path / "itc/scores.safetensors"))
    img2txt = [list(range(5 * i, 5 * i + 5)) for i in range(5)]
    sim = torch.full((5, 25), -1e9).scatter_(1, scores["i2t_index"], scores["i2t_score"])
    assert itc["txt_r1"] == pytest.approx(recall_at_k(sim, img2txt)["i2t_r1"])


def test_nlvr2_dev_accuracy_from_the_two_image_classifier(tmp_path, fixtures, one_thread):
    from blip.data.images import load_image
    from blip.data.text import pre_caption
    from blip.data.tokenizer import tokenize, with_first_token
    from blip.data.transforms import image_transform
    root, out = tmp_path / "data", tmp_path / "out"
    entries = write_nlvr2(fixtures, root)
    model = tiny_blip("nlvr", seed=5)
    metrics = run_task(model, "nlvr2", "val", root, out)
    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["identifier"] for p in predictions] == [e["identifier"] for e in entries]
    transform = image_transform(model.cfg.image_size)
    pair = [e["identifier"].rsplit("-", 1)[0] for e in entries]
    left = torch.stack([transform(load_image(root / f"nlvr2/images/dev/{p}-img0.png")) for p in pair])
    right = torch.stack([transform(load_image(root / f"nlvr2/images/dev/{p}-img1.png")) for p in pair])
    enc = tokenize(model.tokenizer, [pre_caption(e["sentence"], 40) for e in entries], 512)
    with torch.no_grad():
        logits = model(left, right, with_first_token(enc["input_ids"], model.cfg.enc_token_id),
                       enc["attention_mask"]).logits
    expected = ["True" if c == 1 else "False" for c in logits.argmax(-1).tolist()]
    assert [p["prediction"] for p in predictions] == expected
    hits = sum(p == e["label"] for p, e in zip(expected, entries))
    assert metrics["accuracy"] == pytest.approx(100 * hits / len(entries))


def test_caption_coco_with_blip2_models_uses_the_lavis_settings(tmp_path, fixtures, java, one_thread):
    from blip import create_model as create
    root = tmp_path / "data"
    ids = write_coco_karpathy(fixtures, root, n=3)
    files = [str(root / f"val2014/COCO_val2014_{i:012d}.jpg") for i in ids]
    llm = tiny_blip2_opt(fixtures)
    metrics = run_task(llm, "caption_coco", "test", root, tmp_path / "llm",
                       ("task.spice=false", "task.protocol.blip2_llm.num_beams=2"))
    predictions = json.loads((tmp_path / "llm/predictions.json").read_text())
    # prompt "a photo of", 30 new tokens, LAVIS min_length 8 (OPT: 8 new tokens)
    assert [p["caption"] for p in predictions] == llm.caption(files, prompt="a photo of", num_beams=2,
                                                              max_new_tokens=30, min_new_tokens=8,
                                                              beam_length_convention="total")
    assert 0 <= metrics["CIDEr"]
    torch.manual_seed(0)
    qformer = create("blip2_tiny_qformer", "qformer").eval()
    run_task(qformer, "caption_coco", "test", root, tmp_path / "qformer", ("task.spice=false",))
    predictions = json.loads((tmp_path / "qformer/predictions.json").read_text())
    assert [p["caption"] for p in predictions] == qformer.caption(files, num_beams=3, max_new_tokens=29,
                                                                  min_new_tokens=9)
