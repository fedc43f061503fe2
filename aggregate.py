"""VLM attention as per-word 32x32 maps (paper §4.2, §4.4, App. D, App. E; eq. 15-16, 40-44).

What this file does, in the order the data flows:

1. Capture (AttentionCapture, cross-attention families): hooks read the queries and keys softmax
   sees (models.query_key) and the image mask, and compute softmax(Q_rows Kᵀ · scaling + mask) for
   the chosen rows only, KV heads shared as in grouped-query attention; the model keeps SDPA.
   Learned aggregation (eq. 15-16): the parallel A_d = softmax(Q_d K_dᵀ/√d_k) from trainable
   `lavender_q_proj` / `lavender_k_proj` on q_proj's / k_proj's inputs. Self-attention: selfattn.py;
   the rows, the softmax and the store both captures share: capture.py.
2. Image grid (§4.4, App. E): Mllama's image tokens split into tiles of 1 CLS + P² patches, CLS
   dropped, tiles placed by aspect_ratio_ids, the padding cropped (original image size), area-
   resampled to 32x32: the map covers the pixels of the DM map. Others: models.vision_geometry.
3. Aggregation over heads and layers (§4.2): max-max, max-mean, mean-max, mean-mean (first
   word: over heads, second: over layers), flow-multi / flow-sum (App. D), learn (eq. 15-16).
4. Words: answer tokens grouped into words, words matched to DM words (exact or root), rows of a
   word merged, the Aligner (aligner.py) applied per layer or after aggregation. Under teacher
   forcing the row aligned for an answer token at position t is t - 1, the position whose
   output predicts it (plan_words).

Where a family keeps its layers and image geometry: models.FAMILIES. Choices: parallel projections
start as copies (init="copy", A_d = A at step 0); the flow regularisation is r_t = (t + 1) / T
(flow_weights); only a sample's first image is mapped.

    python bench.py aggregate     # capture overhead at a scaled-down llama32 geometry (CPU)"""

from functools import partial

import torch
import torch.nn as nn
import torch.utils.checkpoint
from transformers.models.mllama.image_processing_pil_mllama import get_image_size_fit_to_canvas

from aligner import MAP_SIZE, area_matrix, min_max
from capture import RowCapture, answer_rows, gather_positions, gather_rows, row_probs, split_heads
from data import answer_words, match_words
from models import (FAMILIES, attention_layers, attention_module, family, language_model, query_key,
                    vision_geometry)
from selfattn import SelfAttentionCapture

AGGREGATIONS = ("max-max", "max-mean", "mean-max", "mean-mean", "flow-multi", "flow-sum",
                "learn")
LAYER_SUBSETS = ("all", "first", "mid", "last")

# ---------------------------------------------------------------------------------------------
# the layers aligned (the model family's layers: models.py) and the parallel projections
# ---------------------------------------------------------------------------------------------


