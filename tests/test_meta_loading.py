"""blip.load of an HF directory builds the model on the meta device and assigns the checkpoint's tensors: no
initialiser (random or constant) and no copy into initialised parameters touches real memory, nothing stays on the
meta device, tied weights stay tied, non-persistent buffers (rotary frequencies) are computed, and the memory used
while loading stays within 1.2x the weights (BLIP and BLIP-2)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (BlipConfig, BlipForConditionalGeneration, Blip2Config, Blip2ForConditionalGeneration,
                          LlamaConfig, OPTConfig)

import blip

ROOT = Path(__file__).resolve().parents[1]
# what nn.init (normal_, trunc_normal_, uniform_, kaiming_*, ones_, zeros_, constant_) and a load by copy into
# initialised parameters dispatch to
INITIALISERS = {"normal_", "uniform_", "bernoulli_", "random_", "exponential_", "randn", "rand", "randint",
                "randperm", "normal", "fill_", "zero_", "copy_", "erfinv_"}


class InitialisersOnRealTensors(TorchDispatchMode):
    """Records every initialiser (random or constant fill, copy into a parameter) writing to a real tensor."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket.__name__ in INITIALISERS:
            first = out if isinstance(out, torch.Tensor) else args[0]
            if not first.is_meta:
                self.seen.append(func._overloadpacket.__name__)
        return out


def tiny_blip_dir(path, width=32, layers=2):
    cfg = BlipConfig(vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                        num_attention_heads=4, image_size=32, patch_size=16),
                     text_config=dict(vocab_size=30524, hidden_size=width, intermediate_size=4 * width,
                                      num_hidden_layers=layers, num_attention_heads=4))
    torch.manual_seed(0)
    hf = BlipForConditionalGeneration(cfg).eval()
    hf.save_pretrained(path)
    return hf


def tiny_blip2_dir(path, text_config, width=32):
    cfg = Blip2Config(vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=28, patch_size=14),
                      qformer_config=dict(vocab_size=99, hidden_size=width, intermediate_size=2 * width,
                                          num_hidden_layers=2, num_attention_heads=4, encoder_hidden_size=width),
                      text_config=text_config.to_dict(), num_query_tokens=4, image_token_index=98)
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(cfg).eval()
    hf.save_pretrained(path)
    return hf


def opt_config(width: int, layers: int, vocab: int = 99) -> OPTConfig:
    return OPTConfig(vocab_size=vocab, hidden_size=width, ffn_dim=4 * width, num_hidden_layers=layers,
                     num_attention_heads=4, word_embed_proj_dim=width, pad_token_id=1, bos_token_id=2, eos_token_id=2)


def no_meta_left(model):
    return not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


def test_blip_hf_dir_loads_without_random_init(tmp_path):
    hf = tiny_blip_dir(tmp_path)
    with InitialisersOnRealTensors() as fills:
        model = blip.load(tmp_path)
    assert fills.seen == [] and no_meta_left(model)
    decoder = model.text_decoder
    assert decoder.lm_head.weight is decoder.transformer.embeddings.word.weight
    ids, px = torch.tensor([[30522, 1037, 3861]]), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(px, ids).logits, hf(pixel_values=px, input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_blip2_hf_dir_keeps_ties_and_computes_rotary_buffers(tmp_path):
    tiny_blip2_dir(tmp_path / "opt", opt_config(32, 2))
    with InitialisersOnRealTensors() as fills:
        model = blip.load(tmp_path / "opt")
    assert fills.seen == [] and no_meta_left(model)
    assert model.llm.lm_head.weight is model.llm.get_input_embeddings().weight  # tied, as HF ties them

    llama = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    hf = tiny_blip2_dir(tmp_path / "llama", llama)
    model = blip.load(tmp_path / "llama")
    ours = {n: b for n, b in model.llm.named_buffers() if n.endswith("inv_freq")}
    ref = {n: b for n, b in hf.language_model.named_buffers() if n.endswith("inv_freq")}
    assert ours and len(ours) == len(ref) and no_meta_left(model)
    for a, b in zip(ours.values(), ref.values()):
        torch.testing.assert_close(a, b)


PEAK_PROBE = """
import os, sys, threading
sys.path.insert(0, sys.argv[3])
import blip

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

blip.load(sys.argv[2])  # a tiny model of the same class first: imports are not part of loading
base, peak, done = rss(), [0], threading.Event()

def sample():
    while not done.wait(0.001):
        peak[0] = max(peak[0], rss() - base)

thread = threading.Thread(target=sample)
thread.start()
model = blip.load(sys.argv[1])
done.set()
thread.join()
print(max(peak[0], rss() - base))
"""


# (warm-up directory, measured directory) of each family; the measured ones hold 50-60 MB of weights
PEAK_CASES = {
    "blip": (lambda path: tiny_blip_dir(path), lambda path: tiny_blip_dir(path, width=256, layers=4)),
    "blip2_opt": (lambda path: tiny_blip2_dir(path, opt_config(32, 2)),
                  lambda path: tiny_blip2_dir(path, opt_config(256, 8, vocab=16000), width=256)),
}


@pytest.mark.parametrize("family", PEAK_CASES)
def test_load_peak_memory_within_1_2x_weights(tmp_path, family):
    warm, measured = PEAK_CASES[family]
    warm(tmp_path / "warm")
    measured(tmp_path / "model")
    weights = (tmp_path / "model" / "model.safetensors").stat().st_size
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(tmp_path / "model"), str(tmp_path / "warm"),
                          str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    peak = int(out.stdout.split()[-1])
    assert peak <= 1.2 * weights, json.dumps({"peak": peak, "weights": weights})


def test_blip_pth_holding_every_tensor_loads_without_random_init(tmp_path):
    torch.manual_seed(0)
    model = blip.create_model("blip_tiny", "caption").eval()
    torch.save(model.state_dict(), tmp_path / "caption.pth")
    with InitialisersOnRealTensors() as fills:
        loaded = blip.load(tmp_path / "caption.pth", arch="blip_tiny")
    assert fills.seen == [] and no_meta_left(loaded)
    assert loaded.text_decoder.lm_head.weight is loaded.text_decoder.transformer.embeddings.word.weight
    for (name, ours), theirs in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_blip_pth_lacking_a_tensor_is_built_for_real_with_the_models_own_init(tmp_path):
    """A pretraining checkpoint without the image-id queue (BLIP's keep none): the queue gets the model's -100s."""
    from blip.objectives.blip_pretrain import BlipPretrain
    from blip.models.blip import ARCHS
    torch.manual_seed(0)
    state = BlipPretrain(ARCHS["blip_tiny"]).state_dict()
    torch.save({k: v for k, v in state.items() if k != "queue.idx_queue"}, tmp_path / "pretrain.pth")
    loaded = blip.load(tmp_path / "pretrain.pth", arch="blip_tiny", task="pretrain")
    assert no_meta_left(loaded) and bool((loaded.state_dict()["queue.idx_queue"] == -100).all())
    for name, tensor in loaded.state_dict().items():
        assert name == "queue.idx_queue" or torch.equal(tensor, state[name]), name
