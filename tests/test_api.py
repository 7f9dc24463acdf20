"""blip.create_model / list_models / load dispatch."""
import pytest
import torch

import blip
from blip.checkpoints import CheckpointError


def test_every_listed_model_is_buildable_at_tiny_size():
    pairs = blip.list_models()
    assert ("blip_base", "caption") in pairs and ("blip2_vitg_qformer", "stage1") in pairs
    assert ("blip2_vitg_qformer", "stage2") not in pairs  # a Q-Former arch has no LLM
    for arch, task in pairs:
        if "tiny" in arch:
            model = blip.create_model(arch, task)
            assert isinstance(model, torch.nn.Module) and any(p.requires_grad for p in model.parameters()), (arch, task)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        blip.load(tmp_path / "nope.pth")
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        blip.load(tmp_path / "dir")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        blip.load(bad)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        blip.load("blip-base-caption")


def test_the_device_is_checked_before_anything_loads(tmp_path, monkeypatch):
    missing = tmp_path / "not_read.pth"   # the device error comes first: the file is never looked at
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device='cuda': no CUDA GPU is visible here; use device='cpu'$"):
        blip.load(missing, device="cuda")
    with pytest.raises(ValueError, match=r"^device='toaster' is not a device: use 'cpu', 'cuda', 'cuda:1' or 'mps'$"):
        blip.load(missing, device="toaster")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device='cuda:2': only 2 cuda device\(s\) visible \(indices 0 to 1\)"):
        blip.load(missing, device=torch.device("cuda", 2))
    with pytest.raises(CheckpointError, match="no such file"):   # a device that exists: on to the file
        blip.load(missing, device="cpu")


FAMILIES = [("blip_tiny", "caption"), ("blip_tiny", "retrieval"), ("blip_tiny", "vqa"), ("blip_tiny", "nlvr"),
            ("blip2_tiny_qformer", "qformer"), ("blip2_tiny_opt", "stage2"), ("blip2_tiny_t5", "instruct")]


@pytest.mark.parametrize("arch,task", FAMILIES)
def test_every_model_tells_its_device_dtype_and_preprocessing(fixtures, arch, task):
    from PIL import Image
    import torchvision.transforms.functional as TF
    from transformers import BlipImageProcessor

    model = blip.create_model(arch, task)
    assert (model.device, model.dtype) == (torch.device("cpu"), torch.float32)
    size = model.image_size
    assert size == (64 if arch == "blip_tiny" else 56)   # the tiny archs' ViT configs (blip.models.*ARCHS)
    for name in ("cat.jpg", "unusual/rgba.png", "unusual/grayscale.png"):
        path = fixtures / "images" / name
        pixels = model.preprocess(path)
        assert pixels.shape == (3, size, size) and pixels.dtype == torch.float32
        if name != "unusual/rgba.png":   # LAVIS's convert("RGB") drops alpha; blip and HF composite it on white
            # LAVIS BlipImageEvalProcessor: bicubic squash to S x S, CLIP's mean and std
            image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
            lavis = TF.normalize(TF.to_tensor(image), (0.48145466, 0.4578275, 0.40821073),
                                 (0.26862954, 0.26130258, 0.27577711))
            assert torch.equal(pixels, lavis), name
        hf = BlipImageProcessor(size={"height": size, "width": size})(Image.open(path), return_tensors="pt")
        assert (pixels - hf.pixel_values[0]).abs().max() < 1.01 / 255 / 0.2613   # HF rounds some pixels the other way
    if model.family == "blip":   # the whole model in one dtype
        assert model.to(torch.bfloat16).dtype == torch.bfloat16
    else:   # BLIP-2: the Q-Former's (trained) dtype; the frozen parts may be stored in bf16
        if hasattr(model, "cast_frozen"):
            model.cast_frozen(torch.bfloat16)
            assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
        assert model.dtype == torch.float32
        model.qformer.to(torch.bfloat16)
        assert model.dtype == torch.bfloat16


def test_preprocess_feeds_the_tensor_api_as_the_string_api_does(fixtures):
    model = blip.create_model("blip2_tiny_qformer", "qformer").eval()
    torch.manual_seed(0)
    path = fixtures / "images" / "cat.jpg"
    texts = ["a cat", "a rocket"]
    pixels = model.preprocess(path)[None].to(model.device, model.dtype)
    ids = model.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        by_tensor = model.itc_similarity(pixels, ids.input_ids, ids.attention_mask)
    torch.testing.assert_close(model.match(path, texts).itc_sim, by_tensor)


def test_list_pretrained_and_version():
    from importlib.metadata import version
    names = blip.list_pretrained()
    assert names[:3] == ["blip-base", "blip-base-capfilt-large", "blip-large"]   # the zoo's table, in its order
    assert "hf-blip2-opt-2.7b" in names and len(names) == len(set(names))
    assert blip.__version__ == version("blip") and blip.__version__[0].isdigit()


def test_every_zoo_entry_builds_and_needs_known_files():
    """Each named checkpoint's (arch, task) is a model blip builds (or one tower: vision / text), what it needs is a
    zoo name or an HF repository id, and a frozen ViT it needs has the width of its arch's ViT (a ViT-L file needs
    clip_vit_L.pth, not eva_vit_g.pth)."""
    from blip.models.blip2 import LLM_ARCHS, QFORMER_ARCHS
    from blip.registry import list_models
    from blip.zoo import HF_REPO_ID, PRETRAINED

    def vit_width(arch: str) -> int:
        return (QFORMER_ARCHS.get(arch) or LLM_ARCHS[arch]).vision.width

    buildable = set(list_models())
    for name, entry in PRETRAINED.items():
        assert (entry.arch, entry.task) in buildable or entry.task in ("vision", "text"), name
        assert all(need in PRETRAINED or HF_REPO_ID.fullmatch(need) for need in entry.needs), name
        vits = [need for need in entry.needs if need in PRETRAINED and PRETRAINED[need].task == "vision"]
        assert all(vit_width(PRETRAINED[vit].arch) == vit_width(entry.arch) for vit in vits), name