def aligned_layers(model, subset="all"):
    """Indices of the text-to-image layers to align, as models.attention_layers numbers them
    (Mllama, Qwen2-VL: language_model.layers; IDEFICS: gated_cross_attn_layers) (§8.1.1,
    Fig. 22).

    "first", "mid", "last": a quarter of the family's layers (models.attention_layers; at least
    one) at the start, middle or end. llama32 (cross-attention at 3, 8, ..., 38): all -> 8 layers,
    first -> [3, 8], mid -> [18, 23], last -> [33, 38]; qwen2vl (3, 7, ..., 27): first -> [3]. The
    paper names the subsets but not their size."""
    cross = attention_layers(model)
    if subset not in LAYER_SUBSETS:
        raise ValueError(f"unknown layer subset {subset!r}; choose one of {LAYER_SUBSETS}")
    k = max(1, len(cross) // 4)
    start = {"all": 0, "first": 0, "mid": (len(cross) - k) // 2, "last": len(cross) - k}[subset]
    return cross if subset == "all" else cross[start:start + k]


def add_parallel_projections(model, layers, init="copy"):
    """eq. 15-16: trainable W_Qd, W_Kd (`lavender_q_proj`, `lavender_k_proj`) beside W_Q, W_K.

    Call AFTER PEFT wrapping (PEFT would freeze them) and BEFORE fully_shard (so FSDP2 shards them
    with their decoder layer). init="copy" (default) copies the pretrained projections, so that
    A_d equals the pretrained attention A at step 0 and the alignment starts from what the model
    already attends to (the paper's aim is to preserve pretrained attention, §4.2.3); "random" is
    the authors' release (nn.Linear's default init), where A_d starts as an unrelated attention.
    Returns the new modules, [q_0, k_0, q_1, k_1, ...].
    """
    if init not in ("copy", "random"):
        raise ValueError(f"unknown init {init!r} for parallel projections; "
                         f"choose 'copy' or 'random'")
    added = []
    for layer in layers:
        attn = attention_module(model, layer)
        for name in ("q_proj", "k_proj"):
            base = getattr(attn, name)
            weight = getattr(base, "base_layer", base).weight  # the pretrained W (under LoRA too)
            out_features, in_features = weight.shape
            proj = nn.Linear(in_features, out_features, bias=False, device=weight.device,
                             dtype=weight.dtype)
            if init == "copy":
                with torch.no_grad():
                    proj.weight.copy_(weight)
            proj.weight.requires_grad_(True)
            setattr(attn, "lavender_" + name, proj)
            added.append(proj)
    return added


# ---------------------------------------------------------------------------------------------
# capture: softmax(Q_rows Kᵀ · scaling + mask) for the chosen rows of cross-attention layers
# ---------------------------------------------------------------------------------------------


def mask_rows(mask, rows):
    """The additive image mask (B, 1, T, N) at the rows (B, R) -> (B, 1, R, N); None stays None."""
    if mask is None:
        return None
    at = rows.clamp(min=0).to(mask.device)[:, None, :, None]  # (B, 1, R, 1)
    return mask.gather(2, at.expand(-1, 1, -1, mask.shape[-1]))  # (B, 1, R, N)


def parallel_query_key(attn, args, kwargs, rows):
    """eq. 15-16: W_Qd, W_Kd on q_proj's / k_proj's inputs of a cross-attention module -> the
    rows' queries (B, H, R, D) and the image keys (B, KVH, N, D), before the q/k norms."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, d)
    states = kwargs.get("cross_attention_states", kwargs.get("key_value_states"))  # (B*, keys, d)
    if states is None:
        raise RuntimeError("learned capture needs cross_attention_states (a forward with "
                           "pixel_values, not a cached generation step)")
    B = hidden.shape[0]
    h = gather_positions(hidden, rows.clamp(min=0))  # (B, R, d)
    # the projections train in fp32 while frozen weights (and so these inputs) may be bf16; under
    # FSDP2's mixed precision the weights are bf16 here and the casts do nothing
    dtype = attn.lavender_q_proj.weight.dtype
    q = attn.lavender_q_proj(h.to(dtype))  # (B, R, H * D)
    q = q.view(B, -1, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, R, D)
    # IDEFICS has no grouped-query attention
    kv_heads = getattr(attn, "num_key_value_heads", attn.num_heads)
    k = attn.lavender_k_proj(states.to(dtype))  # (B, N, KVH * D)
    k = k.view(B, -1, kv_heads, attn.head_dim).transpose(1, 2)  # (B, KVH, N, D)
    return q, k


class AttentionCapture(RowCapture):
    """Capture text-to-image attention rows of chosen cross-attention layers (§4.2).

        capture = AttentionCapture(model, aligned_layers(model))
        capture.set_rows(plan["rows"])   # (B, R) text positions, -1 = padding
        out = model(**batch)
        capture.probs                    # (B, L, H, R, n_image_tokens), differentiable

    learned=True captures the parallel attention A_d (eq. 15-16; add_parallel_projections first)
    instead of the pretrained A. The store, set_rows, probs and the checkpointing rule (the first
    value written in a pass wins) are capture.RowCapture's. Under FSDP2 the hooks sit on
    submodules of a sharded decoder layer and fire inside its forward, when its parameters are
    gathered.
    """

    def _place_hooks(self):
        """A new store at each forward of the text model, the queries and keys where query_key
        finds them, the rows after the module."""
        self._hook(language_model(self.model), self._new_pass, pre=True)
        for i, layer in enumerate(self.layers):
            attn = attention_module(self.model, layer)
            self._hook(attn, partial(self._pre_hook, i), pre=True)
            if not self.learned:
                # the modules whose outputs are the queries and keys softmax reads
                q_module, k_module = query_key(self.model, attn)[:2]
                self._hook(q_module, partial(self._keep, i, "q", attn.head_dim))
                self._hook(k_module, partial(self._keep, i, "k", attn.head_dim))
                self._hook(attn, partial(self._post_hook, i))

    def _pre_hook(self, i, attn, args, kwargs):
        """The mask at the rows; learned: A_d from the parallel projections (eq. 15-16)."""
        if self.rows is None:
            return None
        mask = mask_rows(kwargs.get("attention_mask"), self.rows)  # (B, 1, R, N)
        if not self.learned:
            self._scratch[i] = {"mask": mask}
            return None
        q, k = parallel_query_key(attn, args, kwargs, self.rows)
        # called by .forward: the hooks of a capture of A on them stay silent
        q_norm, k_norm = query_key(self.model, attn)[2:]
        self._save(i, row_probs(attn, q_norm(q), k_norm(k), mask))  # (B, H, R, N)
        return None

    def _keep(self, i, name, head_dim, module, args, output):
        if self.rows is not None and i in self._scratch:
            # a projection's (B, T, heads * D) (IDEFICS without q/k norms)
            if output.dim() == 3:
                output = split_heads(output, head_dim)  # (B, heads, T, D)
            if name == "q":
                output = gather_rows(output, self.rows)  # (B, heads, R, D)
            self._scratch[i][name] = output

    def _post_hook(self, i, attn, args, output):
        scratch = self._scratch.pop(i, None)
        if scratch is None:
            return None
        if "k" not in scratch:
            raise RuntimeError(f"layer {self.layers[i]}: k_norm did not run (cached "
                               f"cross-attention keys); capture a full forward with pixel_values")
        self._save(i, row_probs(attn, scratch["q"], scratch["k"], scratch["mask"]))  # (B, H, R, N)


def attention_capture(model, layers, learned=False):
    """The capture of the family's attention (models.FAMILIES "attention"): cross-attention
    (AttentionCapture) or self-attention (selfattn.SelfAttentionCapture)."""
    captures = {"cross": AttentionCapture, "self": SelfAttentionCapture}
    kind = FAMILIES[family(model)]["attention"]
    return captures[kind](model, layers, learned)


# ---------------------------------------------------------------------------------------------
# tiles: image tokens -> the 32x32 grid of the original image (§4.4, App. E)
# ---------------------------------------------------------------------------------------------


def tiles_to_grid(attn, aspect_ratio_id, image_size, tile_size, patch_size, max_tiles, supported,
                  out=MAP_SIZE):
    """Image-token attention of one image -> its (out, out) map over the original image (§4.4,
    App. E).

    attn: (..., max_tiles * (1 + P²)) with P = tile_size // patch_size; each tile is its CLS token
    then P² patches in row-major order; tiles in row-major order on a rows x cols canvas, where
    (rows, cols) = supported[aspect_ratio_id - 1] (Mllama's ids count from 1; (a, b) is (tiles
    high, tiles wide) in the processor's code although its docstring says (width, height)).
    The processor resized the (height, width) = image_size image to fit the canvas keeping its
    aspect ratio, then padded right and bottom; that padding is cropped here.
    Returns (..., out, out).
    """
    P = tile_size // patch_size
    rows, cols = supported[int(aspect_ratio_id) - 1]
    lead = attn.shape[:-1]
    x = attn.reshape(*lead, max_tiles, 1 + P * P)  # (..., tiles, CLS + P² patches)
    x = x[..., :rows * cols, 1:]  # drop CLS and padding tiles
    x = x.reshape(*lead, rows, cols, P, P).movedim(-2, -3)  # (..., rows, P, cols, P)
    x = x.reshape(*lead, rows * P, cols * P)  # (..., canvas_h, canvas_w) in patches
    h, w = (int(s) for s in image_size)
    canvas_h, canvas_w = rows * tile_size, cols * tile_size  # in pixels
    new_h, new_w = get_image_size_fit_to_canvas(h, w, canvas_h, canvas_w, tile_size)
    m_h = area_matrix(out, new_h, rows * P, patch_size, x.device, x.dtype)  # (out, canvas_h)
    m_w = area_matrix(out, new_w, cols * P, patch_size, x.device, x.dtype)  # (out, canvas_w)
    return m_h @ x @ m_w.T  # (..., out, out)


def image_maps(probs, batch, geometry):
    """probs (B, L, H, R, N) -> (B, L, H, R, 32, 32) over each sample's first image (§4.4).
    geometry: vision_geometry's: Mllama's tiles, or a family's dict whose image_maps rebuilds its
    grid."""
    if isinstance(geometry, dict):
        return geometry["image_maps"](probs, batch)
    tile_size, patch_size, max_tiles, supported = geometry
    per_image = max_tiles * (1 + (tile_size // patch_size) ** 2)
    ids, sizes = batch["aspect_ratio_ids"], batch["image_sizes"]
    per_sample = []
    for b in range(probs.shape[0]):
        first_image = probs[b, ..., :per_image]  # (L, H, R, tiles * (1 + P²))
        grid = tiles_to_grid(first_image, ids[b, 0], sizes[b], tile_size, patch_size, max_tiles,
                             supported)
        per_sample.append(grid)  # (L, H, R, 32, 32)
    return torch.stack(per_sample)


# ---------------------------------------------------------------------------------------------
# aggregation over heads and layers (§4.2.1, §4.2.2 + App. D), per token
# ---------------------------------------------------------------------------------------------

ALIGNER_MODES = ("auto", "per-layer", "after")


def rules(aggregation):
    """(head rule, layer rule) of an aggregation (§4.2): "max-mean" -> ("max", "mean"); flow-*
    keeps the heads apart and flows over layers: "flow-sum" -> ("mean", "flow-sum"); learn ->
    ("mean", "mean")."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    if aggregation.startswith("flow"):
        return "mean", aggregation
    return ("mean", "mean") if aggregation == "learn" else tuple(aggregation.split("-"))


def aligner_placement(aggregation, mode="auto"):
    """Where the Aligner runs for an aggregation: "per-layer" or "after" (the layers are combined).

    The release's placements, which "auto" picks: heads as channels of a per-layer Aligner whose
    raw outputs are then averaged (mean-mean, learn) or maxed (mean-max) over layers; max-max
    reduced before a 1-channel Aligner; flow-* flowed per head, heads as channels. max-mean goes
    "after" like max-max. "after" with mean-mean / mean-max / learn is the release's layer mean
    (or max) before an H-channel Aligner. A per-layer Aligner cannot honour a max over heads (one
    channel, which the release reduces over layers first) nor a flow (it multiplies or adds
    probabilities, which the Aligner's outputs are not): those are refused.
    """
    heads, layers = rules(aggregation)
    layerwise = heads == "mean" and layers in ("mean", "max")
    if mode not in ALIGNER_MODES:
        raise ValueError(f"unknown aligner_mode {mode!r}; choose one of {ALIGNER_MODES}")
    if mode == "per-layer" and not layerwise:
        why = "a flow combines probabilities"
        if heads == "max":
            why = "a max over heads leaves one channel"
        raise ValueError(f"--aggregate {aggregation} cannot run a per-layer Aligner ({why}, so the "
                         f"release combines the layers before its Aligner): use --aligner-mode "
                         f"after (or auto) with {aggregation}, or a per-layer Aligner with "
                         f"mean-mean, mean-max or learn")
    return ("per-layer" if layerwise else "after") if mode == "auto" else mode


def reduce(x, rule, dim):
    """A mean or max over one dimension (the head or layer rule, §4.2.1)."""
    return x.amax(dim=dim) if rule == "max" else x.mean(dim=dim)


def flow(maps, multiply):
    """App. D attention flow over layers: maps (..., L, h, w) per layer -> (..., h, w).

    eq. 40: Ā ← A⁽¹⁾; eq. 41 (flow-multi): Ā ← Ā ∘ A⁽ˡ⁾; eq. 42 (flow-sum): Ā ← Ā + A⁽ˡ⁾.
    For flow-multi each step is divided by its sum over the map: a per-map constant (so the
    normalised map is unchanged) that keeps a product of 8 probabilities (~1/6400 each) from
    underflowing. The result is returned as a distribution over the map (sums to 1).
    Worked example (one row, two layers, two patches): [.5, .5], [.8, .2] -> multi [.8, .2],
    sum [.65, .35].
    """
    agg = maps[..., 0, :, :]  # eq. 40
    for layer in range(1, maps.shape[-3]):
        a_l = maps[..., layer, :, :]  # A⁽ˡ⁾ (..., h, w)
        if multiply:
            agg = agg * a_l  # eq. 41
            agg = agg / agg.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-30)
        else:
            agg = agg + a_l  # eq. 42
    return agg / agg.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-30)


