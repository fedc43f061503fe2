"""Text-to-image attention of self-attention-only VLMs (paper §4.4 "Self-Attention Only"; eq. 15-16).

The paper's self-attention model, MiniCPM-Llama3-V-2.5, has no class in transformers; Qwen2-VL and
Qwen2.5-VL (qwen.py, family "qwen2vl") stand for it. There text and image tokens are one causal
sequence, so a word's map is a row of a self-attention layer read at the image's columns: §4.4's
three steps, (1) which tokens are the image, (2) the causal and padding mask, (3) the image tokens
put back on their grid and resampled to 32x32.

1. Capture (SelfAttentionCapture, the store and API of aggregate.AttentionCapture): forward hooks
   read each chosen layer's q_proj / k_proj outputs (LoRA included: the hooks sit on the modules
   PEFT made), apply RoPE with the layer's own `position_embeddings` (M-RoPE's cos / sin) through
   the modeling file's own apply_rotary_pos_emb, and compute softmax(Q_rows Kᵀ · scaling + mask)
   for the chosen rows only, KV heads shared as the model shares them. The model keeps SDPA /
   flash attention. Learned aggregation (eq. 15-16): `lavender_q_proj` / `lavender_k_proj` on the
   q_proj / k_proj inputs, the pretrained biases added, the same RoPE and mask.
2. Renormalised over the image (RENORMALISE): a self-attention row also spends mass on text tokens
   and on attention sinks; by default each row's image columns are a distribution of their own,
   softmax over the image keys alone, which is what a cross-attention layer computes from the same
   scores (README, "Model families", has the measurement and the reason).
3. Grid (qwen.grid_maps, the family's vision_geometry): image_grid_thw (1, h, w) -> (h/2) x (w/2)
   tokens, row-major, covering the whole image; area-resampled to 32x32.

Aggregations, words and the Aligner are aggregate.py's, unchanged; aggregate.attention_capture
picks this capture for the family.

    python -m pytest -q tests/test_selfattn.py
"""
import inspect
import tempfile

import numpy as np
import torch
from PIL import Image

import data
from aggregate import AttentionCapture, answer_rows, row_probs
from aligner import min_max
from models import TINY_CORPUS, attention_layers, attention_module, base_model, tiny_qwen2vl
from qwen import grid_maps

# Each row's image columns renormalised to sum to 1 (softmax over the image keys alone); False
# keeps the share of the row's mass that the image gets (softmax over every key, image columns read).
RENORMALISE = True


