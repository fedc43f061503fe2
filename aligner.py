"""The Aligner network and the attention alignment loss (paper §3, §4.3, App. C; eq. 9-10, 12, 17).

The Aligner (§4.3) turns VLM attention maps into one 32x32 map per word that is comparable to the
diffusion model's map. Like a Squeeze-and-Excitation block it expands the input channels (the
attention heads, or one aggregated map) to a hidden width, applies a few non-linear layers,
squeezes back to the input width and projects to one channel. The layers are those of the
authors' release (`DiffagFovProjection`, hidden width 32):

    expand block:  conv 3x3 (no bias) -> InstanceNorm (no affine) -> ReLU6
    light:  expand(C -> 32)                                  -> squeeze -> out
    sim:    expand(C -> 32), expand(32 -> 32)                -> squeeze -> out   (the default)
    deep:   sim, then two more expands WITHOUT norm          -> squeeze -> out
    squeeze: conv 3x3 (32 -> C, no bias) -> InstanceNorm (no affine) -> ReLU6
    out:     conv 1x1 (C -> 1, with bias)
    mlp:    our addition, not in the release: `sim` with 1x1 convolutions, i.e. a per-pixel MLP
            over channels (no spatial context; the paper found convolutions better, App. F.1)

With C = 32 heads: 18,465 / 27,681 / 46,113 trainable parameters (light / sim / deep), as in the
release. The output is the raw 1-channel map: aggregate.py combines layers and words first and
then min-max normalises over the 32x32 grid, as the DM maps are normalised (the release's order).

The loss (eq. 9/17) is the mean, over aligned words, of the per-word MSE between the Aligner
output and the DM map (pooled over the micro-batch's words as the release does, or per sample:
attention_loss), and eq. 10/12 adds it to the next-token loss with weight λ:

    L_total = L_VLM + λ · L_att

Bayesian reading (§3, App. C): if the per-pixel differences δ = p_VLM(a|x,y) − p_DM(a|x,y) are
Gaussian with equal variance σ², the DM maps act as a prior p(A_DM|θ) ∝ exp(−λ/2 · Σ‖δ‖²) with
λ = 1/σ² (eq. 8); maximising the posterior = minimising L_VLM + λ/2 · Σ‖δ‖², which is eq. 10 up to
the factor 2 absorbed in λ. A large λ says "trust the DM maps" (small σ). Default λ = 10, as in
the authors' release.

The maps' common ground lives here too: MAP_SIZE, the one min_max of DM and VLM maps, and
area_matrix, the area resampling every model family uses to put its image tokens on the 32x32 grid.

    python aligner.py        # prints each variant's layers' parameter counts and output ranges,
                             # and how far the two attention-loss poolings lie apart
"""
import argparse
import functools

import torch
import torch.nn as nn

# the side of every attention map compared by the loss (DM and VLM)
MAP_SIZE = 32
VARIANTS = {"light": 1, "sim": 2, "deep": 4, "mlp": 2}  # name -> number of expand blocks
# deep: the release normalises only its first two expand blocks
NORMED_EXPANDS = 2
# InstanceNorm2d without affine parameters (the release's default) is GroupNorm with one channel
# per group and no affine: the same function, but GroupNorm's CPU kernel runs forward + backward
# ~3x faster than InstanceNorm2d's (which goes through batch_norm on an (1, N*C, h, w) view).
# "group" and "batch" are the release's other options, with their affine parameters.
NORMS = {"instance": lambda c: nn.GroupNorm(c, c, affine=False),
         "group": lambda c: nn.GroupNorm(c, c),
         "batch": nn.BatchNorm2d}
ACTIVATIONS = {"relu6": lambda: nn.ReLU6(inplace=True),
               "leakyrelu": lambda: nn.LeakyReLU(0.1, inplace=True)}


@functools.lru_cache(maxsize=64)
def area_matrix(n_out, extent, n_patches, patch, device="cpu", dtype=torch.float32):
    """(§4.4 (1), (3)) (n_out, n_patches) weights: output cell i covers [i, i+1)·extent/n_out px
    of the canvas, patch p covers [p, p+1)·patch px; weight = overlap / cell length (rows sum
    to 1). Cropping the padding and resizing happen in this one linear map (area resampling).
    Cached: a training run meets a handful of image geometries, and a step would otherwise
    rebuild the same matrices for every layer and every recompute (~600 small ops a step at the
    benchmark's geometry, and on a GPU as many host-to-device copies), so it is kept per device
    and dtype."""
    cell = torch.arange(n_out + 1, dtype=torch.float64) * (extent / n_out)  # cell edges
    edge = torch.arange(n_patches + 1, dtype=torch.float64) * patch  # patch edges
    lo = torch.maximum(cell[:-1, None], edge[None, :-1])
    hi = torch.minimum(cell[1:, None], edge[None, 1:])
    overlap = (hi - lo).clamp(min=0)  # (n_out, n_patches) px
    return (overlap / (extent / n_out)).to(device, dtype)  # (n_out, n_patches)


