"""aligner.py: the Aligner variants, the alignment loss and the total loss. CPU, seconds.

    python -m pytest -q tests/test_aligner.py
"""
import pytest
import torch

from aligner import VARIANTS, Aligner, aligner_channels, attention_loss, min_max, total_loss


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_aligner_shapes_and_range(variant, norm):
    torch.manual_seed(0)
    aligner = Aligner(variant, in_channels=4, norm=norm)
    y = aligner(torch.rand(3, 4, 32, 32))
    assert y.shape == (3, 32, 32)
    assert torch.allclose(y.amin(dim=(1, 2)), torch.zeros(3)) and torch.allclose(y.amax(dim=(1, 2)), torch.ones(3), atol=1e-6)
    # 3x3 convolutions without bias, hidden 32, a final 1x1 conv to one channel
    convs = [m for m in aligner.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == VARIANTS[variant] + 1 and all(c.bias is None for c in convs)
    assert convs[0].kernel_size == ((1, 1) if variant == "mlp" else (3, 3)) and convs[0].out_channels == 32
    assert convs[-1].kernel_size == (1, 1) and convs[-1].out_channels == 1
    assert sum(isinstance(m, torch.nn.ReLU6) for m in aligner.modules()) == VARIANTS[variant]


def test_aligner_depths_and_errors():
    sizes = {v: sum(p.numel() for p in Aligner(v, 32).parameters()) for v in VARIANTS}
    assert sizes["light"] < sizes["sim"] < sizes["deep"] and sizes["mlp"] < sizes["sim"]
    with pytest.raises(ValueError, match="in_channels"):
        Aligner("sim", 4)(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="variant"):
        Aligner("huge")
    assert aligner_channels("mean-mean", "per-layer", 32) == 32 and aligner_channels("learn", "after", 32) == 1
    with pytest.raises(ValueError, match="aligner_mode"):
        aligner_channels("mean-mean", "before", 32)


def test_min_max_worked_example():
    assert torch.equal(min_max(torch.tensor([[1.0, 3.0], [2.0, 5.0]])), torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(min_max(torch.full((2, 2), 7.0)), torch.zeros(2, 2))  # constant map: zeros, not NaN


def test_attention_loss_worked_examples():
    pred = torch.rand(2, 3, 32, 32, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(attention_loss(pred, pred.detach().clone(), mask).detach()) == 0.0  # identical maps
    # per-word MSE, mean over aligned words: words with MSE 1, 4 (aligned) and 9 (not aligned) -> 2.5
    target = pred.detach().clone()
    target[0, 0] += 1.0
    target[0, 1] += 2.0
    target[0, 2] += 3.0
    target[1, 0] += 2.0
    assert torch.allclose(attention_loss(pred, target, mask), torch.tensor((1.0 + 4.0 + 4.0) / 3))
    # no aligned word: exactly zero, not NaN, and backward still runs
    loss = attention_loss(pred, target, torch.zeros(2, 3, dtype=torch.bool))
    assert float(loss.detach()) == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    empty = torch.zeros(2, 0, 32, 32, requires_grad=True)
    assert float(attention_loss(empty, empty.detach(), torch.zeros(2, 0, dtype=torch.bool))) == 0.0


def test_total_loss_and_gradient_to_aligner():
    torch.manual_seed(0)
    aligner = Aligner("sim", 2)
    pred = aligner(torch.rand(4, 2, 32, 32)).view(2, 2, 32, 32)
    loss_att = attention_loss(pred, torch.rand(2, 2, 32, 32), torch.ones(2, 2, dtype=torch.bool))
    loss = total_loss(torch.tensor(2.0), loss_att)  # default λ = 10 (eq. 10/12)
    assert torch.allclose(loss, 2.0 + 10 * loss_att)
    assert float(total_loss(torch.tensor(2.0), torch.tensor(0.5), lam=1.0)) == 2.5
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aligner.parameters())


def test_instance_norm_and_in_place_relu6_match_the_plain_layers():
    """The "instance" norm is GroupNorm(C, C) (faster on CPU) and ReLU6 runs in place (saves two
    activations): the same outputs and gradients as InstanceNorm2d(affine) + out-of-place ReLU6."""
    torch.manual_seed(0)
    aligner = Aligner("deep", in_channels=4)
    with torch.no_grad():
        for m in aligner.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 2.0), m.bias.uniform_(-1.0, 1.0)
    plain = []
    for m in aligner.net:  # the same weights in the textbook layers
        if isinstance(m, torch.nn.GroupNorm):
            norm = torch.nn.InstanceNorm2d(m.num_channels, affine=True)
            norm.load_state_dict(m.state_dict())
            plain.append(norm)
        else:
            plain.append(torch.nn.ReLU6() if isinstance(m, torch.nn.ReLU6) else m)
    plain = torch.nn.Sequential(*plain)
    x = (3 * torch.randn(5, 4, 32, 32)).requires_grad_(True)  # large enough to hit both ReLU6 bounds
    w = torch.rand(5, 32, 32)
    ours = aligner(x)
    ref = min_max(plain(x).squeeze(1))
    assert torch.allclose(ours, ref, atol=1e-5)
    g_ours = torch.autograd.grad((ours * w).sum(), [x, *aligner.parameters()])
    g_ref = torch.autograd.grad((ref * w).sum(), [x, *plain.parameters()])  # same order
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max())
