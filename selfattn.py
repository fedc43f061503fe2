"""Text-to-image attention of self-attention-only VLMs (paper §4.4 "Self-Attention Only";
eq. 15-16).

The paper's self-attention model, MiniCPM-Llama3-V-2.5, has no class in transformers; Qwen2-VL
and Qwen2.5-VL (qwen.py, family "qwen2vl") stand for it. There text and image tokens are one
causal sequence, so a word's map is a row of a self-attention layer read at the image's columns:
§4.4's three steps, (1) which tokens are the image, (2) the causal and padding mask, (3) the
image tokens put back on their grid and resampled to 32x32.

1. Capture (SelfAttentionCapture, the store and API of capture.RowCapture): forward hooks read
   each chosen layer's q_proj / k_proj outputs (LoRA included: the hooks sit on the modules PEFT
   made), apply RoPE with the layer's own `position_embeddings` (M-RoPE's cos / sin) through the
   modeling file's own apply_rotary_pos_emb, and compute softmax(Q_rows Kᵀ · scaling + mask) for
   the chosen rows only, KV heads shared as the model shares them (capture.row_probs). The model
   keeps SDPA / flash attention. Learned aggregation (eq. 15-16): `lavender_q_proj` /
   `lavender_k_proj` on the q_proj / k_proj inputs, the pretrained biases added, the same RoPE
   and mask.
2. Renormalised over the image (RENORMALISE): a self-attention row also spends mass on text
   tokens and on attention sinks; by default each row's image columns are a distribution of
   their own, softmax over the image keys alone, which is what a cross-attention layer computes
   from the same scores (README, "Model families", has the measurement and the reason).
3. Grid (qwen.grid_maps, the family's vision_geometry): image_grid_thw (1, h, w) -> (h/2) x (w/2)
   tokens, row-major, covering the whole image; area-resampled to 32x32.

Aggregations, words and the Aligner are aggregate.py's, unchanged; aggregate.attention_capture
picks this capture for the family.

    python -m pytest -q tests/test_selfattn.py
"""
import inspect
import tempfile
from functools import partial

import numpy as np
import torch
from PIL import Image

import data
from aligner import min_max
from capture import RowCapture, answer_rows, gather_positions, row_probs, split_heads
from models import TINY_CORPUS, attention_layers, attention_module, base_model, tiny_qwen2vl
from qwen import grid_maps

# Each row's image columns renormalised to sum to 1 (softmax over the image keys alone); False
# keeps the image's share of the row's mass (softmax over every key, the image columns read).
RENORMALISE = True


def image_positions(input_ids, image_token_id):
    """§4.4 (1): (positions (B, N) of each sample's image tokens, N the most in any sample (padding
    repeats the last), valid (B, N) bool). ValueError naming the sample when it has no image or
    more than one (two runs of image tokens): a map is of one image.
    Worked example: ids [[5, 9, 9, 9, 6], [5, 9, 9, 6, 0]], image 9 -> [[1, 2, 3], [1, 2, 2]],
    valid [[T, T, T], [T, T, F]]."""
    is_image = input_ids == image_token_id  # (B, T)
    counts = is_image.sum(dim=1)
    starts = is_image.int().argmax(dim=1)
    for b in range(input_ids.shape[0]):
        runs = int((is_image[b, 1:] & ~is_image[b, :-1]).sum()) + int(is_image[b, 0])
        if runs != 1:
            raise ValueError(f"sample {b} of the batch has {runs} images (runs of image tokens); "
                             f"Lavender maps exactly one image per sample")
    N = int(counts.max())
    offset = torch.arange(N, device=input_ids.device)
    valid = offset[None] < counts[:, None]  # (B, N)
    positions = starts[:, None] + torch.minimum(offset[None], counts[:, None] - 1)  # (B, N)
    return positions, valid


def key_mask(rows, keys, valid, dtype):
    """§4.4 (2): additive mask (B, 1, R, N) of causal attention: row t sees key j when j <= t and
    the key is valid (not padding); rows (B, R) and keys (B, N) are text positions."""
    allowed = (keys[:, None, :] <= rows[:, :, None]) & valid[:, None, :]  # (B, R, N)
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]  # (B, 1, R, N)


