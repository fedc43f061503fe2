"""More diffusion teachers for Lavender's target (§4.1, eq. 13-14): Stable Diffusion 2.1 and SDXL.

extract.py makes the target p_DM(a | x, y) of eq. 7-9 from any UNet of diffusers'
UNet2DConditionModel: the same DDIM inversion and denoising, the same CrossAttentionCapture on
every attn2 module, the same word rule (extract.text_words) and the same attn/<id>.safetensors
store (32x32 maps, words, settings), so training reads every teacher alike. This file holds what
differs between the teachers: the tiny test counterparts' configs and builders, SDXL's second
text encoder, and how each family turns the answer into the UNet's conditioning (encode_text):

- sd21 (stabilityai/stable-diffusion-2-1, 768 px): linear projections in the transformer blocks,
  head counts (5, 10, 20, 20), 1024-d context from OpenCLIP-H (CLIPTextModel, 23 layers in
  diffusers' conversion), upcast attention, a v-prediction DDIM schedule; its tokenizer pads
  with "!", not the end token. DDIMScheduler and DDIMInverseScheduler read prediction_type from
  the config (extract.ddim_grids keeps it), so the UNet's v is turned into x_0 and ε as trained.
- sdxl (stabilityai/stable-diffusion-xl-base-1.0, 1024 px): two text encoders (CLIP-L, OpenCLIP
  bigG with projection); the context is both encoders' penultimate hidden states concatenated
  (768 + 1280 = 2048) and the UNet adds "text_time" conditioning: encoder 2's pooled text embeds
  and the size ids (StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids). Its
  attention is at the two inner levels only: 64x64 and 32x32 latents at 1024 px.

Default layers (models.PRESETS "layers", downsampling factors of the latent grid): sd14 reads
factor 4, its 16x16 layers (Prompt-to-Prompt's), where DAAM reads every level but 8x8.
sd21: factor 4 too, 24x24 at 768 px. SD 2.x has SD 1.x's four levels with attention at the
first three and in the mid block, so factor 4 is the same place in the UNet (the third level,
its 5 attn2 modules of 16); it departs from DAAM as sd14 does, and at 768 px it is already
finer than sd14's 16x16. sdxl: factor 4, its 32x32 layers (the third level and the mid block,
10 transformer layers each: 60 of its 70 attn2 modules). They are SDXL's innermost level, the
role 16x16 plays in SD 1.x, and their grid is the store's 32x32, so no map is resampled; the
other level (64x64, 10 modules) is the one DAAM's rule (every level but the coarsest) adds.

    python extract.py --dm tiny-sdxl --data data.jsonl --out /tmp/attn    # random tiny SDXL (tests)
    python extract.py --dm sdxl --dm-path /models/sdxl-base --data data.jsonl --out attn/
"""
import contextlib
import copy

import numpy as np
import torch

# SDXL's parts beyond SD's (unet/ vae/ text_encoder/ tokenizer/ scheduler/), in its folder layout
SECOND_ENCODER = ("text_encoder_2", "tokenizer_2")

# ---- the CLIP tokenizer of every tiny and toy DM preset, built in memory ----

# tiny-sd's CLIP vocabulary: every character below alone and as a word end, and these words whole.
TINY_SD_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()/&"
TINY_SD_WORDS = ("a red blue green circle square triangle left right of the is two three yes no "
                 "dog cat what colour shape how many there").split()


