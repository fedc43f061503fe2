"""Stable Diffusion 3 as the teacher (§4.1, eq. 13-14): joint attention of a multimodal DiT.

SD3 (stabilityai/stable-diffusion-3-medium-diffusers) has no UNet and no cross-attention: each
of its transformer blocks runs ONE joint attention over the concatenated sequence [image tokens;
text tokens] (Esser et al. 2024, MM-DiT). The word map read here is the image -> text block of
those joint probabilities:

    P = softmax([Q_img; Q_txt] [K_img; K_txt]^T / sqrt(d))     over ALL N + T keys
    M = P[:N, N:]                                              (N image rows, T text columns)

M is the direct analogue of SD's attn2 map (extract.CrossAttentionCapture): for each image token,
the share of its attention that goes to each text token. Because the softmax also spans the image
keys, a row of M sums to at most 1, not to 1. JointCapture averages M over heads and blocks into
teachers.new_store's running sum; the N image tokens form the (H/patch) x (W/patch) grid of the
latent. This is the default map (--dit-map joint).

--dit-map output reads the attention's OUTPUT space instead, as ConceptAttention (Helbling et
al. 2025) does: O = P V, the joint attention's output before its projections (heads side by
side), split into image rows O_img (N, H d) and text rows O_txt (T, H d), and

    M_out = softmax over the CLIP text rows of O_img O_txt^T        (N, T_clip), rows sum to 1

ConceptAttention adds concept tokens of its own beside the prompt's and takes the softmax over
them alone; here the concepts are the answer's words, which the prompt holds already, and the
softmax spans every CLIP row (start, words, end, padding: the tokenizer's fixed length), so an
item's map does not depend on its batch; the store keeps its text columns. The joint map is the
default because the paper's target is an attention map like SD's cross-attention; the output
map's place on the toy DiT is measured in BENCHMARKS.md.

Sampling: SD3 is a rectified flow, x_sigma = (1 - sigma) x_0 + sigma * noise, its transformer
predicting the velocity v = noise - x_0 = dx/dsigma. The deterministic inversion is the Euler
inversion of that ODE on the flow scheduler's sigmas, from the clean latent (sigma 0) up to
noise (sigma 1), x_{s'} = x_s + (s' - s) v(x_s, s), and the denoising is the same Euler step
downwards from sigma 1 to 0 (FlowMatchEulerDiscreteScheduler's step). Attention is captured at
the denoising steps by default, as extract.py does; guidance 1 (the answer only) both ways.

The sd3 preset reads its folder's three encoders and builds the context as
StableDiffusion3Pipeline.encode_prompt does (encode_text): CLIP-L's and CLIP-G's penultimate
states concatenated (768 + 1280), zero-padded to T5's 4096 channels, T5's 256 states appended
along the sequence, pooled = both CLIPs' text_embeds concatenated (768 + 1280). The word map
reads the CLIP columns (the first 77), where extract.text_words' positions are; the softmax
still spans the T5 keys. The tiny-sd3 test preset: SD3Transformer2DModel and a 16-channel
AutoencoderKL at tiny size, and ONE CLIPTextModelWithProjection standing in for the three (its
penultimate states are the context, its text_embeds the pooled projection); toy-sd3
(toy_teachers.py) has the same one-encoder layout, trained on the miniature world.

    python extract.py --dm tiny-sd3 --data data.jsonl --out /tmp/attn    # random tiny SD3 (tests)
    python extract.py --dm sd3 --dm-path /models/sd3-medium --data data.jsonl --out attn_sd3/
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import hub
import teachers

# tiny-sd3: 32 px -> 16x16x16 latents (SD3's 16 channels) -> 8x8 tokens of 2x2 patches; two
# joint blocks (the last one context_pre_only, as SD3's), 2 heads of 8 channels; a 32-d CLIP.
TINY_SD3 = {
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=32),
    "vae": dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32,
                latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
    "transformer": dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16,
                        num_layers=2, attention_head_dim=8, num_attention_heads=2,
                        joint_attention_dim=32, caption_projection_dim=16,
                        pooled_projection_dim=32, pos_embed_max_size=16),
}
# --dit-map: the joint attention, or its output space (ConceptAttention)
DIT_MAPS = ("joint", "output")
# SD3 medium's scheduler config: sigmas shifted towards noise
SHIFT = 3.0
# T5's text length in StableDiffusion3Pipeline (its max_sequence_length)
T5_LENGTH = 256


def tiny_sd3(seed=0):
    """dict(transformer, vae, text_encoder, tokenizer, scheduler) of tiny-sd3, random, seeded."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    tokenizer = teachers.tiny_sd_tokenizer()
    torch.manual_seed(seed)
    ids = teachers.clip_ids(tokenizer)
    config = CLIPTextConfig(**ids, **TINY_SD3["text_encoder"])
    return dict(
        text_encoder=CLIPTextModelWithProjection(config),
        vae=AutoencoderKL(**TINY_SD3["vae"]),
        transformer=SD3Transformer2DModel(**TINY_SD3["transformer"]),
        tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT))