def flow_weights(rows, attention_mask):
    """App. D eq. 43, our choice (the paper's formula is lost): r_t = (t + 1) / T.

    t is the row's 0-based text position and T the sample's text length (attention_mask.sum()),
    so earlier tokens weigh less and later ones more, as the paper describes. Each token's map is
    min-max normalised, so r weights the tokens of one word (its sub-word pieces and repeated
    occurrences) against each other when their maps are averaged (merge_rows).
    rows (B, R), attention_mask (B, T) -> (B, R), 0 at padding rows.
    Worked example: rows [[3, 4]], T = 5 -> [[0.8, 1.0]].
    """
    T = attention_mask.sum(dim=-1, keepdim=True).clamp(min=1).to("cpu", torch.float32)  # (B, 1)
    rows = rows.cpu()
    return ((rows + 1).to(torch.float32) / T) * (rows >= 0)  # (B, R)


def aggregate(maps, aggregation):
    """§4.2 without an Aligner: maps (..., L, H, h, w) -> (..., h, w). First word: over heads;
    second: over layers. flow-*: one flow per head over layers (App. D), then the heads' mean.
    learn: the parallel attention A_d is what is aligned: heads and layers averaged.
    Worked example (L = 2, H = 2, one pixel): [[1, 3], [5, 7]] -> max-max 7, max-mean 5,
    mean-max 6, mean-mean 4.
    """
    heads, layers = rules(aggregation)
    if layers.startswith("flow"):
        return flow(maps.transpose(-3, -4), multiply=layers == "flow-multi").mean(dim=-3)
    return reduce(reduce(maps, heads, dim=-3), layers, dim=-3)