def clip_tokenizer(words, alphabet, max_length=None):
    """A CLIPTokenizer built in memory: every character of `alphabet` alone and as a word end
    ("r", "r</w>"), and each of `words` one token.

    CLIP's BPE marks a word's last piece with "</w>"; each word gets the merges that build it from
    what the earlier merges leave ("r"+"e" -> "re", "re"+"d</w>" -> "red</w>"), so it becomes one
    token, and any other word falls back to pieces, as SD's tokenizer splits rare words.
    max_length: the padded text length (SD 1.x: 77); CLIP pads with its end token.
    """
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for word in words:
        # tokenize with the merges so far (lowest rank first, as BPE does), then add merges that
        # join what is left; a new merge ranks after every earlier one, so no earlier word changes
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pairs = list(zip(pieces, pieces[1:]))
            ranks = [merges.index(p) if p in merges else len(merges) for p in pairs]
            k = int(np.argmin(ranks))
            if ranks[k] == len(merges):
                merges.append((pieces[k], pieces[k + 1]))
            pieces[k:k + 2] = [pieces[k] + pieces[k + 1]]
            vocab.setdefault(pieces[k], len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    if max_length is not None:
        tokenizer.model_max_length = max_length
    for word in words:
        assert len(tokenizer.tokenize(word)) == 1, f"{word!r} is not one CLIP token"
    return tokenizer


def clip_ids(tokenizer, pad_token_id=1):
    """The vocabulary size and special token ids a CLIPTextConfig takes for a clip_tokenizer: its
    start and end tokens are ids 0 and 1, and it pads with the end token (1) unless told
    otherwise (SD 2's "!")."""
    return dict(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1,
                pad_token_id=pad_token_id)


def tiny_sd_tokenizer():
    """The CLIP tokenizer of the tiny DM presets (tiny-sd, tiny-sd21, tiny-sdxl, tiny-sd3)."""
    return clip_tokenizer(TINY_SD_WORDS, TINY_SD_ALPHABET)


# ---- tiny counterparts: each real preset's structure at tiny-sd's size ----
# tiny-sd21: tiny-sd's VAE (32 px -> 16x16 latents) and two attention levels (16x16, 8x8), with
# SD 2's features: linear projections, head counts growing with depth (SD 2: 5, 10, 20, 20; here
# 2, 4, 16-channel heads as SD 2's 64-channel), upcast attention, a gelu text encoder.
# tiny-sdxl: three levels, attention at the inner two only (8x8, 4x4 of 16x16 latents: SDXL's
# 64x64 and 32x32 of 128x128), more transformer layers deeper (SDXL: 1, 2, 10; here 1, 1, 2),
# two text encoders of different widths (32 + 48 = 80-d context) and "text_time" conditioning
# (6 size ids of 8 channels each + encoder 2's 48-d projection = 96).
TINY_SIZES = {
    "tiny-sd21": {
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu"),
        "vae": dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32),
        "unet": dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D",) * 2,
                     up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32,
                     attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                     norm_num_groups=8)},
    "tiny-sdxl": {
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77),
        "text_encoder_2": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=77,
                               hidden_act="gelu", projection_dim=48),
        "vae": dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32,
                    scaling_factor=0.13025),
        "unet": dict(sample_size=16, block_out_channels=(16, 32, 64), layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 2, 4),
                     cross_attention_dim=32 + 48, use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 48, norm_num_groups=8)},
}


def tiny(name, tokenizer, scheduler, seed=0):
    """dict(vae, unet, text_encoder[, text_encoder_2], tokenizer[, tokenizer_2], scheduler) of
    tiny-sd21 or tiny-sdxl (TINY_SIZES), random weights, deterministic by seed.

    tokenizer: a CLIP tokenizer whose start and end tokens are ids 0 and 1 (clip_tokenizer);
    scheduler: SD's DDIM schedule (models.sd_scheduler). tiny-sd21 pads with "!" and predicts v,
    as SD 2.1; tiny-sdxl's second tokenizer is the same BPE padding with "!", as SDXL's.
    """
    if name == "tiny-sd21":
        tokenizer, scheduler = sd2_style(tokenizer, scheduler)
    return tiny_parts(TINY_SIZES[name], tokenizer, scheduler, seed)


def sd2_style(tokenizer, scheduler):
    """(tokenizer, scheduler) as SD 2.x has them: the tokenizer padding with "!", not its end
    token, and the DDIM schedule predicting v."""
    from diffusers import DDIMScheduler
    tokenizer.pad_token = "!"
    return tokenizer, DDIMScheduler.from_config(scheduler.config, prediction_type="v_prediction")


def tiny_parts(sizes, tokenizer, scheduler, seed=0):
    """The parts `sizes` names (vae, unet, text_encoder, text_encoder_2: their configs), random
    weights, deterministic by seed; with text_encoder_2, SDXL's second tokenizer (the same BPE,
    padding with "!") beside `tokenizer`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    dm = dict(tokenizer=tokenizer, scheduler=scheduler)
    if "text_encoder_2" in sizes:
        dm["tokenizer_2"] = copy.deepcopy(tokenizer)
        dm["tokenizer_2"].pad_token = "!"
    encoders = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    torch.manual_seed(seed)
    networks = {"vae": AutoencoderKL, "unet": UNet2DConditionModel}
    for part, config in sizes.items():
        if part in encoders:
            own_tokenizer = dm["tokenizer_2" if part.endswith("_2") else "tokenizer"]
            ids = clip_ids(tokenizer, own_tokenizer.pad_token_id)
            dm[part] = encoders[part](CLIPTextConfig(**ids, **config))
        else:
            dm[part] = networks[part](**config)
    return dm


# ---- loading: SDXL's second text encoder, and the dtype of each part ----

def load_second_encoder(folder, local_files_only=False):
    """{text_encoder_2, tokenizer_2} of an SDXL folder (or hub id) in diffusers component layout."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer
    local = dict(local_files_only=local_files_only)
    encoder = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2",
                                                          **local)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", **local)
    return dict(text_encoder_2=encoder, tokenizer_2=tokenizer)


def part_dtype(dm, part, dtype):
    """The dtype a dm part runs in: `dtype`, but SDXL's VAE stays float32 under float16, as
    diffusers keeps it (its config's force_upcast): its activations overflow float16's range.
    SD 1.x and 2.x's VAE runs in float16 as their pipelines run it."""
    if part == "vae" and "text_encoder_2" in dm and dtype == torch.float16:
        return torch.float32
    return dtype


