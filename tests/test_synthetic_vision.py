"""The embedded BLIP-2 default's frozen image encoder: trained once on the synthetic shapes, cached, and it names
what it sees (held-out renders it never trained on)."""

import torch

from blip.convert.unimodal import init_vision
from blip import create_model as create
from blip.models.blip2 import TINY_VISION
from blip.train.synthetic_vision import CLASSES, _rendered, ensure_synthetic_vision_encoder, train_attribute_encoder


def test_encoder_learns_the_attributes(one_thread):
    vit, head = train_attribute_encoder(TINY_VISION, steps=120, batch_size=64, num_images=512, render_size=64, seed=0)
    images, labels = _rendered(200, 64, 56, seed=99)   # other scenes than the training renders
    with torch.no_grad():
        logits = head(vit(images)[:, 0]).split([len(c) for c in CLASSES], dim=-1)
    accuracy = [(lg.argmax(-1) == labels[:, i]).float().mean().item() for i, lg in enumerate(logits)]
    assert accuracy[1] > 0.6 and accuracy[0] > 0.75, accuracy   # colour (chance 1/6) and size (chance 1/2)


def test_encoder_is_cached_and_loads_as_vision_init(tmp_path, one_thread):
    first = ensure_synthetic_vision_encoder(TINY_VISION, tmp_path, steps=3, num_images=16)
    stamp = first.stat().st_mtime_ns
    again = ensure_synthetic_vision_encoder(TINY_VISION, tmp_path, steps=3, num_images=16)
    assert again == first and again.stat().st_mtime_ns == stamp and not list(tmp_path.glob("*.tmp"))
    model = create("blip2_tiny_qformer", "qformer")
    report = init_vision(model, first)
    assert len(report.loaded) == len(model.image_encoder.visual_encoder.state_dict()) and not report.unused


def test_encoder_weights_do_not_depend_on_the_callers_thread_count(tmp_path):
    from safetensors.torch import load_file

    before = torch.get_num_threads()
    files = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            files.append(ensure_synthetic_vision_encoder(TINY_VISION, tmp_path / str(threads), steps=20,
                                                         batch_size=32, num_images=64))
            assert torch.get_num_threads() == threads   # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    one, two = (load_file(f) for f in files)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