def merge_rows(maps, row_word, n_words, weights=None):
    """Tokens -> words (§4.2): maps (B, ..., R, h, w), row_word (B, R) word index or -1 ->
    (B, ..., W, h, w).

    A word's map is the (weighted) mean of its tokens' maps: a multi-token word's pieces, and
    every occurrence of a repeated word (the DM store averages repeated words too).
    """
    B, R = row_word.shape
    row_word = row_word.cpu()
    w = torch.ones(B, R) if weights is None else weights.detach().float().cpu()
    onehot = torch.zeros(B, R, n_words)
    valid = row_word >= 0
    onehot[valid.nonzero(as_tuple=True) + (row_word[valid],)] = 1.0
    onehot = onehot * w[:, :, None]
    # (B, R, W): the mean over a word's rows
    onehot = onehot / onehot.sum(dim=1, keepdim=True).clamp(min=1e-12)
    onehot = onehot.to(maps.device, maps.dtype)
    lead = maps.shape[1:-3]
    x = maps.reshape(B, lead.numel(), R, maps.shape[-2] * maps.shape[-1])  # (B, *, R, h*w)
    # (B, 1, W, R) @ (B, *, R, h*w): no transposed copy of maps
    x = onehot.transpose(1, 2).unsqueeze(1) @ x
    return x.reshape(B, *lead, n_words, maps.shape[-2], maps.shape[-1])


