"""Attention rows through forward hooks, what both capture families share (paper §4.2, §4.4).

A capture computes softmax(Q_rows Kᵀ · scaling + mask) for chosen text rows only, beside a model
that keeps SDPA / flash attention. answer_rows picks the rows (the outputs that predict answer
tokens); gather_rows and gather_positions read rows or positions out of a batch; split_heads
splits a projection's output into heads; row_probs is the softmax, KV heads shared as in
grouped-query attention. RowCapture holds what every capture keeps: the rows, a store per
forward, the hooks' handles and the probabilities (B, L, H, R, N) the step reads.

Activation checkpointing: a pre-hook on the text model starts a new store at every forward;
during the recomputation in backward the hooks run the very same operations again (non-reentrant
checkpointing needs them to), but the first value written in a pass wins, so the recomputation
cannot overwrite what the step reads. Do not change the rows between a forward and its backward.

The hooks are the family's: aggregate.AttentionCapture (cross-attention: Mllama, IDEFICS) and
selfattn.SelfAttentionCapture (self-attention: Qwen2-VL); aggregate.attention_capture picks one.

    capture = aggregate.attention_capture(model, layers)   # the family's RowCapture
"""
import torch

from models import attention_module

# ---------------------------------------------------------------------------------------------
# rows: which text positions are read, and reading them
# ---------------------------------------------------------------------------------------------


def answer_rows(labels):
    """(B, R) text positions whose attention is captured, -1 padding: t - 1 for every answer token
    t (labels[t] != -100, t >= 1). Under teacher forcing the output at t - 1 predicts token t.
    Worked example: labels [[-100, -100, 7, 8]] -> [[1, 2]]."""
    per_sample = []
    for b in range(labels.shape[0]):
        answer = (labels[b] != -100).nonzero().flatten().tolist()
        per_sample.append([t - 1 for t in answer if t >= 1])
    R = max([len(r) for r in per_sample] + [0])
    rows = torch.full((labels.shape[0], R), -1, dtype=torch.long)
    for b, r in enumerate(per_sample):
        rows[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return rows


def gather_rows(x, rows):
    """x (B, heads, T, D), rows (B, R) with -1 padding -> (B, heads, R, D)."""
    at = rows.clamp(min=0).to(x.device)[:, None, :, None]  # (B, 1, R, 1)
    idx = at.expand(-1, x.shape[1], -1, x.shape[-1])
    return x.gather(2, idx)


def gather_positions(x, index):
    """x (B, T, ...) at index (B, K) -> (B, K, ...)."""
    trailing = [1] * (x.dim() - 2)
    at = index.to(x.device).view(*index.shape, *trailing)  # (B, K, 1, ...)
    idx = at.expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def split_heads(x, head_dim):
    """A projection's output (B, T, heads * D) -> (B, heads, T, D)."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def row_probs(attn, q, k, mask):
    """Attention probabilities of the chosen rows, as eager attention computes them (§4.2).

    q (B, H, R, D) normalised queries; k (B, KVH, N, D) normalised keys; mask (B, 1, R, N) additive.
    Head h reads KV head h // (H / KVH), as transformers' repeat_kv does; the KV heads are not
    repeated in memory. Scores in the model's dtype, softmax in float32 (as eager attention does).
    """
    B, H, R, D = q.shape
    kvh = k.shape[1]
    # groups of H / KVH heads share a key
    q = q.reshape(B, kvh, (H // kvh) * R, D)  # (B, KVH, G*R, D)
    scores = q @ k.transpose(-1, -2)  # (B, KVH, G*R, N)
    scores = scores.view(B, H, R, k.shape[2]) * attn.scaling  # (B, H, R, N)
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32)  # (B, H, R, N)


def check_parallel_projections(model, layers):
    """ValueError naming the first layer that has no parallel projections (eq. 15-16)."""
    for layer in layers:
        if not hasattr(attention_module(model, layer), "lavender_q_proj"):
            raise ValueError(f"learned=True but layer {layer} has no lavender_q_proj; "
                             f"call add_parallel_projections(model, layers) first")


def zero_padding_rows(probs, rows):
    """probs (B, L, H, R, N) with the padding rows (rows (B, R) == -1) set to 0, in place (stack's
    backward needs no output); skipped when no row is padding."""
    valid = rows >= 0  # (B, R)
    if bool(valid.all()):
        return probs
    return probs.mul_(valid.to(probs.device)[:, None, None, :, None])


# ---------------------------------------------------------------------------------------------
# the store every capture keeps
# ---------------------------------------------------------------------------------------------


class RowCapture:
    """The rows, the store of the current forward and the hooks' handles of a capture; the
    family's class adds _place_hooks (aggregate.AttentionCapture, selfattn.SelfAttentionCapture).
    learned=True reads the parallel attention A_d (eq. 15-16) instead of the pretrained A."""

    def __init__(self, model, layers, learned=False):
        self.model, self.layers, self.learned = model, list(layers), learned
        self.rows = None  # (B, R) set by set_rows
        self._store, self._scratch, self._handles = {}, {}, []
        self._probs = None
        if learned:
            check_parallel_projections(model, self.layers)
        self._place_hooks()

    def set_rows(self, rows):
        """rows: LongTensor (B, R) of text positions whose attention is captured; -1 = padding.
        None turns capturing off (the hooks then only return), e.g. before generate()."""
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)

    @property
    def probs(self):
        """(B, L, H, R, n_image_tokens) float32 probabilities of the last forward, pad rows 0."""
        if self._probs is None:
            missing = [self.layers[i] for i in range(len(self.layers)) if i not in self._store]
            if missing:
                raise RuntimeError(f"no attention captured for layers {missing}: call "
                                   f"set_rows(rows) before the forward, and pass pixel_values "
                                   f"(cross-attention layers are skipped without an image)")
            per_layer = [self._store[i] for i in range(len(self.layers))]
            probs = torch.stack(per_layer, dim=1)  # (B, L, H, R, N)
            self._probs = zero_padding_rows(probs, self.rows)
            # drop the per-layer copies; the keys keep a checkpoint's recomputation out
            self._store = dict.fromkeys(self._store)
        return self._probs

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles, self._store, self._scratch = [], {}, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def _hook(self, module, hook, pre=False):
        """Register a forward hook (pre=True: a pre-hook, with kwargs) and keep its handle."""
        if pre:
            handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            handle = module.register_forward_hook(hook)
        self._handles.append(handle)

    def _new_pass(self, module, args, kwargs):
        """A pre-hook on the text model: each forward starts a new store."""
        self._store, self._scratch, self._probs = {}, {}, None

    def _save(self, i, probs):
        self._store.setdefault(i, probs)  # the first write of a pass wins
