"""The Aligner network and the attention alignment loss (paper §3, §4.3, App. C; eq. 9-10, 12, 17).

The Aligner (§4.3) turns VLM attention maps into one 32x32 map per word that is comparable to the
diffusion model's map: it expands the input channels (attention heads, or one aggregated map) to
a hidden width, applies a few non-linear layers, and squeezes back to one channel, like a
Squeeze-and-Excitation block. Variants, as in the authors' release:

    light: expand                         -> 1x1 squeeze      (one 3x3 layer)
    sim:   expand, expand                 -> 1x1 squeeze      (two 3x3 layers; the default)
    deep:  expand, expand, expand, expand -> 1x1 squeeze      (four 3x3 layers)
    mlp:   the same as `sim` with 1x1 layers, i.e. a per-pixel MLP over channels (no spatial
           context: the paper found convolutions better at local spatial cues, App. F.1)

Each "expand" is conv 3x3 (no bias) -> InstanceNorm (default) or BatchNorm -> ReLU6. The output
is min-max normalised over the 32x32 grid, as the DM maps are.

The loss (eq. 9/17) is the mean, over aligned words, of the per-word MSE between the Aligner
output and the DM map, and eq. 10/12 adds it to the next-token loss with weight λ:

    L_total = L_VLM + λ · L_att

Bayesian reading (§3, App. C): if the per-pixel differences δ = p_VLM(a|x,y) − p_DM(a|x,y) are
Gaussian with equal variance σ², the DM maps act as a prior p(A_DM|θ) ∝ exp(−λ/2 · Σ‖δ‖²) with
λ = 1/σ² (eq. 8); maximising the posterior = minimising L_VLM + λ/2 · Σ‖δ‖², which is eq. 10 up to
the factor 2 absorbed in λ. A large λ says "trust the DM maps" (small σ). Default λ = 10, as in
the authors' release.

    python aligner.py        # prints each variant's parameter count and checks output ranges
"""
import argparse

import torch
import torch.nn as nn

VARIANTS = {"light": 1, "sim": 2, "deep": 4, "mlp": 2}  # name -> number of expand layers
# InstanceNorm (affine, per-sample statistics) is GroupNorm with one channel per group: the same
# function and the same parameters (weight, bias), but GroupNorm's CPU kernel runs forward +
# backward ~3x faster than InstanceNorm2d's (which goes through batch_norm on an (1, N*C, h, w) view)
NORMS = {"instance": lambda c: nn.GroupNorm(c, c), "batch": nn.BatchNorm2d}


def min_max(x, eps=1e-8):
    """Min-max normalise each map over its last two dims: (..., h, w) -> (..., h, w) in [0, 1].

    A constant map becomes all zeros (never NaN): [[2, 2], [2, 2]] -> [[0, 0], [0, 0]].
    """
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo + eps)


class Aligner(nn.Module):
    """§4.3: (N, C, 32, 32) attention maps -> (N, 32, 32) maps in [0, 1]; C = aligner_channels(...)."""

    def __init__(self, variant="sim", in_channels=1, hidden=32, norm="instance"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown Aligner variant {variant!r}; choose one of {sorted(VARIANTS)}")
        if norm not in NORMS:
            raise ValueError(f"unknown Aligner norm {norm!r}; choose one of {sorted(NORMS)}")
        self.variant, self.in_channels = variant, in_channels
        k = 1 if variant == "mlp" else 3  # mlp: 1x1 convs = a per-pixel MLP over channels
        layers, c = [], in_channels
        for _ in range(VARIANTS[variant]):  # expand: conv (no bias) -> norm -> ReLU6
            layers += [nn.Conv2d(c, hidden, k, padding=k // 2, bias=False), NORMS[norm](hidden), nn.ReLU6(inplace=True)]
            c = hidden
        layers.append(nn.Conv2d(c, 1, 1, bias=False))  # squeeze back to one channel
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Aligner expects (N, {self.in_channels}, h, w) maps, got shape {tuple(x.shape)}; "
                             f"in_channels comes from aligner_channels(aggregation, aligner_mode, num_heads)")
        w = self.net[0].weight
        y = self.net(x.to(w.dtype)).squeeze(1)  # (N, 32, 32)
        return min_max(y.float())  # (N, 32, 32) in [0, 1]


def aligner_channels(aggregation, aligner_mode, num_heads):
    """How many input channels the Aligner needs.

    aligner_mode "per-layer": the Aligner sees each layer's heads as channels (as in the authors'
    release), its outputs are then combined over layers -> num_heads.
    aligner_mode "after": the Aligner sees the map already aggregated over heads and layers -> 1.
    `aggregation` is accepted so that a future aggregation with its own channel count can say so;
    all of aggregate.AGGREGATIONS currently give the counts above.
    """
    if aligner_mode == "per-layer":
        return num_heads
    if aligner_mode == "after":
        return 1
    raise ValueError(f"unknown aligner_mode {aligner_mode!r}; choose 'per-layer' or 'after'")


def attention_loss(pred, target, mask):
    """eq. 9/17: mean over aligned words of the per-word MSE between VLM and DM maps.

    pred, target: (B, W, 32, 32); mask: (B, W) bool, True where word w of sample b is aligned.
    Returns a scalar. With no aligned word it is exactly 0 and still attached to pred's graph
    (so every rank under FSDP runs the same backward), never NaN.
    Worked example: pred = 1 everywhere, target = 0 everywhere, one aligned word -> 1.0.
    """
    if pred.shape != target.shape or pred.shape[:2] != mask.shape:
        raise ValueError(f"attention_loss: pred {tuple(pred.shape)}, target {tuple(target.shape)} and "
                         f"mask {tuple(mask.shape)} must be (B, W, h, w), (B, W, h, w) and (B, W)")
    per_word = (pred.float() - target.float()).pow(2).mean(dim=(-2, -1))  # (B, W)
    per_word = per_word * mask  # zero where not aligned (and no NaN: masked, not indexed)
    return per_word.sum() / mask.sum().clamp(min=1)


def total_loss(loss_vlm, loss_att, lam=10.0):
    """eq. 10/12: L_total = L_VLM + λ·L_att, λ = 1/σ² of the Gaussian differences (eq. 8)."""
    return loss_vlm + lam * loss_att


def main():
    parser = argparse.ArgumentParser(description="Print the Aligner variants and check them on random maps.")
    parser.add_argument("--channels", type=int, default=32, help="input channels (attention heads)")
    parser.add_argument("--norm", default="instance", choices=sorted(NORMS), help="normalisation layer")
    args = parser.parse_args()
    x = torch.rand(4, args.channels, 32, 32)  # (N, C, 32, 32)
    for variant in VARIANTS:
        aligner = Aligner(variant, args.channels, norm=args.norm)
        y = aligner(x)  # (N, 32, 32)
        n = sum(p.numel() for p in aligner.parameters())
        print(f"{variant:6s} {n:7d} parameters, output {tuple(y.shape)} in [{y.min():.2f}, {y.max():.2f}]")


if __name__ == "__main__":
    main()