def load(name, path, hub_id, default_path, device="cpu", dtype=torch.float32):
    """The dm dict of an SD3 preset, frozen, eval mode; res = sample_size * the VAE's factor.
    hub_id, default_path: the preset's (models.PRESETS, models.preset_path).

    tiny-sd3 is built here; toy-sd3 reads its folder (toy_teachers.py); sd3 reads the hub's or
    --dm-path's folder in diffusers' layout with its three encoders (a clear SystemExit when
    there are none)."""
    if name == "tiny-sd3" and path is None:
        return teachers.frozen(tiny_sd3(), name, device, dtype)
    if name == "sd3":
        source, local = hub.weights_source("--dm", name, hub_id, path, "transformer/config.json",
                                           "--dm-path")
    else:
        # tiny-sd3 or toy-sd3 from a folder: one CLIP
        source, local = path or default_path, False
    try:
        dm = load_folder(source, local, 3 if name == "sd3" else 1, dtype)
    except (OSError, ValueError) as e:
        raise hub.load_error("--dm", name, source, e, hub_id, "--dm-path") from None
    return teachers.frozen(dm, name, device, dtype)


def load_folder(folder, local_files_only=False, encoders=1, dtype=None):
    """The parts of a folder in diffusers' SD3 layout: transformer/, vae/, scheduler/, and CLIP-L
    (text_encoder/, tokenizer/); encoders 3: CLIP-G (text_encoder_2/, tokenizer_2/) and T5
    (text_encoder_3/, tokenizer_3/) too, as stabilityai's SD3 folders have them; 1: toy-sd3's
    one CLIP (models.save_dm). T5 (4.7B parameters in SD3) is read in `dtype` directly, not
    in float32 first (19 GB)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers import T5EncoderModel
    if encoders == 1 and not (Path(folder) / "transformer" / "config.json").is_file():
        raise SystemExit(f"--dm toy-sd3 or tiny-sd3: no weights at {str(folder)!r}; make them "
                         f"with `python toy.py train-sd --dm toy-sd3`, or give --dm-path")
    parts = dict(transformer=SD3Transformer2DModel, vae=AutoencoderKL, tokenizer=CLIPTokenizer,
                 text_encoder=CLIPTextModelWithProjection,
                 scheduler=FlowMatchEulerDiscreteScheduler)
    if encoders == 3:
        parts.update(text_encoder_2=CLIPTextModelWithProjection, tokenizer_2=CLIPTokenizer,
                     text_encoder_3=T5EncoderModel, tokenizer_3=AutoTokenizer)
    local = dict(local_files_only=local_files_only)
    in_dtype = {"text_encoder_3": dict(dtype=dtype)} if dtype is not None else {}
    loaded = {}
    for part, cls in parts.items():
        loaded[part] = cls.from_pretrained(folder, subfolder=part, **local,
                                           **in_dtype.get(part, {}))
    return loaded


def encode_text(dm, texts):
    """(context (B, L, D), pooled (B, P)): the transformer's text conditioning, as
    StableDiffusion3Pipeline.encode_prompt builds it with guidance 1.

    sd3: CLIP-L's and CLIP-G's penultimate hidden states concatenated (77, 768 + 1280), zero-padded
    to T5's 4096 channels, T5's 256 states appended along the sequence (L = 77 + 256); pooled =
    both CLIPs' text_embeds concatenated (768 + 1280). tiny-sd3 and toy-sd3: one CLIP, its
    penultimate states and text_embeds. Either way column j below CLIP's length (sd3: 77) is
    CLIP token j, so extract.text_words' positions index the text columns of the joint
    sequence."""
    dtype = dm["transformer"].dtype
    states, pooled = [], []
    for tokenizer, encoder in ((dm["tokenizer"], dm["text_encoder"]),
                               (dm.get("tokenizer_2"), dm.get("text_encoder_2"))):
        if encoder is None:
            continue
        ids = teachers.token_ids(tokenizer, encoder, texts, encoder.device)
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])                            # (B, 77, D_i)
        pooled.append(out.text_embeds)                                  # (B, P_i)
    context, pooled = torch.cat(states, dim=-1), torch.cat(pooled, dim=-1)
    if "text_encoder_3" in dm:
        t5 = dm["text_encoder_3"]
        ids = dm["tokenizer_3"](texts, padding="max_length", max_length=T5_LENGTH,
                                truncation=True, add_special_tokens=True,
                                return_tensors="pt").input_ids
        t5_states = t5(ids.to(t5.device))[0]                           # (B, 256, 4096)
        # zero channels up to T5's width
        width = t5_states.shape[-1] - context.shape[-1]
        context = F.pad(context, (0, width))
        context = torch.cat([context, t5_states.to(context.dtype)], dim=-2)
    return context.to(dtype), pooled.to(dtype)


# ---- the capture: a joint attention processor that also returns M = P[:N, N:] ----

class JointCapture:
    """JointAttnProcessor2_0's computation (diffusers attention_processor.py), plus the image ->
    text probabilities of the joint softmax, averaged over heads, added into store["sum"].

    The output is SDPA's, exactly as the default processor computes it; the probabilities of the
    image rows are computed beside it (the scores over all N + T keys, softmax in fp32), so the
    captured map cannot change what the model does. kind "output": the output-space map M_out
    (module docstring) instead, from the same SDPA output.
    """

    def __init__(self, store, kind="joint", text_length=None):
        if kind not in DIT_MAPS:
            raise ValueError(f"--dit-map {kind!r}: give one of {', '.join(DIT_MAPS)}")
        # the output map's softmax spans the first text_length text rows (dm_attention: CLIP's,
        # padded, the same for every item, so an item's map does not depend on its batch's
        # longest text; None: every text row)
        self.store, self.kind, self.text_length = store, kind, text_length

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        B, N, _ = hidden_states.shape                                   # N image tokens
        H = attn.heads

        def heads(x, norm=None):                                        # (B, H, L, d)
            x = x.view(B, -1, H, x.shape[-1] // H).transpose(1, 2)
            return x if norm is None else norm(x)
        q = heads(attn.to_q(hidden_states), attn.norm_q)
        k = heads(attn.to_k(hidden_states), attn.norm_k)
        v = heads(attn.to_v(hidden_states))
        c = encoder_hidden_states                                       # (B, T, D) text tokens
        q = torch.cat([q, heads(attn.add_q_proj(c), attn.norm_added_q)], dim=2)  # (B, H, N+T, d)
        k = torch.cat([k, heads(attn.add_k_proj(c), attn.norm_added_k)], dim=2)
        v = torch.cat([v, heads(attn.add_v_proj(c))], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(B, -1, H * q.shape[-1]).to(q.dtype)
        if self.store["on"] and self.kind == "joint":
            scale = 1 / math.sqrt(q.shape[-1])                          # SDPA's default scale
            q_image = q[:, :, :N].float()                               # (B, H, N, d)
            scores = (q_image * scale) @ k.float().transpose(-1, -2)    # (B, H, N, N+T)
            self.accumulate(scores.softmax(dim=-1)[..., N:])            # (B, H, N, T) eq. 13
        if self.store["on"] and self.kind == "output":
            text = out[:, N:N + self.text_length].float()               # (B, T_clip, H d)
            similarity = out[:, :N].float() @ text.transpose(-1, -2)     # (B, N, T_clip)
            self.accumulate(similarity.softmax(dim=-1)[:, None])         # (B, 1, N, T_clip)
        img, txt = out[:, :N], out[:, N:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return attn.to_out[1](attn.to_out[0](img)), txt

    def accumulate(self, probs):
        """probs (B, H, N, T) -> the store's running sum (B, columns, h, w) over blocks."""
        store, (h, w) = self.store, self.store["grid"]
        T = store["columns"]
        m = probs[..., :T].mean(dim=1).transpose(1, 2)                  # (B, T, N) heads averaged
        m = m.reshape(len(m), T, h, w)                                  # (B, T, h, w) token grid
        if store["sum"] is None:
            store["sum"] = torch.zeros_like(m)
        store["sum"] += m
        store["count"] += 1