def aligned_tokens(plan):
    """The captured rows that belong to an aligned word, packed to the front of each sample:
    (take (B, K) index into the captured rows, -1 pad; token_word (B, K) their word, -1 pad)."""
    row_word = plan["row_word"].cpu()
    per_sample = [(row_word[b] >= 0).nonzero().flatten() for b in range(row_word.shape[0])]
    K = max([len(t) for t in per_sample] + [1])
    take = torch.full((row_word.shape[0], K), -1, dtype=torch.long)
    token_word = torch.full_like(take, -1)
    for b, t in enumerate(per_sample):
        take[b, :len(t)] = t
        token_word[b, :len(t)] = row_word[b, t]
    return take, token_word


def per_layer_aligner(probs, batch, geometry, aligner, layer_rule, recompute):
    """Release default (§4.2.3): each layer's heads as the Aligner's channels; the raw outputs
    combined over layers by the layer rule. probs (B, L, H, K, N) -> (B, K, 32, 32) raw.
    One layer at a time (one call for all layers with BatchNorm, whose statistics span them);
    recompute=True runs each layer's tile rebuild + Aligner under torch.utils.checkpoint, so
    backward holds one layer's Aligner activations instead of all L layers' (same result)."""
    B, L, H, K = probs.shape[:4]
    batch_stats = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in aligner.modules())
    if recompute and batch_stats:
        raise ValueError("recompute=True needs an Aligner without BatchNorm (its statistics would "
                         "be taken per layer); use recompute=False with norm='batch'")

    def maps_and_aligner(x):
        """x (B, n, K, H, N) -> (B, n, K, 32, 32)."""
        # (B, n, K, H, 32, 32): the heads next to the map, no copy
        maps = image_maps(x, batch, geometry)
        y = aligner(maps.reshape(-1, H, MAP_SIZE, MAP_SIZE))  # (B * n * K, 32, 32)
        return y.view(B, x.shape[1], K, MAP_SIZE, MAP_SIZE)

    def one_layer(w):
        """w (B, K, H, N) -> (B, K, 32, 32)."""
        return maps_and_aligner(w[:, None])[:, 0]

    x = probs.transpose(2, 3)  # (B, L, K, H, N)
    if batch_stats:
        y = maps_and_aligner(x)  # (B, L, K, 32, 32)
    else:
        per_layer = []
        for w in x.unbind(1):
            if recompute:
                y_layer = torch.utils.checkpoint.checkpoint(one_layer, w, use_reentrant=False)
            else:
                y_layer = one_layer(w)
            per_layer.append(y_layer)  # (B, K, 32, 32)
        y = torch.stack(per_layer, dim=1)  # (B, L, K, 32, 32)
    return reduce(y, layer_rule, dim=1)  # (B, K, 32, 32)


