"""The table of checkpoint formats (blip.convert.formats): every row recognises a file of its layout (written by the
original classes where we have them: transformers, timm, blip's exports of LAVIS / HF layouts) and no earlier row
takes it; its key map gives the model's names; and all five ways into a model read through the one reader."""
import copy

import pytest
import timm
import torch
from transformers import BertConfig, BertForMaskedLM, CLIPVisionConfig, CLIPVisionModel

import blip
from blip.checkpoints import CheckpointError
from blip.convert import blip as blip_convert
from blip.convert import formats
from blip.convert.blip2 import save_safetensors
from blip.convert.blip2_hf import export_hf_qformer
from blip.convert.blip2_lavis import export_lavis
from blip.convert.formats import FORMATS, read_checkpoint
from blip.models.lora import LoraSettings, apply_lora, save_adapters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def caption():
    torch.manual_seed(0)
    return blip.create_model("blip_tiny", "caption", image_size=32)


@pytest.fixture(scope="module")
def qformer():
    torch.manual_seed(0)
    return blip.create_model("blip2_tiny_qformer", "qformer")


def write_run(root, state, config="model:\n  arch: blip_tiny\n  task: caption\n  overrides:\n    image_size: 32\n"):
    step = root / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    torch.save({"model": state}, step / "state.pt")
    (root / "config.yaml").write_text(config)
    return root


def test_every_row_recognises_its_layout(tmp_path, caption, qformer):
    from blip.objectives.blip_finetune import CaptionObjective

    bert = BertForMaskedLM(BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=32, patch_size=16))
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=1,
                                                           num_heads=2, num_classes=3)
    save_safetensors(qformer, tmp_path / "stage1.safetensors")
    adapted = copy.deepcopy(caption)
    settings = LoraSettings(r=2, towers=("vit",))
    apply_lora(adapted, settings)
    sources = {
        "run": write_run(tmp_path / "run", CaptionObjective(caption).state_dict()),
        "adapters": save_adapters(adapted, tmp_path / "adapters", base="base.safetensors", settings=settings),
        "hf-blip": blip_convert.export_hf(caption, tmp_path / "hf_blip"),
        "hf-blip2": export_hf_qformer(qformer, tmp_path / "hf_blip2"),
        "blip2": tmp_path / "stage1.safetensors",
        "lavis-blip2-llm": {"query_tokens": torch.zeros(1, 2, 4), "opt_proj.weight": torch.zeros(8, 4)},
        "lavis-blip2-stage1": export_lavis(qformer),
        "blip": CaptionObjective(caption).state_dict(),
        "blip-original": blip_convert.ours_to_original(caption.state_dict()),
        "hf-clip-vision": clip.state_dict(),
        "openai-clip-vit": {"visual.conv1.weight": torch.zeros(4, 3, 2, 2), "visual.class_embedding": torch.zeros(4)},
        "timm-vit": vit.state_dict(),
        "hf-bert": bert.state_dict(),
        "by-name": {"0.weight": torch.zeros(2, 2)},
    }
    assert set(sources) == {f.name for f in FORMATS}, "a row without a test file"
    for name, source in sources.items():
        assert read_checkpoint(source).format.name == name, name


def test_key_maps_give_the_model_names(tmp_path, caption, qformer):
    original = read_checkpoint(blip_convert.ours_to_original(caption.state_dict()))
    assert original.state.keys() == caption.state_dict().keys()
    lavis = read_checkpoint(export_lavis(qformer))
    assert lavis.state.keys() == qformer.state_dict().keys()
    hf = read_checkpoint(export_hf_qformer(qformer, tmp_path / "hf"))
    assert hf.state.keys() == qformer.state_dict().keys() - {"temp"} - {k for k in qformer.state_dict()
                                                                     if k.startswith("lm_head.")}
    assert all(torch.equal(hf.state[k], v) for k, v in qformer.state_dict().items() if k in hf.state)


def test_a_one_tower_file_is_no_model_and_a_model_no_tower(tmp_path, caption):
    torch.save(timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=1,
                                                                num_heads=2).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match=r"vit\.pth.*one vision tower.*vision_init"):
        blip.load(tmp_path / "vit.pth")
    torch.save(caption.state_dict(), tmp_path / "caption.pth")
    from blip.convert.unimodal import init_vision
    with pytest.raises(CheckpointError, match=r"vision_init=.*caption\.pth.*not a vision tower.*init_from"):
        init_vision(blip.create_model("blip_tiny", "caption", image_size=32), tmp_path / "caption.pth")


def test_the_five_ways_in_read_through_the_one_reader(tmp_path, monkeypatch, caption):
    """blip.load, init_from, vision_init, the stage-1 hand-off and run directories each identify their source
    through formats.identify (the only place that picks a format)."""
    from blip.convert.blip2_handoff import init_from_stage1
    from blip.convert.unimodal import init_vision
    from blip.objectives.blip_finetune import CaptionObjective
    from blip.train.init import init_from_checkpoint

    seen = []
    identify = formats.identify
    monkeypatch.setattr(formats, "identify", lambda c: seen.append(identify(c).name) or identify(c))

    torch.save(caption.state_dict(), tmp_path / "caption.pth")
    blip.load(tmp_path / "caption.pth")
    init_from_checkpoint(CaptionObjective(blip.create_model("blip_tiny", "caption", image_size=32)),
                         tmp_path / "caption.pth")
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2,
                                                           num_heads=4, mlp_ratio=4.0)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    init_vision(blip.create_model("blip_tiny", "caption", image_size=32), tmp_path / "vit.pth")
    stage1 = blip.create_model("blip2_tiny_qformer", "stage1")
    torch.save({"model": stage1.state_dict()}, tmp_path / "state.pt")
    init_from_stage1(blip.create_model("blip2_tiny_opt", "stage2"), tmp_path / "state.pt")
    blip.load(write_run(tmp_path / "run", CaptionObjective(caption).state_dict()))
    # an adapter directory's base goes through the same reader
    base = blip_convert.save_safetensors(caption, tmp_path / "base.safetensors")
    adapted = copy.deepcopy(caption)
    apply_lora(adapted, LoraSettings(r=2, towers=("text",)))
    blip.load(save_adapters(adapted, tmp_path / "adapters", base=base, settings=LoraSettings(r=2, towers=("text",))))
    assert seen == ["blip", "blip", "timm-vit", "blip2", "run", "adapters", "blip"]