def capturing(transformer, store, kind="joint", text_length=None):
    """teachers.capturing for the joint ("attn") modules: JointCapture (of map `kind`, over
    text_length CLIP rows) for the block, then the original processors; SD3.5's image-only attn2
    modules (dual attention) keep theirs."""
    capture = JointCapture(store, kind, text_length)
    return teachers.capturing(transformer, store, capture, ".attn.processor")


# ---- flow inversion, then denoising (Euler both ways) ----

def flow_sigmas(scheduler, steps):
    """The flow scheduler's `steps` sigmas, descending from 1 to 0 (terminal 0 included)."""
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.float().cpu()                               # (steps + 1,)


def velocity(dm, x, sigma, context, pooled):
    """v(x, sigma) of the transformer; its timestep is sigma * 1000, as the pipeline passes it."""
    t = torch.full((len(x),), float(sigma) * 1000, device=x.device)
    transformer = dm["transformer"]
    dtype = transformer.dtype
    out = transformer(hidden_states=x.to(dtype), timestep=t.to(dtype),
                      encoder_hidden_states=context, pooled_projections=pooled)
    return out.sample.float()


def invert_and_denoise(dm, latents, context, pooled, inversion_steps, denoise_steps, store=None,
                       capture_steps="denoise"):
    """Euler inversion sigma 0 -> 1 on the flipped grid, then Euler denoising 1 -> 0:
    x_{s'} = x_s + (s' - s) v(x_s, s) both ways (fp32 latent path)."""
    up = flow_sigmas(dm["scheduler"], inversion_steps).flip(0)          # 0, ..., 1
    down = flow_sigmas(dm["scheduler"], denoise_steps)                  # 1, ..., 0
    for phase, grid in (("inversion", up), ("denoise", down)):
        if store is not None:
            if capture_steps == "inversion" and phase == "denoise":
                break  # nothing more to capture
            store["on"] = capture_steps in ("all", phase)
        for s, s_next in zip(grid[:-1], grid[1:]):
            v = velocity(dm, latents, s, context, pooled)
            latents = latents + (s_next - s) * v
    return latents


@torch.no_grad()
def dm_attention(dm, images, texts, columns, inversion_steps=5, denoise_steps=10,
                 capture_steps="denoise", layers=None, kind="joint"):
    """extract.dm_attention for SD3: mean image -> text joint attention (B, columns, h/p, w/p)
    over heads, blocks and the captured steps (kind "output": the output-space map M_out)."""
    if layers is not None:
        raise ValueError(f"--layers {layers}: a DiT has one token grid, give --layers all")
    latents = teachers.encode_image(dm, images)                      # (B, 16, h, w)
    context, pooled = encode_text(dm, texts)
    p = dm["transformer"].config.patch_size
    store = teachers.new_store((latents.shape[-2] // p, latents.shape[-1] // p), columns)
    clip_length = context.shape[1] - (T5_LENGTH if "text_encoder_3" in dm else 0)
    with capturing(dm["transformer"], store, kind, clip_length):
        invert_and_denoise(dm, latents, context, pooled, inversion_steps, denoise_steps, store,
                           capture_steps)
    return store["sum"] / store["count"]                                # (B, columns, h, w)
