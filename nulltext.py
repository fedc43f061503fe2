"""Null-text inversion (Mokady et al. 2022, §3, Algorithm 1): `extract.py --inversion null-text`.

The paper's extraction uses "a shortened inversion process (Mokady et al., 2022)" (Lavender §5(1)).
DDIM inversion with guidance 1, conditioned on the answer, gives the pivot trajectory
z*_0 (the image's latent), z*_1, ..., z*_T. Classifier-free guidance with w > 1 then drifts away
from it, so null-text inversion goes back from z_T = z*_T and, at each denoising step t, tunes the
unconditional ("null", the empty prompt's) text embedding ∅_t for N Adam iterations so that the
guided DDIM step lands on the pivot (Algorithm 1):

    min over ∅_t of || z*_{t-1} - DDIM_step(z_t, t, ε) ||²
    with ε = ε(z_t, ∅_t) + w (ε(z_t, c) - ε(z_t, ∅_t))              (classifier-free guidance, w)

∅_t starts from ∅_{t+1} (the empty prompt's embedding at the first step), and z_{t-1} is the
guided step with the tuned ∅_t. The attention maps are those of the guided denoising with the
tuned ∅_t, conditional branch only (the unconditional one attends over the empty prompt: not a
word map). That denoising is the trajectory the optimisation itself walks, so the maps are captured
there, in the conditional UNet call each step makes once, not in a second pass (`guided_denoise`
is that second pass; tests/test_nulltext.py checks that both give the same maps).

Follows Prompt-to-Prompt's null_text_w_ptp.ipynb (https://github.com/google/prompt-to-prompt,
NullInversion.null_optimization): N = 10, lr 1e-2 (1 - i/100) at denoising step i, stop once the
loss is below 1e-5 + 2e-5 i, w = 7.5.

    python extract.py --dm tiny-sd --data data.jsonl --out /tmp/attn --inversion null-text
"""
import torch

import teachers

# ---- Prompt-to-Prompt's settings (null_text_w_ptp.ipynb) ----
# w, the guidance scale of the denoising the null text is tuned for
GUIDANCE = 7.5
# N, Adam iterations per denoising step
ITERATIONS = 10


def learning_rate(i):
    """Adam's rate at denoising step i (0 at z_T)."""
    return 1e-2 * (1.0 - i / 100.0)


def stop_loss(i):
    """An item stops its iterations once its MSE falls below this at step i."""
    return 1e-5 + 2e-5 * i


# ---- the UNet calls ----

def noise(unet, latents, t, context, encoder_attention_mask=None):
    """ε_θ(z_t, t, context) (B, 4, h, w) in fp32; encoder_attention_mask: models.context_mask's
    (None for SD, whose UNet attends to all 77 positions)."""
    out = unet(latents.to(unet.dtype), t, encoder_hidden_states=context.to(unet.dtype),
               encoder_attention_mask=encoder_attention_mask)
    return out.sample.float()


def guided(eps_null, eps_text, w):
    """Classifier-free guidance (Ho & Salimans 2022): ε_∅ + w (ε_c - ε_∅)."""
    return eps_null + w * (eps_text - eps_null)


def capture(store, on):
    """Turn the capture on or off: the capture processors add only while store["on"]."""
    if store is not None:
        store["on"] = on


# ---- pivot, optimisation, guided denoising ----

@torch.no_grad()
def ddim_pivot(unet, latents, context, inverse, store=None, capture_steps="denoise", mask=None):
    """[z*_0, ..., z*_T]: DDIM inversion with guidance 1 conditioned on the text (the pivot).

    latents (B, 4, h, w): z*_0, the image's latent; inverse: a DDIMInverseScheduler whose grid
    the denoising revisits (extract.ddim_grids with equal step counts). With a store, captures
    the inversion's attention when capture_steps is "inversion" or "all".
    """
    capture(store, capture_steps in ("inversion", "all"))
    pivot = [latents]
    for t in inverse.timesteps:
        eps = noise(unet, pivot[-1], t, context, mask)                         # (B, 4, h, w)
        pivot.append(inverse.step(eps, t, pivot[-1]).prev_sample)
    return pivot                                                            # T + 1 x (B, 4, h, w)


