"""aligner.py: the Aligner variants, the alignment loss and the total loss. CPU, seconds.

    python -m pytest -q tests/test_aligner.py
"""
import pytest
import torch
import torch.nn as nn

from aligner import (NORMS, POOLINGS, VARIANTS, Aligner, aligner_channels, attention_loss, min_max,
                     pooling_difference, total_loss)

# The release's DiffagFovProjection (diffag/diffag_xattn_manager.py) with 32 heads in and hidden
# 32, layer by layer, as aligner.py's docstring lists it:
# "E" = conv 3x3 no bias, "N" = InstanceNorm2d without affine, "A" = ReLU6, "S" = the squeeze conv
# 3x3 back to the input width, "O" = the 1x1 output conv with bias.
RELEASE = {"light": "ENA" + "SNA" + "O", "sim": "ENA" + "ENA" + "SNA" + "O",
           "deep": "ENA" + "ENA" + "EA" + "EA" + "SNA" + "O"}
RELEASE_PARAMETERS = {"light": 18_465, "sim": 27_681, "deep": 46_113}


def release_aligner(variant, channels, hidden=32):
    """The release's layer order written out with the textbook modules (InstanceNorm2d, out-of-place
    ReLU6): an independent statement of the structure to compare ours with."""
    layers, c = [], channels
    for code in RELEASE[variant]:
        if code in "ES":
            out = hidden if code == "E" else channels
            layers.append(nn.Conv2d(c, out, 3, padding=1, bias=False))
            c = out
        elif code == "N":
            layers.append(nn.InstanceNorm2d(c))
        elif code == "A":
            layers.append(nn.ReLU6())
        else:
            layers.append(nn.Conv2d(c, 1, 1))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("variant", sorted(RELEASE))
def test_layer_order_and_parameter_counts_are_the_releases(variant):
    ours = Aligner(variant, in_channels=3)
    convs = [i for i, m in enumerate(ours.net) if isinstance(m, nn.Conv2d)]
    kinds = ["O" if i == convs[-1] else "S" if i == convs[-2] else "E" if i in convs
             else "N" if isinstance(m, nn.GroupNorm) else "A" for i, m in enumerate(ours.net)]
    assert "".join(kinds) == RELEASE[variant]
    # 3 channels in, hidden 32
    widths = [(ours.net[i].in_channels, ours.net[i].out_channels) for i in convs]
    assert widths == [(3, 32)] + [(32, 32)] * (VARIANTS[variant] - 1) + [(32, 3), (3, 1)]
    ours = Aligner(variant, in_channels=32)
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert trainable == RELEASE_PARAMETERS[variant]
    release = sum(p.numel() for p in release_aligner(variant, 32).parameters())
    assert release == RELEASE_PARAMETERS[variant]
    convs = [m for m in ours.modules() if isinstance(m, nn.Conv2d)]
    out = convs[-1]
    assert (all(c.bias is None for c in convs[:-1]) and out.bias is not None
            and out.kernel_size == (1, 1))
    norms = [m for m in ours.modules() if isinstance(m, nn.GroupNorm)]
    assert all(not m.affine for m in norms)  # InstanceNorm: no affine