def frozen(dm, name, device="cpu", dtype=torch.float32):
    """dm with its networks (VAE, UNet or SD3's transformer, text encoders) in `dtype` (SDXL's VAE
    excepted: part_dtype) on `device`, frozen, in eval mode; res = the denoiser's
    sample_size * the VAE's downsampling factor, and its preset name."""
    parts = ("vae", "unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    for part in [p for p in parts if p in dm]:
        own_dtype = part_dtype(dm, part, dtype)
        # only when it changes: diffusers warns on any dtype .to(), even a no-op
        if dm[part].dtype != own_dtype:
            dm[part].to(dtype=own_dtype)
        dm[part].to(device=device).eval().requires_grad_(False)
    denoiser = dm["unet"] if "unet" in dm else dm["transformer"]
    sample = np.atleast_1d(denoiser.config.sample_size)[0]
    scale = 2 ** (len(dm["vae"].config.block_out_channels) - 1)  # the VAE's downsampling
    dm.update(res=int(sample * scale), name=name)
    return dm


# ---- the attention store and the capture processors (extract.py's UNets, mmdit.py's DiTs) ----

def new_store(grid, columns, factors=None):
    """The running sum the capture processors share: maps of `columns` text columns on the latent
    `grid` (h, w), from the layers of the downsampling `factors` (None: every layer)."""
    return {"on": True, "grid": tuple(grid), "columns": columns, "factors": factors,
            "sum": None, "count": 0}


def capture_processors(processors, capture, suffix="attn2.processor"):
    """processors (name -> processor) with every one whose name ends in `suffix` replaced by
    `capture`."""
    return {name: capture if name.endswith(suffix) else p for name, p in processors.items()}


@contextlib.contextmanager
def capturing(model, store, capture, suffix="attn2.processor"):
    """Install `capture` on the modules whose processor names end in `suffix`, then restore."""
    original = dict(model.attn_processors)                                  # name -> processor
    model.set_attn_processor(capture_processors(original, capture, suffix))
    try:
        yield store
    finally:
        model.set_attn_processor(original)


# ---- the UNet's text conditioning, per family ----

def token_ids(tokenizer, text_encoder, texts, device):
    """(B, 77) ids, padded to the encoder's positions: start, the text's pieces, end, padding."""
    length = text_encoder.config.max_position_embeddings
    ids = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                    max_length=length).input_ids
    return ids.to(device)


def encode_image(dm, images):
    """The DM's latent (B, C, h, w) of images (B, 3, H, W) in [-1, 1]: (the VAE's mean -
    shift_factor) x scaling_factor, without sampling (deterministic). SD 1.x, 2.x and SDXL have
    no shift (C = 4); SD3's VAE has one (C = 16; toy-sd3's has none). The VAE runs in its own
    dtype and device (SDXL's VAE: float32); the latent comes back in float32."""
    vae = dm["vae"]
    images = images.to(device=vae.device, dtype=vae.dtype)
    mean = vae.encode(images).latent_dist.mean.float()
    # mean - 0.0 is mean exactly: the unshifted VAEs' latents are mean x scaling_factor
    shift = vae.config.get("shift_factor") or 0.0
    return (mean - shift) * vae.config.scaling_factor                   # (B, C, h, w)


def encode_text(dm, texts):
    """(context (B, 77, D), added): the UNet's conditioning on texts, as diffusers' pipelines build
    it; unet(z, t, encoder_hidden_states=context, added_cond_kwargs=added).

    SD 1.x, 2.x: the text encoder's last hidden state, added None. SDXL: each encoder's
    hidden_states[-2] (the penultimate layer), concatenated (B, 77, 768 + 1280), and added =
    {"text_embeds": encoder 2's pooled projection (B, 1280), "time_ids": (B, 6)}. Both tokenizers
    are one BPE and differ only in their padding ("!" for encoder 2), so column j is the same
    token for both encoders and text_words' positions index the concatenation.
    """
    device, dtype = dm["unet"].device, dm["unet"].dtype
    if "text_encoder_2" not in dm:
        ids = token_ids(dm["tokenizer"], dm["text_encoder"], texts, device)
        context = dm["text_encoder"](ids)[0]                         # (B, 77, D)
        return context.to(dtype), None
    states = []
    pairs = ((dm["tokenizer"], dm["text_encoder"]), (dm["tokenizer_2"], dm["text_encoder_2"]))
    for tokenizer, encoder in pairs:
        ids = token_ids(tokenizer, encoder, texts, device)
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])                         # (B, 77, D_i)
    context = torch.cat(states, dim=-1).to(dtype)                    # (B, 77, D_1 + D_2)
    # encoder 2's pooled projection (B, D_2) and the size ids (B, 6)
    added = {"text_embeds": out.text_embeds.to(dtype),
             "time_ids": time_ids(dm["res"], len(texts), device, dtype)}
    return context, added


def time_ids(res, batch, device=None, dtype=torch.float32):
    """(batch, 6) SDXL's size conditioning (original h, w; crop top, left; target h, w): an
    uncropped res x res image, the pipeline's defaults for a res x res output (data.load_image
    squashes every image to res x res)."""
    ids = torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=dtype)
    return ids.repeat(batch, 1)