def token_maps(probs, batch, geometry, aggregation, aligner=None, placement="after",
               recompute=False):
    """Captured probabilities (B, L, H, K, N) of K tokens -> one raw (B, K, 32, 32) map per token
    (§4.2, App. D).

    No Aligner: heads, then layers, by the aggregation's rules (aggregate(), with a flow per head).
    With an Aligner: per_layer_aligner, or "after": a max over heads (1 channel) or the heads kept
    as channels, the layers combined (a flow per head), then the Aligner. A mean over heads or
    layers is a linear map, like the tile rebuild, so where the order allows it runs on the image
    tokens first (fewer maps to build); a max or a flow needs the per-head maps.
    """
    heads, layers = rules(aggregation)
    if aligner is not None and placement == "per-layer":
        return per_layer_aligner(probs, batch, geometry, aligner, layers, recompute)
    flowing = layers.startswith("flow")
    # else the heads are kept as channels, or flowed apart
    mean_heads_now = heads == "mean" and aligner is None and not flowing
    if mean_heads_now:
        probs = probs.mean(dim=2, keepdim=True)  # (B, L, 1, K, N)
    if heads == "mean" and layers == "mean":
        # commutes with a mean over heads or no head rule
        probs = probs.mean(dim=1, keepdim=True)  # (B, 1, H or 1, K, N)
    maps = image_maps(probs, batch, geometry).movedim(3, 1)  # (B, K, L, H', 32, 32)
    if heads == "max":
        # over heads first, in each layer
        maps = maps.amax(dim=3, keepdim=True)  # (B, K, L, 1, 32, 32)
    if flowing:
        # one flow per head
        maps = flow(maps.transpose(2, 3), multiply=layers == "flow-multi")  # (B, K, H, 32, 32)
    else:
        maps = reduce(maps, layers, dim=2)  # (B, K, H', 32, 32)
    if aligner is None:
        # the heads' mean of per-head flows, else the one channel left
        return maps.mean(dim=2)  # (B, K, 32, 32)
    B, K, C = maps.shape[:3]
    y = aligner(maps.reshape(B * K, C, MAP_SIZE, MAP_SIZE))  # (B * K, 32, 32)
    return y.view(B, K, MAP_SIZE, MAP_SIZE)