@pytest.mark.parametrize("variant", sorted(RELEASE))
def test_same_weights_give_the_releases_map_and_gradients(variant):
    """With the release's conv weights, our Aligner (GroupNorm without affine, in-place ReLU6) gives
    the same min-max-normalised map and the same gradients as the textbook layers."""
    torch.manual_seed(0)
    channels = 4
    ours, ref = Aligner(variant, in_channels=channels), release_aligner(variant, channels)
    ref_convs = [m for m in ref if isinstance(m, nn.Conv2d)]
    our_convs = [m for m in ours.net if isinstance(m, nn.Conv2d)]
    for a, b in zip(our_convs, ref_convs, strict=True):
        b.load_state_dict(a.state_dict())
    # large enough to hit both ReLU6 bounds
    x = (3 * torch.randn(5, channels, 32, 32)).requires_grad_(True)
    w = torch.rand(5, 32, 32)
    mine, theirs = min_max(ours(x)), min_max(ref(x).squeeze(1))
    assert (mine - theirs).abs().max() < 1e-4
    # the same parameter order; the output bias cancels in min-max normalisation (gradient ~0 in
    # both)
    g_ours = torch.autograd.grad((mine * w).sum(), [x, *ours.parameters()])[:-1]
    g_ref = torch.autograd.grad((theirs * w).sum(), [x, *ref.parameters()])[:-1]
    for a, b in zip(g_ours, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * b.abs().max())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_every_variant_and_norm_gives_one_raw_map(variant, norm):
    torch.manual_seed(0)
    aligner = Aligner(variant, in_channels=4, norm=norm)
    # raw: the caller normalises after combining layers and words
    y = aligner(torch.rand(3, 4, 32, 32))
    assert y.shape == (3, 32, 32) and y.dtype == torch.float32
    y = min_max(y)
    lo, hi = y.amin(dim=(1, 2)), y.amax(dim=(1, 2))
    assert torch.allclose(lo, torch.zeros(3)) and torch.allclose(hi, torch.ones(3), atol=1e-6)
    kernel = (1, 1) if variant == "mlp" else (3, 3)
    assert all(m.kernel_size == kernel for m in aligner.net[:-1] if isinstance(m, nn.Conv2d))


def test_errors_and_channels():
    with pytest.raises(ValueError, match="in_channels"):
        Aligner("sim", 4)(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="variant"):
        Aligner("huge")
    with pytest.raises(ValueError, match="act"):
        Aligner("sim", act="gelu")
    # a max over heads leaves one channel (max-max, max-mean); every other aggregation gives the
    # heads
    assert aligner_channels("max-max", 32) == aligner_channels("max-mean", 32) == 1
    others = ("mean-mean", "mean-max", "flow-sum", "flow-multi", "learn")
    assert {aligner_channels(a, 32) for a in others} == {32}


def test_min_max_worked_example():
    x = torch.tensor([[1.0, 3.0], [2.0, 5.0]])
    assert torch.equal(min_max(x), torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    # constant map: zeros, not NaN
    assert torch.equal(min_max(torch.full((2, 2), 7.0)), torch.zeros(2, 2))


def test_attention_loss_worked_examples():
    pred = torch.rand(2, 3, 32, 32, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    same = pred.detach().clone()
    assert float(attention_loss(pred, same, mask).detach()) == 0.0  # identical maps
    # per-word MSE; sample 0 aligns words with MSE 1 and 4 (and not the 9), sample 1 one word with
    # MSE 4: per-sample means 2.5 and 4, their mean over the 2 samples 3.25; over the 3 words 9 / 3
    target = pred.detach().clone()
    target[0, 0] += 1.0
    target[0, 1] += 2.0
    target[0, 2] += 3.0
    target[1, 0] += 2.0
    assert torch.allclose(attention_loss(pred, target, mask, "samples"), torch.tensor(3.25))
    assert torch.allclose(attention_loss(pred, target, mask), torch.tensor(3.0))  # default: "words"
    # a sample with no aligned word counts as 0 in the mean over samples: (2.5 + 0) / 2; over
    # words it is absent: (1 + 4) / 2
    one_sample = torch.tensor([[True, True, False], [False] * 3])
    assert torch.allclose(attention_loss(pred, target, one_sample, "samples"), torch.tensor(1.25))
    assert torch.allclose(attention_loss(pred, target, one_sample, "words"), torch.tensor(2.5))
    # no aligned word at all: exactly 0, not NaN, and backward still runs
    for pooling in POOLINGS:
        pred.grad = None
        loss = attention_loss(pred, target, torch.zeros(2, 3, dtype=torch.bool), pooling)
        assert float(loss.detach()) == 0.0 and not torch.isnan(loss)
        loss.backward()
        assert torch.equal(pred.grad, torch.zeros_like(pred))
        empty = torch.zeros(2, 0, 32, 32, requires_grad=True)
        none = torch.zeros(2, 0, dtype=torch.bool)
        assert float(attention_loss(empty, empty.detach(), none, pooling).detach()) == 0.0
    with pytest.raises(ValueError, match="pooling 'tokens'"):
        attention_loss(pred, target, mask, "tokens")


def test_attention_loss_pooling_three_words_and_two():
    """Sample 0 aligns 3 words, sample 1 aligns 2 (the 6th slot is padding). pred is constant v per
    word and target 0, so a word's MSE is v^2 and its gradient 2v / 1024 per pixel x its weight.
    v = 1, 2, 3 | 2, 4 -> MSE 1, 4, 9 | 4, 16.
    words:   (1 + 4 + 9 + 4 + 16) / 5 = 34 / 5 = 6.8; every word weighs 1/5.
    samples: ((1 + 4 + 9) / 3 + (4 + 16) / 2) / 2 = (14/3 + 10) / 2 = 22/3; sample 0's words weigh
             1/6 each, sample 1's 1/4.
    L_VLM + 10 L_att (L_VLM = 2): 70 and 2 + 220/3 = 75.33..."""
    v = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 7.0]])
    pred = v[:, :, None, None].expand(2, 3, 32, 32).clone().requires_grad_()
    target = torch.zeros(2, 3, 32, 32)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    weights = {"words": torch.full((2, 3), 1 / 5),
               "samples": torch.tensor([[1 / 6] * 3, [1 / 4] * 3])}
    for pooling, value in (("words", 34 / 5), ("samples", 22 / 3)):
        pred.grad = None
        loss = attention_loss(pred, target, mask, pooling)
        assert torch.allclose(loss, torch.tensor(value))
        assert torch.allclose(total_loss(torch.tensor(2.0), loss), torch.tensor(2 + 10 * value))
        loss.backward()
        expected = (2 * v / 1024 * weights[pooling] * mask)[:, :, None, None].expand(2, 3, 32, 32)
        assert torch.allclose(pred.grad, expected)