def image_positions(input_ids, image_token_id):
    """(positions (B, N) of each sample's image tokens, N the most in any sample (padding repeats
    the last), valid (B, N) bool). ValueError naming the sample when it has no image or more than
    one (two runs of image tokens): a map is of one image.
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
    """Additive mask (B, 1, R, N) of causal attention: row t sees key j when j <= t and the key is
    valid (not padding); rows (B, R) and keys (B, N) are text positions."""
    allowed = (keys[:, None, :] <= rows[:, :, None]) & valid[:, None, :]  # (B, R, N)
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]  # (B, 1, R, N)


def _take(x, index):
    """x (B, T, ...) at index (B, K) -> (B, K, ...)."""
    idx = index.to(x.device).view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


class SelfAttentionCapture(AttentionCapture):
    """Capture text-to-image rows of chosen self-attention layers (Qwen2-VL, Qwen2.5-VL).

        capture = SelfAttentionCapture(model, aligned_layers(model))   # after PEFT wraps q_proj
        capture.set_rows(rows)           # (B, R) text positions, -1 = padding
        out = model(**batch)             # input_ids with one run of image tokens per sample
        capture.probs                    # (B, L, H, R, N image tokens), differentiable

    The store, set_rows, probs, remove and the activation-checkpointing rule (the first value of a
    pass wins) are AttentionCapture's; the hooks (_place_hooks) are this family's. renormalise:
    RENORMALISE by default.
    """

    def __init__(self, model, layers, learned=False, renormalise=RENORMALISE):
        self.renormalise, self._text = renormalise, {}
        config = base_model(model).config
        self.image_token_id = config.image_token_id
        self.merge = config.vision_config.spatial_merge_size
        super().__init__(model, layers, learned)

    def _place_hooks(self):
        """A new store at each forward of Qwen2VLModel (it sees input_ids and the padding mask),
        the q/k projections' outputs, the rows after each chosen self-attention module."""
        vlm = base_model(self.model).model
        self._handles.append(vlm.register_forward_pre_hook(self._new_pass, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            attn = attention_module(self.model, layer)
            rope = inspect.getmodule(type(attn)).apply_rotary_pos_emb  # the modeling file's own
            self._handles.append(attn.register_forward_pre_hook(self._pre_hook(i, rope), with_kwargs=True))
            if not self.learned:
                for name in ("q", "k"):
                    proj = getattr(attn, name + "_proj")
                    self._handles.append(proj.register_forward_hook(self._keep(i, name, attn.head_dim)))
                self._handles.append(attn.register_forward_hook(self._post_hook(i)))

    # --- hooks ---
    def _new_pass(self, module, args, kwargs):
        self._store, self._scratch, self._probs, self._text = {}, {}, None, {}
        if self.rows is None:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise RuntimeError("SelfAttentionCapture needs input_ids (the image tokens are found there)")
        keys, valid = image_positions(input_ids, self.image_token_id)  # (B, N)
        mask = kwargs.get("attention_mask")
        if not self.renormalise:  # every key, the image's read afterwards
            self._text.update(image=keys, image_valid=valid)  # (B, N) each
            keys = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        self._text.update(keys=keys, valid=valid.to(input_ids.device), rows=self.rows.clamp(min=0))

    def _pre_hook(self, i, rope):
        def hook(attn, args, kwargs):
            if self.rows is None:
                return None
            cos, sin = kwargs["position_embeddings"]  # (B, T, D): M-RoPE, recomposed
            rows, keys = self._text["rows"], self._text["keys"]
            # RoPE of the rows' queries and of the keys at their own positions (the model's function
            # rotates a pair (q, k) with one cos / sin: each side is passed as both, one result kept)
            rotary = {"q": lambda x: rope(x, x, _take(cos, rows), _take(sin, rows))[0],  # (B, H, R, D)
                      "k": lambda x: rope(x, x, _take(cos, keys), _take(sin, keys))[0]}  # (B, KVH, N, D)
            mask = key_mask(rows.to(cos.device), keys.to(cos.device), self._text["valid"], cos.dtype)
            self._scratch[i] = {"rope": rotary, "mask": mask}
            if not self.learned:
                return None
            # eq. 15-16: A_d from the parallel projections on q_proj's / k_proj's input
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, d)
            dtype = attn.lavender_q_proj.weight.dtype
            q = attn.lavender_q_proj(_take(hidden, rows).to(dtype)) + _bias(attn.q_proj)  # (B, R, H*D)
            k = attn.lavender_k_proj(_take(hidden, keys).to(dtype)) + _bias(attn.k_proj)  # (B, N, KVH*D)
            self._save(i, self._probs_of(i, attn, _heads(q, attn.head_dim), _heads(k, attn.head_dim)))
            return None
        return hook

    def _keep(self, i, name, head_dim):
        def hook(proj, args, output):  # output (B, T, heads * D): kept at the rows (q) or keys (k)
            if self.rows is not None and i in self._scratch:
                at = self._text["rows"] if name == "q" else self._text["keys"]
                self._scratch[i][name] = _heads(_take(output, at), head_dim)  # (B, heads, R or N, D)
        return hook

    def _post_hook(self, i):
        def hook(attn, args, output):
            scratch = self._scratch.get(i)
            if scratch is None or "k" not in scratch:
                return None
            self._save(i, self._probs_of(i, attn, scratch["q"], scratch["k"]))
        return hook

    def _probs_of(self, i, attn, q, k):
        """q (B, H, R, D), k (B, KVH, N, D) before RoPE -> (B, H, R, image tokens) probabilities."""
        scratch = self._scratch.pop(i)
        probs = row_probs(attn, scratch["rope"]["q"](q), scratch["rope"]["k"](k), scratch["mask"])
        if not self.renormalise:  # softmax over every key: the image's columns read out
            image = self._text["image"].to(probs.device)[:, None, None, :]  # (B, 1, 1, N)
            probs = probs.gather(-1, image.expand(*probs.shape[:3], -1))  # (B, H, R, N)
            probs = probs * self._text["image_valid"].to(probs.device)[:, None, None, :]  # no padding column
        return probs  # (B, H, R, N)


def _bias(proj):
    """The pretrained bias of q_proj / k_proj (under LoRA too); the parallel projections share it."""
    return getattr(proj, "base_layer", proj).bias


def _heads(x, head_dim):
    """(B, K, heads * D) -> (B, heads, K, D)."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


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
            Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(f"{folder}/{i}.png")
            items.append({"id": str(i), "image_path": f"{folder}/{i}.png", "question": TINY_CORPUS[i % 5],
                          "answer": TINY_CORPUS[5 + i % 9]})
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
    maps = {name: min_max(grid_maps(p.mean(dim=(1, 2)), batch["image_grid_thw"], capture.merge))[valid]
            for name, p in (("raw", raw), ("renormalised", renormalised),
                            ("raw with sink", raw * heads[:, None, None]))}  # (rows, 32, 32) each
    per_row = mass.permute(0, 3, 1, 2)[valid]  # (rows, L, H)
    return {"image mass (min, median, max)": [round(float(v), 4) for v in
                                              (per_row.min(), per_row.median(), per_row.max())],
            "MSE raw vs renormalised": float(((maps["raw"] - maps["renormalised"]) ** 2).mean()),
            "MSE raw, sink vs none": float(((maps["raw"] - maps["raw with sink"]) ** 2).mean()),
            "rows": int(valid.sum())}


if __name__ == "__main__":
    print(measure_renormalisation())