def vlm_word_maps(capture, plan, batch, aggregation="mean-mean", aligner=None, aligner_mode="auto",
                  recompute=False):
    """Per-word VLM attention maps: (B, W, 32, 32) in [0, 1], one per aligned word of `plan`.

    §4.2's order, as the release computes it: each aligned token's captured probabilities
    (B, L, H, K, N) -> its 32x32 map (token_maps: tiles rebuilt, heads and layers aggregated, the
    Aligner at its placement) -> min-max normalised -> a word's token maps averaged (its pieces
    and occurrences; flow-*: weighted by flow_weights) -> min-max normalised (as the DM maps are).
    """
    learned = aggregation == "learn"
    if learned != capture.learned:
        kind = type(capture).__name__
        raise ValueError(f"aggregation {aggregation!r} needs {kind}(learned={learned})")
    row_word, n_words = plan["row_word"], plan["dm_index"].shape[1]
    if n_words == 0:
        # nothing aligned: an empty result still tied to the graph (same backward on every rank)
        params = aligner.parameters() if aligner else []
        tie = capture.probs.sum() * 0 + sum((p.sum() * 0 for p in params), 0)
        return tie.expand(row_word.shape[0], 0, MAP_SIZE, MAP_SIZE)  # (B, 0, 32, 32)
    placement = aligner_placement(aggregation, aligner_mode) if aligner is not None else None
    # the aligned tokens' rows, packed
    take, token_word = aligned_tokens(plan)  # (B, K)
    probs = capture.probs  # (B, L, H, R, N)
    at = take.clamp(min=0).to(probs.device)[:, None, None, :, None]  # (B, 1, 1, K, 1)
    idx = at.expand(*probs.shape[:3], -1, probs.shape[-1])
    gathered = probs.gather(3, idx)
    probs = gathered * (take >= 0).to(probs.device)[:, None, None, :, None]  # (B, L, H, K, N)
    weights = None
    if rules(aggregation)[1].startswith("flow"):
        at_rows = plan["rows"].cpu().gather(1, take.clamp(min=0))
        rows = at_rows.masked_fill(take < 0, -1)  # (B, K) text positions
        weights = flow_weights(rows, batch["attention_mask"])
    geometry = vision_geometry(capture.model)  # Mllama's tiles, or a family's grid
    raw = token_maps(probs, batch, geometry, aggregation, aligner, placement, recompute)
    maps = min_max(raw)  # (B, K, 32, 32)
    return min_max(merge_rows(maps, token_word, n_words, weights))  # (B, W, 32, 32)


# ---------------------------------------------------------------------------------------------
# words: which text positions are aligned, and with which DM word (data.py: what a word is)
# ---------------------------------------------------------------------------------------------