def test_attention_loss_words_is_the_releases_loop_and_equals_samples_at_batch_1():
    """"words" = the release's loop (nn.MSELoss per aligned word, summed, over the count, with its
    1e-8s); at batch 1 both poolings are the mean over the one sample's words."""
    torch.manual_seed(0)
    pred, target = torch.rand(4, 5, 32, 32), torch.rand(4, 5, 32, 32)
    mask = torch.rand(4, 5) < 0.6
    total, count = 0.0, 0
    for b, w in mask.nonzero().tolist():
        total, count = total + nn.MSELoss()(target[b, w], pred[b, w]), count + 1
    assert torch.allclose(attention_loss(pred, target, mask), (total + 1e-8) / (count + 1e-8))
    for b in range(4):
        one = (pred[b:b + 1], target[b:b + 1], mask[b:b + 1])
        assert torch.allclose(attention_loss(*one, "words"), attention_loss(*one, "samples"))
    assert max(pooling_difference(batch=1, trials=5).values()) < 1e-6
    assert pooling_difference(batch=4, trials=5)["max_dloss"] > 0  # they differ once samples differ


def test_total_loss_and_gradient_to_aligner():
    torch.manual_seed(0)
    aligner = Aligner("sim", 2)
    pred = min_max(aligner(torch.rand(4, 2, 32, 32))).view(2, 2, 32, 32)
    loss_att = attention_loss(pred, torch.rand(2, 2, 32, 32), torch.ones(2, 2, dtype=torch.bool))
    loss = total_loss(torch.tensor(2.0), loss_att)  # default λ = 10 (eq. 10/12)
    assert torch.allclose(loss, 2.0 + 10 * loss_att)
    assert float(total_loss(torch.tensor(2.0), torch.tensor(0.5), lam=1.0)) == 2.5
    loss.backward()
    # the output conv's bias cancels in min-max normalisation: every other parameter gets a gradient
    bias = aligner.net[-1].bias
    others = [p for p in aligner.parameters() if p is not bias]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in others)
