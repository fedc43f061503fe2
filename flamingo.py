"""The Flamingo-style family (paper §7.1, OpenFlamingo): gated cross-attention, through
transformers' IDEFICS (`--model idefics`, `--model tiny-idefics`).

The paper validates Lavender first on OpenFlamingo. Its package pins torch 2.0.1, so it cannot
live beside this project's torch; IDEFICS (Hugging Face's open reproduction of Flamingo, the class
`IdeficsForVisionText2Text`) is the same architecture in the packages we already use: a frozen
LLaMA whose decoder layers are preceded, every `cross_layer_interval` layers, by a gated
cross-attention layer (`model.gated_cross_attn_layers[i].cross_attn`: text queries, image keys,
tanh-gated residual), a CLIP vision tower, and an optional perceiver resampler. What this file
holds, for models.FAMILIES and data.py: the builders (tiny and benchmark sizes, from a config),
the loader, the LoRA targets, where the cross-attention and its queries and keys are, the image
geometry, and the legacy interleaved prompts (IDEFICS has no chat template).

What the maps mean (§4.4):
- Without the resampler (`use_resampler=False`), the keys of an image are CLS + P x P patches of a
  square resize that stretches the whole image: CLS is dropped, the patches are read row-major, and
  the P x P grid is area-resampled to 32 x 32. A map then covers the same pixels as the DM's map.
- With the resampler (every released IDEFICS checkpoint, like OpenFlamingo) the keys are 64 latents:
  learned queries of the perceiver, each a mixture over all patches, with no position of their own.
  The paper's recipe for keys without a spatial layout is to interpolate them into a square grid
  (latents_to_square: 64 -> 8 x 8, latent j at row j // 8, column j % 8), then resize to 32 x 32.
  That grid is a convention, not a picture: cell (r, c) is "latent 8r + c", not a place in the
  image, so aligning it with the DM's map teaches the model a fixed assignment of image regions to
  latents rather than measuring where it looks. Entropy and MSE are still defined on it; pointing is
  not (evaluate.py leaves it out: models.maps_have_positions). A text -> latent -> patch
  composition through the perceiver's last block would give a spatial map; it is not offered here
  (untested: the latents also carry what the earlier blocks and the residual path put there).

For readers who want OpenFlamingo itself (open_flamingo, torch 2.0.1): its gated layers are
`lang_encoder.gated_cross_attn_layers[i].attn` (MaskedCrossAttention: `to_q`, `to_kv` fused, no
q/k norms, the media mask built inside from `media_locations`), its resampler also gives 64
latents per image (per frame), and its vision tower is CLIP ViT-L/14. The capture principle
carries over: hooks on the query and key projections' outputs (`to_q`; the first half of
`to_kv`'s output) plus the media mask reproduce the softmax rows; its gated layers come every
`cross_attn_every_n_layers`.

    python -c "import models; print(models.vision_geometry(models.load_vlm('tiny-idefics')[0]))"
"""
import functools
import math

import torch
import torch.nn.functional as F
from transformers import (IdeficsConfig, IdeficsForVisionText2Text, IdeficsImageProcessorPil,
                          IdeficsProcessor)

from aligner import MAP_SIZE, area_matrix

# ---- tokens and prompts: IDEFICS-instruct's dialogue, written as its legacy interleaved lists ----

# what the processor inserts for an image
IMAGE_TOKENS = "<fake_token_around_image><image><fake_token_around_image>"
# IDEFICS-instruct ends each turn with it (and stops on it)
END_OF_UTTERANCE = "<end_of_utterance>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<fake_token_around_image>", "<image>",
                  END_OF_UTTERANCE]
TOKEN_ROLES = dict(bos_token="<s>", eos_token="</s>", pad_token="<unk>", unk_token="<unk>",
                   extra_special_tokens=SPECIAL_TOKENS[3:])
# the dialogue's words, added to the tiny tokenizer's corpus
CORPUS = ["User:", "Assistant:"]


def prompt_problem(processor, item):
    """What stops an item's prompt, or None: a special token in its text. The processor's image
    mask stops at the first end-of-sequence token ("</s>": no token after it sees the image), and
    it counts every <image> token as an image."""
    why = {processor.tokenizer.eos_token: "after which IDEFICS' tokens no longer see the image",
           "<image>": "which IDEFICS reads as another image"}
    for field in ("question", "answer"):
        for token, reason in why.items():
            if token in item[field]:
                return (f"its {field} {item[field]!r} holds {token!r}, {reason}; "
                        f"remove it from the text")
    return None