def read_positions(args, kwargs, rows, image_token_id, renormalise):
    """§4.4 (1), (2): the positions a forward reads, from Qwen2VLModel's input_ids and padding
    mask: dict(rows (B, R) clamped to 0, keys (B, N) the image tokens, valid (B, N)). With
    renormalise=False every key is read (keys (B, T), valid the padding mask) and the image's
    positions are kept for later (image, image_valid (B, N)). rows None: nothing is read, {}."""
    if rows is None:
        return {}
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
        raise RuntimeError("SelfAttentionCapture needs input_ids "
                           "(the image tokens are found there)")
    keys, valid = image_positions(input_ids, image_token_id)  # (B, N)
    mask = kwargs.get("attention_mask")
    text = {}
    if not renormalise:  # every key, the image's read afterwards
        text.update(image=keys, image_valid=valid)  # (B, N) each
        keys = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    text.update(keys=keys, valid=valid.to(input_ids.device), rows=rows.clamp(min=0))
    return text


def rotary(rope, cos, sin, positions):
    """RoPE at `positions` (B, K): x (B, heads, K, D) -> x rotated, by the modeling file's own
    apply_rotary_pos_emb (`rope`). That function rotates a pair (q, k) with one cos / sin: x is
    passed as both and one result kept."""
    def rotate(x):
        cos_at = gather_positions(cos, positions)  # (B, K, D)
        sin_at = gather_positions(sin, positions)
        return rope(x, x, cos_at, sin_at)[0]
    return rotate


def rope_and_mask(rope, position_embeddings, text):
    """§4.4 (2) in one layer: RoPE for the rows' queries and for the keys at their own positions
    (the layer's M-RoPE cos / sin), and the causal and padding mask (B, 1, R, N)."""
    cos, sin = position_embeddings  # (B, T, D): M-RoPE, recomposed
    rows, keys = text["rows"], text["keys"]
    rotate = {"q": rotary(rope, cos, sin, rows), "k": rotary(rope, cos, sin, keys)}
    mask = key_mask(rows.to(cos.device), keys.to(cos.device), text["valid"], cos.dtype)
    return {"rope": rotate, "mask": mask}


def parallel_query_key(attn, hidden, rows, keys):
    """eq. 15-16: W_Qd, W_Kd on q_proj's / k_proj's input hidden (B, T, d), the pretrained biases
    added -> the rows' queries (B, H, R, D) and the keys (B, KVH, N, D), before RoPE."""
    dtype = attn.lavender_q_proj.weight.dtype
    q = attn.lavender_q_proj(gather_positions(hidden, rows).to(dtype))
    q = q + _bias(attn.q_proj)  # (B, R, H * D)
    k = attn.lavender_k_proj(gather_positions(hidden, keys).to(dtype))
    k = k + _bias(attn.k_proj)  # (B, N, KVH * D)
    return split_heads(q, attn.head_dim), split_heads(k, attn.head_dim)


def image_columns(probs, image, image_valid):
    """(§4.4 "Self-Attention Only" (1), (2)) A softmax over every key (B, H, R, T) -> its image
    columns (B, H, R, N), 0 at padding columns; image, image_valid (B, N) from read_positions."""
    image = image.to(probs.device)[:, None, None, :]  # (B, 1, 1, N)
    probs = probs.gather(-1, image.expand(*probs.shape[:3], -1))  # (B, H, R, N)
    return probs * image_valid.to(probs.device)[:, None, None, :]  # no padding column