def min_max(x, eps=1e-8):
    """Min-max normalise each map over its last two dims: (..., h, w) -> (..., h, w) in [0, 1].

    The one normalisation of DM maps (extract.py) and VLM maps (aggregate.py). A constant map
    becomes all zeros (never NaN): [[2, 2], [2, 2]] -> [[0, 0], [0, 0]];
    [[1, 3], [2, 5]] -> [[0, 0.5], [0.25, 1]].
    """
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo + eps)


class Aligner(nn.Module):
    """§4.3: (N, C, 32, 32) attention maps -> (N, 32, 32) raw maps; C = aligner_channels(...)."""

    def __init__(self, variant="sim", in_channels=1, hidden=32, norm="instance", act="relu6"):
        super().__init__()
        options = (("variant", variant, VARIANTS), ("norm", norm, NORMS),
                   ("act", act, ACTIVATIONS))
        for name, value, allowed in options:
            if value not in allowed:
                raise ValueError(f"unknown Aligner {name} {value!r}; "
                                 f"choose one of {sorted(allowed)}")
        self.variant, self.in_channels = variant, in_channels
        # mlp: 1x1 convs = a per-pixel MLP over channels
        k = 1 if variant == "mlp" else 3
        layers, c = [], in_channels
        # expand: conv (no bias) -> norm -> activation
        for i in range(VARIANTS[variant]):
            norms = [NORMS[norm](hidden)] if i < NORMED_EXPANDS else []
            layers += [nn.Conv2d(c, hidden, k, padding=k // 2, bias=False),
                       *norms, ACTIVATIONS[act]()]
            c = hidden
        # squeeze back to the input width, then one output channel (the only bias)
        layers += [nn.Conv2d(c, in_channels, k, padding=k // 2, bias=False),
                   NORMS[norm](in_channels), ACTIVATIONS[act](), nn.Conv2d(in_channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Aligner expects (N, {self.in_channels}, h, w) maps, got shape "
                             f"{tuple(x.shape)}; in_channels comes from "
                             f"aligner_channels(aggregation, num_heads)")
        w = self.net[0].weight
        y = self.net(x.to(w.dtype))  # (N, 1, 32, 32)
        # raw: the caller normalises it
        return y.squeeze(1).float()  # (N, 32, 32)


def aligner_channels(aggregation, num_heads):
    """How many input channels the Aligner takes for an aggregation (aggregate.AGGREGATIONS).

    "max-*" reduces the heads by a max before the Aligner -> 1 channel (the release's max-max);
    every other aggregation gives the heads to the Aligner as its channels -> num_heads, so its
    first convolution learns the combination of heads that a mean would fix at 1/H each (the
    release's per-layer, layer-mean and flow Aligners). aligner_channels("max-max", 32) -> 1,
    aligner_channels("mean-mean", 32) -> 32.
    """
    return 1 if aggregation.startswith("max") else num_heads


# --att-pooling: how attention_loss weights the aligned words
POOLINGS = ("words", "samples")


def attention_loss(pred, target, mask, pooling="words"):
    """eq. 9/17: the per-word MSE between VLM and DM maps, pooled over the aligned words.

    pred, target: (B, W, 32, 32); mask: (B, W) bool, True where word w of sample b is aligned.
    pooling "words" (the release's): the sum of every aligned word's MSE in the micro-batch divided
    by their number, so a sample weighs as many words as it aligns. The release computes this in
    its patched `MllamaForConditionalGeneration.forward` (llama_finetune/src/llama_recipes/mllama/
    modeling_mllama.py, `(total_loss_mse + 1e-8) / (len_loss_mse + 1e-8)`) on each GPU's
    micro-batch; data parallelism then averages the ranks. The 1e-8s change a loss with k >= 1
    words by less than 1e-8 / k; with none the release's value is 1 (gradient 0), ours 0.
    pooling "samples": each sample's mean over its words, then the mean over samples (every sample
    weighs the same; a sample with no aligned word counts as 0).
    With no aligned word at all the result is exactly 0 and still attached to pred's graph (so
    every rank under FSDP runs the same backward), never NaN.
    Worked example: sample 0 aligns words with MSE 1 and 4, sample 1 one word with MSE 4 ->
    words: (1 + 4 + 4) / 3 = 3; samples: ((1 + 4) / 2 + 4) / 2 = 3.25. At batch 1 the two agree.
    """
    if pred.shape != target.shape or pred.shape[:2] != mask.shape:
        raise ValueError(f"attention_loss: pred {tuple(pred.shape)}, target "
                         f"{tuple(target.shape)} and mask {tuple(mask.shape)} must be "
                         f"(B, W, h, w), (B, W, h, w) and (B, W)")
    if pooling not in POOLINGS:
        raise ValueError(f"attention_loss: unknown pooling {pooling!r}; choose one of {POOLINGS}")
    per_word = (pred.float() - target.float()).pow(2).mean(dim=(-2, -1))  # (B, W)
    # zero where not aligned (and no NaN: masked, not indexed)
    per_word = per_word * mask
    if pooling == "words":  # one mean over the micro-batch's aligned words
        return per_word.sum() / mask.sum().clamp(min=1)
    # per sample, then over samples
    per_sample = per_word.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B,)
    return per_sample.mean()


def pooling_difference(batch=4, max_words=6, trials=1000, lam=10.0, seed=0):
    """How far the two poolings lie apart on random maps: `trials` micro-batches of `batch`
    samples, each aligning 1..max_words words (uniform), pred and target min-max normalised
    uniform noise. L_VLM is the same under both, so L_VLM + λ·L_att differs by λ·|ΔL_att|.
    Returns the mean and largest |Δ(L_VLM + λ·L_att)|, the largest |Δ| of the gradient with
    respect to the VLM maps and the mean relative gradient difference
    ‖g_words − g_samples‖ / ‖g_samples‖ (eq. 9/17's two poolings)."""
    g = torch.Generator().manual_seed(seed)
    dloss, dgrad, rel = [], [], []
    for _ in range(trials):
        n = torch.randint(1, max_words + 1, (batch,), generator=g)  # aligned words per sample
        mask = torch.arange(max_words)[None, :] < n[:, None]  # (B, W)
        shape = (batch, max_words, MAP_SIZE, MAP_SIZE)
        target = min_max(torch.rand(shape, generator=g))
        pred = min_max(torch.rand(shape, generator=g))
        pred.requires_grad_()
        losses, grads = [], []
        for pooling in POOLINGS:
            loss = lam * attention_loss(pred, target, mask, pooling)
            losses.append(loss.item())
            grads.append(torch.autograd.grad(loss, pred)[0])
        diff = grads[0] - grads[1]
        dloss.append(abs(losses[0] - losses[1]))
        dgrad.append(diff.abs().max().item())
        rel.append((diff.norm() / grads[1].norm()).item())
    return dict(mean_dloss=sum(dloss) / trials, max_dloss=max(dloss), max_dgrad=max(dgrad),
                mean_rel_dgrad=sum(rel) / trials)


def total_loss(loss_vlm, loss_att, lam=10.0):
    """eq. 10/12: L_total = L_VLM + λ·L_att, λ = 1/σ² of the Gaussian differences (eq. 8)."""
    return loss_vlm + lam * loss_att


def main():
    parser = argparse.ArgumentParser(
        description="Print the Aligner variants and check them on random maps.")
    parser.add_argument("--channels", type=int, default=32,
                        help="input channels (attention heads)")
    parser.add_argument("--norm", default="instance", choices=sorted(NORMS),
                        help="normalisation layer")
    args = parser.parse_args()
    x = torch.rand(4, args.channels, MAP_SIZE, MAP_SIZE)  # (N, C, 32, 32)
    for variant in VARIANTS:
        aligner = Aligner(variant, args.channels, norm=args.norm)
        y = min_max(aligner(x))  # (N, 32, 32)
        n = sum(p.numel() for p in aligner.parameters())
        layers = " -> ".join(type(m).__name__ for m in aligner.net)
        print(f"{variant:6s} {n:7d} parameters, output {tuple(y.shape)} "
              f"in [{y.min():.2f}, {y.max():.2f}]: {layers}")
    d = pooling_difference()
    print(f"pooling words vs samples (batch 4, 1-6 words, 1000 random micro-batches, λ = 10): "
          f"|Δ(L_VLM + λ·L_att)| mean {d['mean_dloss']:.2e}, max {d['max_dloss']:.2e}; "
          f"gradient wrt the VLM maps: max |Δ| {d['max_dgrad']:.2e}, "
          f"mean relative difference {d['mean_rel_dgrad']:.3f}")


if __name__ == "__main__":
    main()