def prompt_texts(processor, item, with_answer=True):
    """(text, prompt) as the processor writes them: IDEFICS-instruct's dialogue with the image
    first, "<s>User:<image tokens>{question}<end_of_utterance>\\nAssistant:" +
    " {answer}<end_of_utterance>". An item with a prompt_problem is refused."""
    problem = prompt_problem(processor, item)
    if problem:
        raise ValueError(f"item {item.get('id')!r}: {problem}")
    # (the processor strips each text piece too)
    question = item["question"].strip()
    bos = processor.tokenizer.bos_token
    prompt = f"{bos}User:{IMAGE_TOKENS}{question}{END_OF_UTTERANCE}\nAssistant:"
    if not with_answer:
        return prompt, prompt
    return f"{prompt} {item['answer'].strip()}{END_OF_UTTERANCE}", prompt


def processor_batch(processor, texts, images, padding_side):
    """The processor's batch for texts of prompt_texts: each split at its image into IDEFICS'
    legacy interleaved list [text, image, text] (the processor adds <s> and the image tokens
    back), so its tokens are exactly those of the text. Keys: input_ids, attention_mask,
    pixel_values (B, 1, 3, S, S), image_attention_mask (B, T, 1)."""
    bos = processor.tokenizer.bos_token
    prompts = []
    for text, image in zip(texts, images):
        before, after = text.removeprefix(bos).split(IMAGE_TOKENS, 1)
        prompts.append([before, image[0], after])
    return processor(text=prompts, padding=True, padding_side=padding_side, return_tensors="pt",
                     add_end_of_utterance_token=False)


# ---- builders: IDEFICS at tiny and benchmark sizes, from a config ----

# (text, vision, perceiver) config fields. tiny: hidden 64, 4 layers, a gated cross-attention
# layer before layers 0 and 2 (interval 2), 4 heads; vision hidden 32, 56 px images of 14 px
# patches (4 x 4 + CLS = 17 keys); resampler 16 latents (4 x 4), one block. alpha "ones": the
# gates start open (tanh(1) = 0.76), so the cross-attention shapes the output, as in a trained
# checkpoint (IDEFICS' pre-training starts them at "zeros", closed).
IDEFICS_SIZES = {
    "tiny": (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, cross_layer_interval=2, max_position_embeddings=512,
             alpha_initializer="ones"),
        dict(embed_dim=32, image_size=56, patch_size=14, num_hidden_layers=2,
             num_attention_heads=2, intermediate_size=64),
        dict(resampler_n_latents=16, resampler_depth=1, resampler_n_heads=2,
             resampler_head_dim=16)),
}


