"""aggregate.vlm_word_maps against §4.2 in its textbook order, on hand-made probabilities over two
Mllama tile layouts: maps and gradients, every aggregation and Aligner placement. CPU, no model,
no download.

    python -m pytest -q tests/test_word_maps.py
"""
import pytest
import torch

import aggregate as ag
from aligner import Aligner, aligner_channels

GEOMETRY = (56, 14, 4, [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)])


def _textbook(probs, plan, batch, aggregation, aligner, placement):
    """§4.2 in its textbook order, with no shortcut: every captured row's and head's tiles rebuilt;
    per token the heads and layers aggregated (aggregate()) or the Aligner at its placement; each
    token's map min-max normalised; a word's token maps averaged (flow: weighted); normalised."""
    maps = ag.image_maps(probs, batch, GEOMETRY).permute(0, 3, 1, 2, 4, 5)  # (B, R, L, H, 32, 32)
    B, R, L, H = maps.shape[:4]
    heads, layers = ag.rules(aggregation)
    if aligner is None:
        tokens = ag.aggregate(maps, aggregation)  # (B, R, 32, 32)
    elif placement == "per-layer":
        # each layer's heads as channels, the raw outputs combined over layers
        y = aligner(maps.reshape(B * R * L, H, 32, 32)).view(B, R, L, 32, 32)
        tokens = y.amax(dim=2) if layers == "max" else y.mean(dim=2)
    else:
        x = maps.amax(dim=3, keepdim=True) if heads == "max" else maps  # (B, R, L, C, 32, 32)
        if layers.startswith("flow"):
            x = ag.flow(x.transpose(2, 3), multiply=layers == "flow-multi")  # (B, R, C, 32, 32)
        else:
            x = x.amax(dim=2) if layers == "max" else x.mean(dim=2)
        tokens = aligner(x.reshape(B * R, x.shape[2], 32, 32)).view(B, R, 32, 32)
    weights = None
    if layers.startswith("flow"):
        weights = ag.flow_weights(plan["rows"], batch["attention_mask"])
    n_words = plan["dm_index"].shape[1]
    words = ag.merge_rows(ag.min_max(tokens), plan["row_word"], n_words, weights)
    return ag.min_max(words)


def _capture(probs, aggregation):
    """A stand-in for a capture: its probs, its learned flag, no model."""
    return type("Capture", (), dict(probs=probs, learned=aggregation == "learn", model=None))()


# a padding row; rows of no word
PLAN = dict(rows=torch.tensor([[3, 4, 5, 6, 7, 8, -1], [2, 3, 4, 5, 6, 7, 8]]),
            row_word=torch.tensor([[0, 0, 1, -1, 2, 1, -1], [0, 1, 1, 0, 2, 2, -1]]),
            dm_index=torch.tensor([[0, 1, 2]] * 2))
BATCH = dict(aspect_ratio_ids=torch.tensor([[6], [2]]),
             image_sizes=torch.tensor([[100, 90], [40, 100]]),
             attention_mask=torch.ones(2, 12, dtype=torch.long))


@pytest.mark.parametrize("mode", ["none", "per-layer", "after", "auto"])
def test_vlm_word_maps_equal_the_textbook_order(mode, monkeypatch):
    """vlm_word_maps (aligned rows packed, head and layer means before the tile rebuild, per-layer
    Aligner under checkpoint) = _textbook, maps and gradients, for every aggregation the mode
    accepts; two layouts with padding, multi-token words, repeated words, a padding row."""
    monkeypatch.setattr(ag, "vision_geometry", lambda model: GEOMETRY)
    B, L, H, R, N = 2, 3, 4, 7, 4 * 17
    for aggregation in ag.AGGREGATIONS:
        torch.manual_seed(0)
        aligner = None if mode == "none" else Aligner("sim", aligner_channels(aggregation, H))
        if aligner is not None and aggregation.startswith(("max", "flow")) and mode == "per-layer":
            with pytest.raises(ValueError, match="--aligner-mode after"):
                ag.aligner_placement(aggregation, mode)
            continue
        placement = None if aligner is None else ag.aligner_placement(aggregation, mode)
        scores = torch.randn(B, L, H, R, N, requires_grad=True)
        probs = torch.softmax(scores, dim=-1) * (PLAN["rows"] >= 0)[:, None, None, :, None]
        capture = _capture(probs, aggregation)
        ours = ag.vlm_word_maps(capture, PLAN, BATCH, aggregation, aligner, mode, recompute=True)
        ref = _textbook(probs, PLAN, BATCH, aggregation, aligner, placement)
        close = torch.allclose(ours, ref, atol=1e-5)
        assert ours.shape == (B, 3, 32, 32) and close, (aggregation, mode)
        w = torch.rand(B, 3, 32, 32)
        # probs is shared
        g_ours, = torch.autograd.grad((ours * w).sum(), scores, retain_graph=True)
        g_ref, = torch.autograd.grad((ref * w).sum(), scores)
        assert torch.allclose(g_ours, g_ref, atol=1e-5 * g_ref.abs().max()), (aggregation, mode)