class SelfAttentionCapture(RowCapture):
    """Capture text-to-image rows of chosen self-attention layers (§4.4; Qwen2-VL, Qwen2.5-VL).

        capture = SelfAttentionCapture(model, aligned_layers(model))   # after PEFT wraps q_proj
        capture.set_rows(rows)           # (B, R) text positions, -1 = padding
        out = model(**batch)             # input_ids with one run of image tokens per sample
        capture.probs                    # (B, L, H, R, N image tokens), differentiable
    """

    def __init__(self, model, layers, learned=False, renormalise=RENORMALISE):
        self.renormalise, self._text = renormalise, {}  # _text: read_positions of the forward
        config = base_model(model).config
        self.image_token_id = config.image_token_id
        self.merge = config.vision_config.spatial_merge_size
        super().__init__(model, layers, learned)

    def _place_hooks(self):
        """Hooks on Qwen2VLModel (it sees input_ids and the padding mask), q/k_proj, the module."""
        self._hook(base_model(self.model).model, self._new_pass, pre=True)
        for i, layer in enumerate(self.layers):
            attn = attention_module(self.model, layer)
            rope = inspect.getmodule(type(attn)).apply_rotary_pos_emb  # the modeling file's own
            self._hook(attn, partial(self._pre_hook, i, rope), pre=True)
            if not self.learned:
                self._hook(attn.q_proj, partial(self._keep, i, "q", attn.head_dim))
                self._hook(attn.k_proj, partial(self._keep, i, "k", attn.head_dim))
                self._hook(attn, partial(self._post_hook, i))

    def _new_pass(self, module, args, kwargs):
        super()._new_pass(module, args, kwargs)
        self._text = read_positions(args, kwargs, self.rows, self.image_token_id, self.renormalise)

    def _pre_hook(self, i, rope, attn, args, kwargs):
        if self.rows is None:
            return None
        self._scratch[i] = rope_and_mask(rope, kwargs["position_embeddings"], self._text)
        if self.learned:  # eq. 15-16: A_d
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, d)
            q, k = parallel_query_key(attn, hidden, self._text["rows"], self._text["keys"])
            self._save(i, self._probs_of(i, attn, q, k))
        return None

    def _keep(self, i, name, head_dim, proj, args, output):  # output (B, T, heads * D)
        if self.rows is not None and i in self._scratch:
            at = self._text["rows"] if name == "q" else self._text["keys"]
            self._scratch[i][name] = split_heads(gather_positions(output, at), head_dim)

    def _post_hook(self, i, attn, args, output):
        scratch = self._scratch.get(i)
        if scratch is not None and "k" in scratch:
            self._save(i, self._probs_of(i, attn, scratch["q"], scratch["k"]))

    def _probs_of(self, i, attn, q, k):
        """q (B, H, R, D), k (B, KVH, N, D) before RoPE -> (B, H, R, N image tokens)."""
        scratch = self._scratch.pop(i)
        rotate = scratch["rope"]
        probs = row_probs(attn, rotate["q"](q), rotate["k"](k), scratch["mask"])
        if not self.renormalise:  # the image's columns of a softmax over every key
            probs = image_columns(probs, self._text["image"], self._text["image_valid"])
        return probs  # (B, H, R, N)


def _bias(proj):
    """q_proj's / k_proj's pretrained bias (under LoRA too); the parallel projections share it."""
    return getattr(proj, "base_layer", proj).bias


# ---- the measurement behind RENORMALISE (README, "Model families") ----

@torch.no_grad()
def measure_renormalisation(n_items=8, sink=0.1, seed=0):
    """On tiny-qwen2vl (random weights) with `n_items` random images and answers: each (layer,
    head) row's image mass (min, median, max over rows), and the mean squared difference between
    min-max normalised mean-mean maps (a) raw vs renormalised, (b) raw, before and after a
    simulated attention sink that takes 1 - `sink` of the image mass of half the heads (a sink on a
    text key leaves each head's renormalised map exactly unchanged)."""
    model, processor = tiny_qwen2vl(seed)
    rng, items = np.random.default_rng(seed), []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(n_items):
            size = tuple(int(s) for s in rng.integers(40, 220, 2))
            pixels = rng.integers(0, 255, (*size, 3), np.uint8)
            Image.fromarray(pixels).save(f"{folder}/{i}.png")
            items.append({"id": str(i), "image_path": f"{folder}/{i}.png",
                          "question": TINY_CORPUS[i % 5], "answer": TINY_CORPUS[5 + i % 9]})
        batch = data.collate(processor, items)
    rows = answer_rows(batch["labels"])
    with SelfAttentionCapture(model, attention_layers(model), renormalise=False) as capture:
        capture.set_rows(rows)
        model(**data.model_inputs(batch))
        raw = capture.probs  # (B, L, H, R, N)
    mass = raw.sum(dim=-1)  # (B, L, H, R)
    valid = rows >= 0
    renormalised = raw / mass[..., None].clamp(min=1e-30)
    heads = torch.ones(raw.shape[2])
    heads[:raw.shape[2] // 2] = sink
    sunk = raw * heads[:, None, None]
    maps = {}  # (rows, 32, 32) each
    for name, p in (("raw", raw), ("renormalised", renormalised), ("raw with sink", sunk)):
        mean_mean = p.mean(dim=(1, 2))  # (B, R, N)
        maps[name] = min_max(grid_maps(mean_mean, batch["image_grid_thw"], capture.merge))[valid]
    per_row = mass.permute(0, 3, 1, 2)[valid]  # (rows, L, H)
    spread = [round(float(v), 4) for v in (per_row.min(), per_row.median(), per_row.max())]
    return {"image mass (min, median, max)": spread,
            "MSE raw vs renormalised": float(((maps["raw"] - maps["renormalised"]) ** 2).mean()),
            "MSE raw, sink vs none": float(((maps["raw"] - maps["raw with sink"]) ** 2).mean()),
            "rows": int(valid.sum())}


if __name__ == "__main__":
    print(measure_renormalisation())