def optimise_null(unet, z, t, eps_text, target, null, forward, w, iters, i, mask=None):
    """∅_t (B, 77, D): null embeddings tuned so the guided step from z_t lands on target z*_{t-1}.

    One embedding and one Adam state per item: an item stops when its own loss is below
    stop_loss(i), the others go on, so an item's ∅_t does not depend on its batch. Only the
    unconditional branch has a gradient; eps_text (B, 4, h, w) is fixed for the step.
    """
    params = [n.detach().clone().float().requires_grad_(True) for n in null]    # B x (77, D)
    adam = torch.optim.Adam(params, lr=learning_rate(i))
    active = list(range(len(params)))                                          # items still tuning
    for _ in range(iters):
        if not active:
            break
        rows = torch.tensor(active, device=z.device)
        with torch.enable_grad():
            z_rows = z[rows]                                                   # (A, 4, h, w)
            nulls = torch.stack([params[b] for b in active])                   # (A, 77, D)
            mask_rows = None if mask is None else mask[rows]
            eps_null = noise(unet, z_rows, t, nulls, mask_rows)
            eps = guided(eps_null, eps_text[rows], w)
            rec = forward.step(eps, t, z_rows).prev_sample
            err = (rec - target[rows]).pow(2).flatten(1)                       # (A, 4 * h * w)
            # Adam's steps do not depend on the loss's scale (up to its eps): the sum rather than
            # P2P's mean makes the gradient 4hw times larger (16384 at sd14), away from fp16's
            # underflow in a half-precision UNet; autograd.grad leaves the UNet's weights untouched
            grads = torch.autograd.grad(err.sum(), [params[b] for b in active])
        for b, g in zip(active, grads):
            params[b].grad = g
        # items without a .grad this round stay put
        adam.step()
        for b in active:
            params[b].grad = None
        # the MSE before this update, as P2P tests it
        losses = err.detach().mean(1).tolist()
        active = [b for b, loss in zip(active, losses) if loss >= stop_loss(i)]
    return torch.stack([p.detach() for p in params])                            # (B, 77, D)


def null_text_inversion(unet, pivot, context, null, forward, w=GUIDANCE, iters=ITERATIONS,
                        store=None, capture_steps="denoise", masks=(None, None)):
    """(nulls, z_0): Algorithm 1's outer loop from z_T = z*_T; nulls[i] (B, 77, D) is ∅ at the
    i-th denoising step of forward (the same grid as the pivot's inversion, reversed).

    context (B, 77, D): the text's embedding; null (B, 77, D): the empty prompt's, ∅'s start.
    With a store, captures the conditional branch's attention (capture_steps "denoise", "all").
    masks: (text's, null's) encoder_attention_mask, None for SD.
    """
    on = capture_steps in ("denoise", "all")
    z, nulls = pivot[-1], []
    for i, t in enumerate(forward.timesteps):
        capture(store, on)
        with torch.no_grad():
            eps_text = noise(unet, z, t, context, masks[0])                    # (B, 4, h, w)
        capture(store, False)
        target = pivot[-2 - i]                                                 # z*_{t-1}
        null = optimise_null(unet, z, t, eps_text, target, null, forward, w, iters, i, masks[1])
        nulls.append(null)
        # z_{t-1}: the guided step with the tuned ∅_t
        with torch.no_grad():
            eps_null = noise(unet, z, t, null, masks[1])
            eps = guided(eps_null, eps_text, w)
            z = forward.step(eps, t, z).prev_sample
    return nulls, z


@torch.no_grad()
def guided_denoise(unet, z, context, nulls, forward, w=GUIDANCE, store=None, masks=(None, None)):
    """z_0 from z (B, 4, h, w) by classifier-free-guided DDIM, nulls[i] (B, 77, D) the unconditional
    embedding at step i; a store captures the conditional branch only."""
    for t, null in zip(forward.timesteps, nulls):
        capture(store, True)
        eps_text = noise(unet, z, t, context, masks[0])
        capture(store, False)
        eps_null = noise(unet, z, t, null, masks[1])
        eps = guided(eps_null, eps_text, w)
        z = forward.step(eps, t, z).prev_sample
    return z


def empty_prompt(dm, n):
    """The empty prompt's text embedding (n, 77, D): ∅ before tuning (SD's unconditional input)."""
    ids = teachers.token_ids(dm["tokenizer"], dm["text_encoder"], [""] * n, dm["unet"].device)
    with torch.no_grad():
        states = dm["text_encoder"](ids)[0]                                   # (n, 77, D)
        return states.float()
