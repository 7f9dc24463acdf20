"""Models in Hugging Face's own cache layout load: ``models--org--name/snapshots/<revision>/`` whose files are links
to ``../../blobs/<sha256>`` (what ``huggingface-cli download`` and ``from_pretrained`` leave behind), sharded weights
included, by path, by repository id (the cache found by huggingface_hub's environment rule) and by zoo name. Links
out of the ``models--org--name`` folder stay refused. The caches are built by hand from ``save_pretrained`` (no
download); logits are compared with transformers' own model."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, BlipConfig, BlipForConditionalGeneration, OPTConfig

import blip
from blip.checkpoints import CheckpointError, CheckpointNotFoundError
from tiny_weights import randomize

REVISION = "0123456789abcdef0123456789abcdef01234567"
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def into_hf_cache(saved: Path, hub: Path, repo_id: str) -> Path:
    """Move a ``save_pretrained`` directory into the cache layout of huggingface_hub: each file's bytes in
    ``blobs/<sha256>``, the snapshot's file a relative link to it, ``refs/main`` naming the revision. -> snapshot."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot, blobs = repo / "snapshots" / REVISION, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in sorted(saved.iterdir()):
        sha = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.move(file, blobs / sha)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", sha))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def sharded(snapshot: Path) -> list[str]:
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


@pytest.fixture(scope="module")
def blip_caption(tmp_path_factory):
    """(HF BlipForConditionalGeneration, its snapshot in a cache at ``hub``, hub): weights in 3+ shards."""
    torch.manual_seed(0)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, initializer_range=0.02),
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2, bos_token_id=97,
                         eos_token_id=2, pad_token_id=0, sep_token_id=3),
        projection_dim=16, image_text_hidden_size=16)
    hf = BlipForConditionalGeneration(config).eval()
    tmp = tmp_path_factory.mktemp("blip_cache")
    hf.save_pretrained(tmp / "saved", max_shard_size="100KB")
    snapshot = into_hf_cache(tmp / "saved", tmp / "hub", "org/tiny-blip")
    assert len(sharded(snapshot)) >= 3 and (snapshot / sharded(snapshot)[0]).is_symlink()
    return hf, snapshot, tmp / "hub"


def caption_logits(model) -> torch.Tensor:
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[97, 5, 6, 7], [97, 8, 9, 10]])
    with torch.no_grad():
        return model(pixel_values=pixels, input_ids=ids).logits


def test_a_sharded_blip_snapshot_loads_by_path(blip_caption):
    hf, snapshot, _ = blip_caption
    ours = blip.load(snapshot)
    torch.testing.assert_close(caption_logits(ours), caption_logits(hf), atol=1e-4, rtol=0)


def test_a_sharded_blip2_snapshot_loads_by_path(tmp_path):
    opt = OPTConfig(vocab_size=99, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2,
                    pad_token_id=1)
    config = Blip2Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=28, patch_size=14),
                         qformer_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, cross_attention_frequency=1,
                                             max_position_embeddings=64),
                         text_config=opt.to_dict(), num_query_tokens=4, image_token_index=98)
    hf = Blip2ForConditionalGeneration(config).eval()
    randomize(hf, 1)
    hf.save_pretrained(tmp_path / "saved", max_shard_size="100KB")
    snapshot = into_hf_cache(tmp_path / "saved", tmp_path / "hub", "org/tiny-blip2")
    assert len(sharded(snapshot)) >= 3
    ours = blip.load(snapshot)
    pixels, prompt = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0)), torch.tensor([[2, 5, 6]])
    with torch.no_grad():   # HF marks the 4 query positions with image_token_index in input_ids; blip takes the prompt
        ref = hf(pixel_values=pixels, input_ids=torch.cat([torch.full((1, 4), 98), prompt], 1).expand(2, -1)).logits
        got = ours(pixels, prompt.expand(2, -1)).logits
    torch.testing.assert_close(got, ref[:, 4:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_a_repository_id_loads_from_the_local_cache(blip_caption, monkeypatch, tmp_path, variable):
    hf, _, hub = blip_caption
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))   # not the machine's own cache
    with pytest.raises(CheckpointNotFoundError, match=r"'org/tiny-blip': .*not a repository in the Hugging Face "
                                                      rf"cache \({tmp_path}/.cache/huggingface/hub\)"):
        blip.load("org/tiny-blip")
    if variable == "HF_HOME":   # the cache is $HF_HOME/hub
        (tmp_path / "hf_home").mkdir()
        (tmp_path / "hf_home" / "hub").symlink_to(hub)
    monkeypatch.setenv(variable, str(hub if variable == "HF_HUB_CACHE" else tmp_path / "hf_home"))
    torch.testing.assert_close(caption_logits(blip.load("org/tiny-blip")), caption_logits(hf), atol=1e-4, rtol=0)


def test_a_zoo_name_of_an_hf_repository_resolves_to_its_cached_snapshot(tmp_path, monkeypatch):
    from blip.zoo import resolve
    monkeypatch.setenv("BLIP_HOME", str(tmp_path / "blip_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resolve("hf-blip-vqa-base")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "config.json").write_text("{}")
    snapshot = into_hf_cache(tmp_path / "saved", tmp_path / "hub", "Salesforce/blip-vqa-base")
    assert resolve("hf-blip-vqa-base") == snapshot


def test_links_out_of_the_cached_repository_are_refused(blip_caption, tmp_path):
    _, cached, _ = blip_caption
    repo = tmp_path / "hub" / "models--org--linked"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(cached.parent.parent, repo, symlinks=True)
    first = sharded(snapshot)[0]
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    shutil.copy(snapshot / first, other / "stolen")
    (snapshot / first).unlink()
    (snapshot / first).symlink_to(Path("..", "..", "..", "models--org--other", "blobs", "stolen"))
    with pytest.raises(CheckpointError, match=rf"{first}: links to {other / 'stolen'}, outside {repo}"):
        blip.load(snapshot)
    # one weight file instead of shards: the same rule
    single = tmp_path / "single" / "models--org--single" / "snapshots" / REVISION
    single.mkdir(parents=True)
    shutil.copy(snapshot / "config.json", single / "config.json")
    (single / "model.safetensors").symlink_to(other / "stolen")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: links to .*stolen, outside .*models--org--single"):
        blip.load(single)
    # outside a cache, a model directory's weights are its own files
    plain = tmp_path / "plain"
    shutil.copytree(single, plain, symlinks=True)
    with pytest.raises(CheckpointError, match=rf"links to .*stolen, outside {plain}"):
        blip.load(plain)