ALIGN_WORDS = ("predicted", "label")


def row_tokens(rows, input_ids, logits=None, align_words="predicted"):
    """(B, R) the token each captured row is read for, -1 at padding: §6 (5) "predicted" words,
    the argmax of the logits at the row (the release keys each map by its predicted token), or
    "label", the answer token the row predicts (input_ids[t + 1])."""
    if align_words not in ALIGN_WORDS:
        raise ValueError(f"unknown align_words {align_words!r}; choose one of {ALIGN_WORDS}")
    at = rows.clamp(min=0)
    if align_words == "predicted":
        tokens = logits.detach().argmax(dim=-1).cpu().gather(1, at)
    else:
        tokens = input_ids.cpu().gather(1, (at + 1).clamp(max=input_ids.shape[1] - 1))
    return tokens.masked_fill(rows < 0, -1)


def plan_words(tokenizer, rows, tokens, dm_words, match="exact"):
    """Which captured rows are aligned, and with which DM word.

    rows (B, R): the captured text positions (capture.answer_rows); tokens (B, R): the token each
    row is read for (row_tokens: predicted or label). The tokens of a sample are grouped into
    words (answer_words), and a word is aligned if match_words finds it among the sample's DM
    words; occurrences matching the same DM word become one word (their rows averaged), mirroring
    the DM store. dm_words[b] None = no DM maps for that sample.

    Returns dict(rows (B, R) as given; row_word (B, R) long, index into the sample's aligned
    words, -1 = not aligned; dm_index (B, W) long, index into dm_words[b], -1 pad; words: list of
    lists of the aligned VLM words, as decoded).
    """
    B, R = rows.shape
    row_word = torch.full((B, R), -1, dtype=torch.long)
    per_sample = []  # [(dm indices, words)]
    for b in range(B):
        valid = (rows[b] >= 0).nonzero().flatten().tolist()
        entries = {}  # dm index -> (first vlm word, [captured rows])
        if dm_words[b] is not None and valid:
            grouped = answer_words(tokenizer, tokens[b, valid].tolist())
            vlm_words = [w for w, _ in grouped]
            for (word, toks), j in zip(grouped, match_words(vlm_words, dm_words[b], match)):
                if j is not None:
                    _, captured = entries.setdefault(j, (word, []))
                    captured.extend(valid[t] for t in toks)
        for w, (_, word_rows) in enumerate(entries.values()):
            row_word[b, word_rows] = w
        words = [word for word, _ in entries.values()]
        per_sample.append((list(entries), words))
    W = max([len(s[0]) for s in per_sample] + [0])
    dm_index = torch.full((B, W), -1, dtype=torch.long)
    for b, (indices, _) in enumerate(per_sample):
        dm_index[b, :len(indices)] = torch.tensor(indices, dtype=torch.long)
    return dict(rows=rows, row_word=row_word, dm_index=dm_index, words=[s[1] for s in per_sample])


def label_plan(tokenizer, input_ids, labels, dm_words, match="exact"):
    """(rows, plan) of the label words, known before any forward: the captured rows
    (capture.answer_rows) and plan_words on the answer tokens themselves (row_tokens "label").
    evaluate.py measures these words, and train.py counts them before step 1."""
    rows = answer_rows(labels)  # (B, R)
    tokens = row_tokens(rows, input_ids, align_words="label")  # (B, R)
    return rows, plan_words(tokenizer, rows, tokens, dm_words, match)


def dm_targets(dm_maps, dm_index):
    """The DM maps each aligned word is compared with: list of (n_words_b, 32, 32) or None,
    dm_index (B, W) -> (B, W, 32, 32), zeros at padding; the mask for attention_loss is
    dm_index >= 0."""
    B, W = dm_index.shape
    out = torch.zeros(B, W, MAP_SIZE, MAP_SIZE)
    for b in range(B):
        aligned = dm_index[b] >= 0  # (W,)
        if aligned.any():
            out[b, aligned] = dm_maps[b][dm_index[b, aligned]].float()  # one gather per sample
    return out