@pytest.mark.parametrize("mode", ["none", "per-layer", "after", "auto"])
def test_every_two_aggregations_differ_or_one_is_refused(mode, monkeypatch):
    """The Fig. 19 ablation compares different things: with the same attention (and Aligners of
    the same seed), every two aggregations give different maps, or the mode refuses one of them."""
    monkeypatch.setattr(ag, "vision_geometry", lambda model: GEOMETRY)
    torch.manual_seed(1)
    probs = torch.softmax(3 * torch.randn(2, 3, 4, 7, 4 * 17), dim=-1)
    maps = {}
    for aggregation in ag.AGGREGATIONS:
        torch.manual_seed(0)
        aligner = None if mode == "none" else Aligner("sim", aligner_channels(aggregation, 4))
        try:
            with torch.no_grad():
                capture = _capture(probs, aggregation)
                maps[aggregation] = ag.vlm_word_maps(capture, PLAN, BATCH, aggregation, aligner,
                                                     mode)
        except ValueError as err:
            assert mode == "per-layer" and "mean-mean, mean-max or learn" in str(err)
    names = sorted(maps)
    assert len(names) == (3 if mode == "per-layer" else 7)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            # learn's difference is the capture (A_d), not the maps
            if {a, b} != {"mean-mean", "learn"}:
                assert (maps[a] - maps[b]).abs().max() > 1e-3, (mode, a, b)


def test_a_capture_of_the_wrong_kind_is_refused_by_its_own_name():
    """"learn" maps come only from a capture with the parallel projections, and the reverse; the
    error names the capture class the caller holds (cross- or self-attention)."""
    probs = torch.rand(2, 3, 4, 7, 4 * 17)
    for kind, learned, aggregation in [("AttentionCapture", False, "learn"),
                                       ("SelfAttentionCapture", True, "mean-mean")]:
        capture = type(kind, (), dict(probs=probs, learned=learned, model=None))()
        with pytest.raises(ValueError, match=rf"needs {kind}\(learned={not learned}\)"):
            ag.vlm_word_maps(capture, PLAN, BATCH, aggregation)


def test_per_token_normalisation_comes_before_the_word_mean(monkeypatch):
    """§4.2 and the release: each token's map is normalised, then a word's token maps are averaged.
    A two-token word whose tokens attend with very different mass: the word's map is the mean of
    the two normalised maps, not the normalised mean of the raw ones."""
    monkeypatch.setattr(ag, "vision_geometry", lambda model: GEOMETRY)
    batch = dict(aspect_ratio_ids=torch.tensor([[1]]), image_sizes=torch.tensor([[56, 56]]),
                 attention_mask=torch.ones(1, 4, dtype=torch.long))
    plan = dict(rows=torch.tensor([[1, 2]]), row_word=torch.tensor([[0, 0]]),
                dm_index=torch.tensor([[0]]))
    probs = torch.zeros(1, 1, 1, 2, 4 * 17)
    # token 0: patches 0 and 1 (the tile's CLS at 0); token 1: little mass, on the last patch
    probs[0, 0, 0, 0, 1] = 0.9
    probs[0, 0, 0, 0, 2] = 0.1
    probs[0, 0, 0, 1, 16] = 0.05
    out = ag.vlm_word_maps(_capture(probs, "mean-mean"), plan, batch, "mean-mean")[0, 0]  # (32, 32)
    tokens = ag.min_max(ag.image_maps(probs, batch, GEOMETRY)[0, 0, 0])  # (2, 32, 32)
    assert torch.allclose(out, ag.min_max(tokens.mean(dim=0)), atol=1e-6)
    # the small token's patch counts as much as the big one's
    assert out[-1, -1] > 0.9
    raw_sum = ag.image_maps(probs.sum(dim=3, keepdim=True), batch, GEOMETRY)  # (1, 1, 1, 1, 32, 32)
    raw_first = ag.min_max(raw_sum[0, 0, 0, 0])
    assert (out - raw_first).abs().max() > 0.3


def test_recompute_and_batch_norm(monkeypatch):
    """recompute=True (per-layer Aligner under checkpoint, layer by layer) = recompute=False; a
    BatchNorm Aligner runs once over every layer's maps (statistics across layers)."""
    monkeypatch.setattr(ag, "vision_geometry", lambda model: GEOMETRY)
    torch.manual_seed(0)
    aligner = Aligner("sim", 4)
    scores = torch.randn(2, 3, 4, 7, 4 * 17, requires_grad=True)
    outs, grads = [], []
    for recompute in (False, True):
        capture = _capture(torch.softmax(scores, dim=-1), "mean-max")
        out = ag.vlm_word_maps(capture, PLAN, BATCH, "mean-max", aligner, "per-layer",
                               recompute=recompute)
        outs.append(out)
        ramp = torch.linspace(0, 1, out.numel()).view(out.shape)
        grads.append(torch.autograd.grad((out * ramp).sum(), [scores, *aligner.parameters()]))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max())
    bn = Aligner("sim", 4, norm="batch")
    probs = torch.softmax(scores, dim=-1).detach()
    ours = ag.vlm_word_maps(_capture(probs, "mean-max"), PLAN, BATCH, "mean-max", bn, "per-layer")
    # BatchNorm's statistics depend on which maps share the call: every layer's packed aligned rows
    take, token_word = ag.aligned_tokens(PLAN)
    idx = take.clamp(min=0)[:, None, None, :, None].expand(2, 3, 4, -1, 4 * 17)
    packed = probs.gather(3, idx)
    packed = packed * (take >= 0)[:, None, None, :, None]
    maps = ag.image_maps(packed, BATCH, GEOMETRY).permute(0, 1, 3, 2, 4, 5)  # (B, L, K, H, 32, 32)
    y = bn(maps.reshape(-1, 4, 32, 32)).view(2, 3, take.shape[1], 32, 32).amax(dim=1)
    ref = ag.min_max(ag.merge_rows(ag.min_max(y), token_word, 3))
    assert torch.allclose(ours, ref, atol=1e-5)
    with pytest.raises(ValueError, match="BatchNorm"):
        capture = _capture(probs, "mean-max")
        ag.vlm_word_maps(capture, PLAN, BATCH, "mean-max", bn, "per-layer", recompute=True)