def idefics9b_size(width=1):
    """(text, vision, perceiver) fields of IDEFICS-9B at 1/`width` width, all depths kept:
    LLaMA-7B's 32 layers of 4096, 32 heads, a gated cross-attention layer every 4 layers (8 in
    all); CLIP ViT-H/14 (1280 wide, 32 layers, 16 heads) at 224 px (16 x 16 patches + CLS); a
    6-block perceiver with 64 latents (16 heads of 96). Width 16: hidden 256, vision 80. (From
    IDEFICS' model card and IdeficsConfig's defaults; not checked against the checkpoint's
    config.json here.)"""
    if width not in (1, 2, 4, 8, 16):
        raise ValueError(f"idefics width {width}: choose 1, 2, 4, 8 or 16 "
                         f"(its widths divided by it)")
    text = dict(hidden_size=4096 // width, intermediate_size=11008 // width,
                num_hidden_layers=32, num_attention_heads=32, cross_layer_interval=4,
                max_position_embeddings=2048, alpha_initializer="ones")
    vision = dict(embed_dim=1280 // width, image_size=224, patch_size=14, num_hidden_layers=32,
                  num_attention_heads=16, intermediate_size=5120 // width)
    perceiver = dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                     resampler_head_dim=96 // width)
    return text, vision, perceiver


def idefics(size, ids, resampler=True, qk_norms=False, seed=0, device="cpu", dtype=None):
    """IdeficsForVisionText2Text at `size` ((text, vision, perceiver) fields), random weights,
    deterministic by seed, nothing frozen (the LoRA or full set-up decides). ids: vocab_size,
    bos/eos/pad_token_id. resampler: 64-latent-style keys (True) or CLS + patches (False)."""
    text, vision, perceiver = size
    config = IdeficsConfig(**text, **ids, qk_layer_norms=qk_norms, use_resampler=resampler,
                           freeze_text_layers=False, freeze_vision_layers=False,
                           vision_config=vision,
                           perceiver_config={**perceiver, "use_resampler": resampler})
    torch.manual_seed(seed)
    with torch.device(device):
        dtypes = {"dtype": dtype} if dtype else {}
        return IdeficsForVisionText2Text._from_config(config, **dtypes)


def bench_model(width=16, device="cpu", dtype=torch.float32, batch_size=1):
    """IDEFICS-9B's proportions at 1/`width` width (idefics9b_size; bench.py aggregate --model
    idefics), random weights, with its resampler (64 latents, as every released checkpoint): 32
    text layers of hidden 256, a gated cross-attention layer before every 4th (8), 32 heads of
    dim 8, vocab 2000 = 32000 / 16; one 224 px image (16 x 16 patches + CLS) through a 32-layer
    ViT of width 80 and a 6-block perceiver. 256 text tokens that all see the image, 32 captured
    rows in all 8 layers."""
    vocab = 32000 // width
    ids = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = idefics(idefics9b_size(width), ids, device=device, dtype=dtype).eval()
    T, R, B = 256, 32, batch_size
    image_mask = torch.ones(B, T, 1, dtype=torch.long)  # (B, T, images)
    image_mask[:, 0] = 0  # <s> comes before the image
    input_ids = torch.randint(3, vocab, (1, T)).repeat(B, 1)  # (B, T): the same sample B times
    attention_mask = torch.ones(B, T, dtype=torch.long)
    pixel_values = torch.randn(1, 1, 3, 224, 224).repeat(B, 1, 1, 1, 1)  # (B, images, 3, S, S)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                 image_attention_mask=image_mask)
    rows = torch.arange(T - R - 1, T - 1)[None].repeat(B, 1)  # (B, R): the last R positions
    return model, batch, rows


def idefics_processor(tokenizer, image_size):
    """IDEFICS' processor: a square resize (the whole image stretched) to image_size, CLIP's
    normalisation."""
    images = IdeficsImageProcessorPil(image_size=image_size)
    return IdeficsProcessor(images, tokenizer, image_size=image_size)


def tiny_idefics(tokenizer, ids, seed=0, resampler=True, qk_norms=False):
    """(model, processor) of IDEFICS_SIZES["tiny"] with `tokenizer` (TOKEN_ROLES) and its ids
    (models.tokenizer_ids), random weights."""
    model = idefics(IDEFICS_SIZES["tiny"], ids, resampler, qk_norms, seed)
    processor = idefics_processor(tokenizer, IDEFICS_SIZES["tiny"][1]["image_size"])
    return stop_at_end_of_utterance(model, processor), processor


def load(source, dtype, device=None, local_files_only=False):
    """(model, processor) of an IDEFICS folder or hub id, stopping at <end_of_utterance>; the
    weights placed on `device` as they load."""
    processor = IdeficsProcessor.from_pretrained(source, local_files_only=local_files_only)
    model = IdeficsForVisionText2Text.from_pretrained(source, dtype=dtype, device_map=device,
                                                      local_files_only=local_files_only)
    return stop_at_end_of_utterance(model, processor), processor


def stop_at_end_of_utterance(model, processor):
    """Generation stops at <end_of_utterance> (how IDEFICS-instruct ends its turn) as well as at the
    model's own end tokens. Returns the model."""
    stop = processor.tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    model.generation_config.eos_token_id = sorted({*eos, stop})
    return model


# ---- where the cross-attention is, its queries and keys, and the image geometry ----

# LoRA targets (§6 (4)): q/v projections of the language model's self- and cross-attention layers,
# not the vision tower's (model.vision_model.encoder.layers) nor the perceiver's.
LORA_TARGETS = (r".*model\.(layers|gated_cross_attn_layers)\.\d+\."
                r"(self_attn|cross_attn)\.(q_proj|v_proj)")


def language_model(model):
    """The IdeficsModel inside `model` (plain or PEFT-wrapped; FSDP shards it in place): decoder
    layers, gated cross-attention layers, vision tower and resampler."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def cross_attention_layers(model):
    """Indices into gated_cross_attn_layers, in order; gated layer i runs before decoder layer
    i * cross_layer_interval (IDEFICS-9B: 8 layers, before decoder layers 0, 4, ..., 28)."""
    return list(range(len(language_model(model).gated_cross_attn_layers)))


def cross_attention(model, layer):
    """The text-to-image attention module (IdeficsAttention) of gated cross-attention layer
    `layer`."""
    gated = language_model(model).gated_cross_attn_layers
    if not 0 <= layer < len(gated):
        raise ValueError(f"IDEFICS has gated cross-attention layers 0..{len(gated) - 1}, not "
                         f"{layer}; use cross_attention_layers(model) to list them")
    return gated[layer].cross_attn


def query_key(attn):
    """(q module, k module, q norm, k norm) of an IdeficsAttention: the modules whose outputs are
    the queries and keys its softmax reads, and what turns a projection's output into them. With
    qk_layer_norms: the norms (outputs (B, heads, T, D)), applied by their .forward (their hooks
    stay silent); without: q_proj / k_proj (outputs (B, T, heads * D)), nothing applied. No RoPE
    and no grouped-query attention in these layers: scores are q kᵀ · head_dim^-0.5 + the image
    mask."""
    if attn.qk_layer_norms:
        q_norm, k_norm = attn.q_layer_norm, attn.k_layer_norm
        return q_norm, k_norm, q_norm.forward, k_norm.forward
    same = lambda x: x  # noqa: E731
    return attn.q_proj, attn.k_proj, same, same


def vision_geometry(model):
    """dict(family, tokens: keys per image, patches: P of the P x P grid or None (resampler
    latents), placed: whether a map's cells are places in the image (patches: yes; latents: no),
    image_maps: probs (B, L, H, R, N), batch -> (B, L, H, R, 32, 32)); aggregate.image_maps calls
    it."""
    config = language_model(model).config
    if config.use_resampler:
        tokens, patches = config.perceiver_config.resampler_n_latents, None
    else:
        patches = config.vision_config.image_size // config.vision_config.patch_size
        tokens = 1 + patches * patches
    maps = functools.partial(image_maps, tokens=tokens, patches=patches)
    return dict(family="idefics", tokens=tokens, patches=patches, placed=patches is not None,
                image_maps=maps)


def latents_to_square(x):
    """(..., n) -> (..., s, s), s = ceil(√n): the paper's "interpolate into a roughly square
    matrix" (§4.4) for keys without a spatial layout. A square n is only reshaped, row-major
    (64 -> 8 x 8: latent j at (j // 8, j % 8)); otherwise the n values are first linearly
    interpolated to s² (end points kept).
    Worked example: [1, 2, 3, 4] -> [[1, 2], [3, 4]]; [0, 3] -> [[0, 1], [2, 3]]."""
    n = x.shape[-1]
    s = math.isqrt(n - 1) + 1 if n > 1 else 1
    if s * s != n:
        flat = x.reshape(-1, 1, n)
        square = F.interpolate(flat, size=s * s, mode="linear",
                               align_corners=True)  # (*, 1, s²)
        x = square.reshape(*x.shape[:-1], s * s)
    return x.unflatten(-1, (s, s))


def image_maps(probs, batch, tokens, patches, out=MAP_SIZE):
    """probs (B, L, H, R, N) -> (B, L, H, R, out, out) over each sample's first image (its first
    `tokens` keys; batch unused: every image has the same keys). Patches (no resampler): CLS
    dropped, P x P row-major, area-resampled over the whole (stretched) image; latents:
    latents_to_square, then the same resampling (§4.4)."""
    x = probs[..., :tokens]
    if patches:
        x = x[..., 1:].unflatten(-1, (patches, patches))  # (..., P, P)
    else:
        x = latents_to_square(x)  # (..., s, s)
    side = x.shape[-1]
    m = area_matrix(out, side, side, 1, x.device, x.dtype)  # (out, s): cells over the grid
    return m @ x @ m.T  # (B, L, H, R, out, out)
