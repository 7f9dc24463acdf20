"""The LM loss with the head applied to target positions only equals the head over every position followed by
``F.cross_entropy`` (values and gradients), alone and inside the training objectives."""
import pytest
import torch
import torch.nn.functional as F

from blip import create_model as create
from blip.data.tokenizer import DEC_TOKEN_ID, PAD_TOKEN_ID, with_first_token
from blip.losses import lm_loss_from_hidden
from blip.nn.transformer import LMHead, TextConfig
from blip.objectives.blip_pretrain import BlipPretrain
from blip.models.blip import ARCHS

TEXTS = ["a dog on the grass", "a red car", "two cats sleeping on a sofa", "a bowl of soup"]


def reference(logits, labels, label_smoothing, reduction):
    """Full [B, T, V] logits, shifted, through plain cross-entropy with ignore_index."""
    b, t, v = logits.shape
    flat = F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100,
                           label_smoothing=label_smoothing, reduction="mean" if reduction == "mean" else "none")
    if reduction == "mean":
        return flat
    per_token = flat.view(b, t - 1)
    return per_token.sum(1) if reduction == "sum_per_sequence" else per_token


def assert_close_to_scale(got, want, rel=1e-6):
    """float32 agreement relative to the tensor's scale (parameter gradients are sums over positions, summed in
    another order on the two paths)."""
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= rel * scale, (err, scale)


def random_case(seed=0, b=5, t=9, d=16, v=97):
    g = torch.Generator().manual_seed(seed)
    cfg = TextConfig(vocab_size=v, hidden_size=d, num_layers=1, num_heads=2, intermediate_size=32)
    word = torch.nn.Embedding(v, d)
    torch.manual_seed(seed)
    head = LMHead(cfg, word)
    with torch.no_grad():
        head.bias.normal_(generator=g)
        head.dense.weight.normal_(std=0.5, generator=g)
    hidden = torch.randn(b, t, d, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :3] = -100                          # prompt
    lengths = torch.tensor([t, t - 1, 5, 4, 6])   # padding after each row's length
    labels[torch.arange(t)[None, :] >= lengths[:, None]] = -100
    return hidden, head, word, labels


@pytest.mark.parametrize("reduction", ["mean", "sum_per_sequence", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_values_and_gradients_equal_full_logits(reduction, label_smoothing):
    hidden, head, word, labels = random_case()
    params = [hidden, word.weight, head.bias, head.dense.weight, head.norm.weight]
    hidden.requires_grad_(True)

    def run(fn):
        out = fn()
        weights = torch.linspace(0.5, 1.5, out.numel()).view_as(out)   # distinct per-element upstream gradients
        grads = torch.autograd.grad((out * weights).sum(), params)
        return out.detach(), grads

    got, got_grads = run(lambda: lm_loss_from_hidden(hidden, head, labels, label_smoothing, reduction))
    want, want_grads = run(lambda: reference(head(hidden), labels, label_smoothing, reduction))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for g, w in zip(got_grads, want_grads):
        assert_close_to_scale(g, w)
    assert hidden.grad is None and got_grads[0][:, :2].abs().sum() == 0   # prompt positions get no gradient


def test_rejects_unknown_reduction():
    hidden, head, _, labels = random_case()
    with pytest.raises(ValueError, match="reduction"):
        lm_loss_from_hidden(hidden, head, labels, reduction="sum")


def test_blip2_stage1_lm_term_and_gradients(one_thread):
    torch.manual_seed(0)
    objective = create("blip2_tiny_qformer", "stage1").train()
    m = objective.model
    pix = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    got = objective({"pixel_values": pix, "text": TEXTS})["loss_lm"]
    trainable = [p for p in m.qformer.parameters() if p.requires_grad]
    got_grads = torch.autograd.grad(got, trainable, allow_unused=True)

    ids, mask = objective.tokenize(TEXTS)
    dec_ids = with_first_token(ids, DEC_TOKEN_ID)
    labels = dec_ids.masked_fill(dec_ids == PAD_TOKEN_ID, -100)
    assert (labels == -100).any()   # padded to max_length: the padding really is skipped
    logits = m.lm_logits(m.image_features(pix), dec_ids, mask)   # its own query pass, head on every position
    want = reference(logits, labels, objective.label_smoothing, "mean")
    want_grads = torch.autograd.grad(want, trainable, allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)
        if g is not None:
            assert_close_to_scale(g, w)


def test_blip_pretrain_lm_term(one_thread):
    torch.manual_seed(0)
    m = BlipPretrain(ARCHS["blip_tiny"].with_overrides(image_size=32), queue_size=8)
    pix = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = m({"pixel_values": pix, "text": TEXTS, "image_ids": torch.arange(4)})["loss_lm"]
        ids, mask = m.tokenize(TEXTS)
        dec_ids = with_first_token(ids, DEC_TOKEN_ID)
        logits = m.text_decoder(dec_ids, mask, encoder_hidden_states=m.visual_encoder(pix))
        want = reference(logits, dec_ids.masked_fill(dec_ids == PAD_TOKEN_ID, -100), m.label_smoothing, "mean")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
