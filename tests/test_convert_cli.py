"""`blip convert` for every BLIP-2 model blip.load reads: LAVIS stage 1, LAVIS stage 2 (OPT, FlanT5; the frozen ViT
and LLM given with --vision-weights / --llm) and InstructBLIP, to HF layout (transformers' own classes load the export
and give the logits blip gave before it) and to safetensors (blip.load reads it back, tensor for tensor). Without
--image-token-id the HF export takes the id HF's own processor gives <image>; an output name without .safetensors
gets it; every flag has its --help line."""
from pathlib import Path

import pytest
import torch
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, InstructBlipForConditionalGeneration

import blip
from blip.cli import main
from tiny_weights import randomize
from conftest import FIXTURES

LAVIS = FIXTURES / "lavis"
EVA = LAVIS / "eva_vit_tiny.pth"
PX = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))


def convert(tmp_path: Path, source: Path, to: str, *flags: str) -> Path:
    out = tmp_path / ("hf" if to == "hf" else "model.safetensors")
    assert main(["convert", str(source), str(out), "--to", to, *map(str, flags)]) == 0
    return out


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_stage1(tmp_path, one_thread):
    source = LAVIS / "blip2_qformer" / "checkpoint_trainable_only.pth"
    ours = blip.load(source, vision_weights=EVA)
    ids = torch.tensor([[101, 2003, 1037, 4937, 102], [101, 1037, 4937, 102, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        itm, itc = ours.itm_logits(PX, ids, mask), ours.itc_similarity(PX, ids, mask)
        hf = Blip2ForImageTextRetrieval.from_pretrained(convert(tmp_path, source, "hf", "--vision-weights", EVA))
        hf_itm = hf.eval()(pixel_values=PX, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        hf_itc = hf(pixel_values=PX, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    assert (hf_itm.logits_per_image - itm).abs().max() < 1e-4 and (hf_itc.logits_per_image - itc).abs().max() < 1e-4
    assert (itm[:, 1] - itm[:, 0]).std() > 1e-3   # not a vacuous comparison
    back = blip.load(convert(tmp_path, source, "safetensors", "--vision-weights", EVA))
    assert same_weights(ours, back) and back.has_lm_head


@pytest.mark.parametrize("name,llm", [("blip2_opt", "opt_llm"), ("blip2_t5", "t5_llm")])
def test_stage2_lavis_file(tmp_path, one_thread, name, llm):
    source, flags = LAVIS / name / "checkpoint_trainable_only.pth", ("--llm", LAVIS / name / llm,
                                                                     "--vision-weights", EVA)
    ours = blip.load(source, llm=LAVIS / name / llm, vision_weights=EVA)
    token = ours.llm.config.vocab_size - 1   # the image placeholder HF needs in the LLM vocabulary
    prompt = torch.tensor([[ours.start_token_id, 5, 6, 7], [ours.start_token_id, 8, 9, 10]])
    dec = torch.tensor([[ours.llm.config.decoder_start_token_id or 0, 11, 12]] * 2) if ours.is_seq2seq else None
    hf = Blip2ForConditionalGeneration.from_pretrained(convert(tmp_path, source, "hf", *flags, "--image-token-id",
                                                               token)).eval()
    nq = ours.qformer.num_queries
    with torch.no_grad():
        got = ours(PX, prompt, decoder_input_ids=dec).logits
        ref = hf(pixel_values=PX, input_ids=torch.cat([torch.full((2, nq), token), prompt], 1),
                 decoder_input_ids=dec).logits
    assert (got - (ref if ours.is_seq2seq else ref[:, nq:])).abs().max() < 1e-4
    back = blip.load(convert(tmp_path, source, "safetensors", *flags))
    assert same_weights(ours, back)
    with torch.no_grad():
        assert torch.equal(back(PX, prompt, decoder_input_ids=dec).logits, got)


def test_instructblip_hf_and_safetensors_round_trip(tmp_path, one_thread):
    from blip.convert.blip2 import export_hf
    model = blip.create_model("blip2_tiny_opt", "instruct").eval()
    randomize(model, 5)
    token = model.llm.config.vocab_size - 1
    export_hf(model, tmp_path / "start", image_token_index=token)
    stored = convert(tmp_path, tmp_path / "start", "safetensors")
    ours = blip.load(stored)
    assert same_weights(model, ours) and ours.instruct
    hf = InstructBlipForConditionalGeneration.from_pretrained(convert(tmp_path, stored, "hf")).eval()
    q_ids = torch.tensor([[101, 2054, 2003, 102], [101, 2129, 102, 0]])
    prompt = torch.tensor([[2, 5, 6, 7], [2, 8, 9, 10]])
    nq = model.qformer.num_queries
    with torch.no_grad():
        got = model(PX, prompt, qformer_input_ids=q_ids, qformer_attention_mask=(q_ids != 0).long()).logits
        ref = hf(pixel_values=PX, input_ids=torch.cat([torch.full((2, nq), token), prompt], 1),
                 qformer_input_ids=q_ids, qformer_attention_mask=(q_ids != 0).long()).logits[:, nq:]
    assert (got - ref).abs().max() < 1e-4 and got.std() > 1e-2


def test_the_image_token_id_defaults_to_the_row_hf_processors_give_image(tmp_path, one_thread, caplog, capsys):
    from PIL import Image
    from transformers import AutoTokenizer, Blip2Processor, BlipImageProcessor
    name = "blip2_opt"
    source, llm = LAVIS / name / "checkpoint_trainable_only.pth", LAVIS / name / "opt_llm"
    ours = blip.load(source, llm=llm, vision_weights=EVA)
    with caplog.at_level("WARNING"):
        out = convert(tmp_path, source, "hf", "--llm", llm, "--vision-weights", EVA)   # no --image-token-id
    # the fixture's OPT: 512 embedding rows, a 500-token tokenizer; HF's processor adds <image> as token 500
    nq = ours.qformer.num_queries
    processor = Blip2Processor(BlipImageProcessor(), AutoTokenizer.from_pretrained(out), num_query_tokens=nq)
    token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (token, ours.llm.get_input_embeddings().num_embeddings) == (500, 512)
    assert "image_token_index=500" in caplog.text
    hf = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    assert hf.config.image_token_index == token
    prompt = torch.tensor([[ours.start_token_id, 5, 6, 7]] * 2)
    image = Image.open(FIXTURES / "images" / "cat.jpg")
    ids = processor(images=image, text="a b", return_tensors="pt").input_ids   # HF's own query placeholders
    assert ids[0, :nq].tolist() == [token] * nq and token not in ids[0, nq:]
    with torch.no_grad():
        ref = hf(pixel_values=PX, input_ids=torch.cat([ids[:, :nq].expand(2, -1), prompt], 1)).logits[:, nq:]
        assert (ours(PX, prompt).logits - ref).abs().max() < 1e-4


def test_without_a_spare_row_the_error_names_the_flag(tmp_path, one_thread, capsys):
    from blip.convert.blip2 import save_safetensors
    model = blip.create_model("blip2_tiny_opt", "stage2")   # an LLM built from a config: no tokenizer to go by
    stored = save_safetensors(model, tmp_path / "tiny.safetensors")
    assert main(["convert", str(stored), str(tmp_path / "hf"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert "pass --image-token-id <id> (an id whose embedding row no text uses)" in err
    assert "image_token_index" not in err   # the library's keyword, which the command does not take
    assert main(["convert", str(stored), str(tmp_path / "hf"), "--to", "hf", "--image-token-id", "7"]) == 0
    assert Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").config.image_token_index == 7


def test_a_safetensors_output_without_the_extension_gets_it_and_loads(tmp_path, one_thread, capsys):
    model = blip.create_model("blip_tiny", "caption")
    torch.save(model.state_dict(), tmp_path / "model.pth")
    assert main(["convert", str(tmp_path / "model.pth"), str(tmp_path / "exported"), "--to", "safetensors"]) == 0
    written = tmp_path / "exported.safetensors"
    assert capsys.readouterr().out.strip() == str(written) and not (tmp_path / "exported").exists()
    assert same_weights(blip.load(written), model)


def test_every_convert_argument_is_documented_in_help(capsys):
    import argparse
    from blip.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    undocumented = [a.dest for a in sub.choices["convert"]._actions if not a.help]
    assert undocumented == []
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "--image-token-id" in capsys.readouterr().out
