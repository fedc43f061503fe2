"""The models: every preset (VLM and DM) in one table, one builder per model class, the loaders,
and per family where the language model, its attention layers and the image geometry are (§5, §6).

A preset is a name (`--model llama32`, `--dm sd14`): a hub id, or a size built here from a config
(random weights: the tiny presets of the tests, the benchmarks' scaled geometries), or a folder that
toy.py trains. The same builder makes every size of a class: `mllama` the Llama-3.2-Vision classes
(tiny, toy, llama32 at 1/16 width), `stable_diffusion` SD's diffusers parts (tiny-sd, toy-sd, sd14's
geometry; teachers.py builds tiny-sd21 and tiny-sdxl). With no network and no local copy, one
error names the preset, the hub id and how to point at a local folder. The last part holds what
differs between model families: one FAMILIES entry per family (Mllama's cross-attention here;
IDEFICS' gated cross-attention in flamingo.py; Qwen2-VL's self-attention in qwen.py, its capture
in selfattn.py), which the per-family functions (language_model, attention_layers,
vision_geometry, ...) dispatch through.

    python -c "import models; m, p = models.tiny_vlm(); print(models.attention_layers(m))"
"""
import inspect
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as bpe_models
from transformers import (IdeficsProcessor, MllamaConfig, MllamaForConditionalGeneration,
                          MllamaImageProcessorPil, MllamaProcessor, PreTrainedTokenizerFast)

import flamingo
import hub
import mmdit
import qwen
import teachers

ROOT = Path(__file__).resolve().parent

# ---- the presets: --model NAME (a VLM) or --dm NAME (a diffusion model) ----

# family (VLMs): its entry in FAMILIES below (mllama, idefics, qwen2vl).
# hub_id: the weights on the Hugging Face hub (None: built here or trained by toy.py); path: the
# default local folder (relative to this file); layers (DMs): the attn2 layers extract.py averages
# by default, as downsampling factors of the latent grid (None: all). sd14 (512 px, attn2 at 64²,
# 32², 16², 8²): its 16x16 layers (factor 4), the maps Prompt-to-Prompt aggregates (Hertz et al.
# 2022, which eq. 13-14 cite) and the first author's MCPL code with it; DAAM also drops 8x8.
# toy-sd (attn2 at 32², 16², 8²): its 32x32 layers, the sharpest maps, both above 0.9 pointing
# (test-id answers, 150 items: 0.92, entropy 5.03; all layers 0.94, 5.39); toy-sd21 its 32x32 too.
# sd21, sdxl: factor 4 (24x24 at 768 px, 32x32 at 1024 px): teachers.py says why. toy-sdxl (attn2
# at 16², 8²): its 16x16, DAAM's rule (all but the coarsest): pointing 0.84, 8x8 0.42, both 0.82.
# text_encoders (DMs): 2 for SDXL's layout (text_encoder_2/, tokenizer_2/ too), else 1.
# family "mmdit" (DMs): SD3's multimodal DiT, loaded and captured by mmdit.py; absent: a UNet.
PRESETS = {
    "llama32": dict(kind="vlm", family="mllama", hub_id="meta-llama/Llama-3.2-11B-Vision-Instruct",
                    path=None, about="40 text layers, cross-attention at 3, 8, ..., 38; 560 px tiles"),
    "tiny": dict(kind="vlm", family="mllama", hub_id=None, path=None,
                 about="the llama32 classes at a tiny size, random weights (tests)"),
    "toy": dict(kind="vlm", family="mllama", hub_id=None, path="toy_models/toy-vlm",
                about="the llama32 classes at toy size, pre-trained on the miniature world"),
    "idefics": dict(kind="vlm", family="idefics", hub_id="HuggingFaceM4/idefics-9b-instruct",
                    path=None, about="Flamingo-style: 32 LLaMA layers, gated cross-attention before "
                                     "every 4th; 64 resampler latents"),
    "tiny-idefics": dict(kind="vlm", family="idefics", hub_id=None, path=None,
                         about="IDEFICS' classes at a tiny size with a resampler, random weights (tests)"),
    "qwen2vl": dict(kind="vlm", family="qwen2vl", hub_id="Qwen/Qwen2-VL-7B-Instruct", path=None,
                    about="self-attention only: 28 layers, 28 heads (4 KV heads), 2x2-merged 14 px patches"),
    "qwen25vl": dict(kind="vlm", family="qwen2vl", hub_id="Qwen/Qwen2.5-VL-7B-Instruct", path=None,
                     about="Qwen2-VL's successor: the same text side, a windowed vision encoder"),
    "tiny-qwen2vl": dict(kind="vlm", family="qwen2vl", hub_id=None, path=None,
                         about="the qwen2vl classes at a tiny size, random weights (tests)"),
    "sd14": dict(kind="dm", hub_id="CompVis/stable-diffusion-v1-4", path=None, layers={4},
                 about="Stable Diffusion v1.4: attn2 at 64², 32², 16², 8² (512 px)"),
    "tiny-sd": dict(kind="dm", hub_id=None, path=None, layers=None,
                    about="SD's classes at a tiny size, random weights (tests)"),
    "toy-sd": dict(kind="dm", hub_id=None, path="toy_models/toy-sd", layers={1},
                   about="SD's classes at toy size, trained on the miniature world"),
    "sd21": dict(kind="dm", hub_id="stabilityai/stable-diffusion-2-1", path=None, layers={4},
                 about="Stable Diffusion 2.1, v-prediction: attn2 at 96², 48², 24², 12² (768)"),
    "tiny-sd21": dict(kind="dm", hub_id=None, path=None, layers=None,
                      about="sd21's structure at tiny-sd's size, random weights (tests)"),
    "sdxl": dict(kind="dm", hub_id="stabilityai/stable-diffusion-xl-base-1.0", path=None,
                 layers={4}, text_encoders=2, about="SDXL base 1.0: attn2 at 64², 32² (1024 px)"),
    "tiny-sdxl": dict(kind="dm", hub_id=None, path=None, layers=None, text_encoders=2,
                      about="sdxl's structure at tiny-sd's size, random weights (tests)"),
    "sd3": dict(kind="dm", hub_id="stabilityai/stable-diffusion-3-medium-diffusers", path=None,
                layers=None, family="mmdit", about="SD3 medium: joint attention, 24 blocks (mmdit.py)"),
    "tiny-sd3": dict(kind="dm", hub_id=None, path=None, layers=None, family="mmdit",
                     about="sd3's classes at a tiny size, one CLIP encoder, random weights (tests)"),
    "toy-sd21": dict(kind="dm", hub_id=None, path="toy_models/toy-sd21", layers={1},
                     about="SD 2.x's features (v-prediction) at toy size, trained on the world"),
    "toy-sdxl": dict(kind="dm", hub_id=None, path="toy_models/toy-sdxl", layers={2},
                     text_encoders=2, about="SDXL's layout at toy size, trained on the world"),
    "toy-sd3": dict(kind="dm", hub_id=None, path="toy_models/toy-sd3", layers=None, family="mmdit",
                    about="SD3's joint-attention DiT at toy size, trained on the miniature world"),
}
VLM_PRESETS = [name for name, p in PRESETS.items() if p["kind"] == "vlm"]
DM_PRESETS = [name for name, p in PRESETS.items() if p["kind"] == "dm"]


def preset_path(name):
    """A preset's default local folder (absolute), or None."""
    return str(ROOT / PRESETS[name]["path"]) if PRESETS[name]["path"] else None


# ---- tokenizers built in memory (nothing downloaded) ----

# Special tokens of Llama-3.2-Vision that the chat template and the processor rely on.
LLAMA_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|image|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"]

# A chat template with the same shape as Llama-3.2-Vision-Instruct's (no system prompt):
# <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>{question}<|eot_id|>
# <|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

# Text the tiny byte-level BPE is trained on: small enough that common words are one token and
# rarer ones split into pieces ("red" -> "re" "d"), as Llama's tokenizer splits rare words.
TINY_CORPUS = [
    "a red circle left of a blue square", "what colour is the circle?", "what shape is red?",
    "how many objects are there?", "is there a green triangle?", "yes", "no", "two", "three",
    "the photograph shows two dogs playing on the grass", "describe the image in one sentence.",
    "a man riding a horse on a beach", "user", "assistant"]


LLAMA_TOKEN_ROLES = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                         pad_token="<|finetune_right_pad_id|>")


def bpe_tokenizer(corpus=TINY_CORPUS, vocab_size=300, special=LLAMA_SPECIAL_TOKENS,
                  roles=LLAMA_TOKEN_ROLES):
    """A byte-level BPE tokenizer (as Llama 3's) with Llama-3.2-Vision's special tokens, trained in
    memory on `corpus` (the tiny preset's by default; toy.py passes the world's words). special,
    roles: another family's special tokens and which is which (flamingo.SPECIAL_TOKENS, TOKEN_ROLES)."""
    bpe = Tokenizer(bpe_models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **roles)


# ---- Mllama (Llama-3.2-Vision's classes) at every size ----

# (text, vision) config fields. tiny: hidden 64, 5 layers, cross-attention at 1 and 3, 4 heads (2
# KV heads); vision hidden 32, 56 px tiles of 14 px patches (4x4 patches + CLS = 17 tokens a tile),
# up to 4 tiles. toy: hidden 128; vision hidden 64, 4 + 1 layers, one 32 px tile of 4 px patches
# (8x8 + CLS = 65 tokens), max_num_tiles 1 with the one aspect ratio 1x1, so no padding tiles are
# encoded (4x less vision work).
MLLAMA_SIZES = {
    "tiny": (dict(hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, cross_attention_layers=[1, 3], max_position_embeddings=1024),
             dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  intermediate_size=64, vision_output_dim=32 * 3, image_size=56, patch_size=14,
                  max_num_tiles=4, intermediate_layers_indices=[0, 1])),
    "toy": (dict(hidden_size=128, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, cross_attention_layers=[1, 3], max_position_embeddings=256),
            dict(hidden_size=64, num_hidden_layers=4, num_global_layers=1, attention_heads=4,
                 intermediate_size=128, vision_output_dim=64 * 3, image_size=32, patch_size=4,
                 max_num_tiles=1, supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[1, 3])),
}


def llama32_size(width=1, tile_size=560):
    """(text, vision) fields of Llama-3.2-11B-Vision at 1/`width` width (1, 2, 4, 8 or 16), all
    depths kept: 40 text layers, cross-attention at 3, 8, ..., 38, 32 heads / 8 KV heads (head dim
    128 / width); vision 32 + 8 global layers, 16 heads, 14 px patches in up to 4 tiles. Width 16
    (the benchmarks'): hidden 256 = 4096 / 16, MLP 896 = 3.5x, vision hidden 80 = 1280 / 16."""
    if width not in (1, 2, 4, 8, 16):
        raise ValueError(f"llama32 width {width}: choose 1, 2, 4, 8 or 16 (its widths divided by it)")
    hidden, vision = 4096 // width, 1280 // width
    return (dict(hidden_size=hidden, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=hidden * 7 // 2, cross_attention_layers=list(range(3, 40, 5)),
                 max_position_embeddings=1024),
            dict(hidden_size=vision, num_hidden_layers=32, num_global_layers=8, attention_heads=16,
                 intermediate_size=4 * vision, vision_output_dim=vision * 6, image_size=tile_size,
                 patch_size=14, max_num_tiles=4, intermediate_layers_indices=[3, 7, 15, 23, 30]))


# The image token of Mllama's config, by config field (qwen.QWEN_TOKENS: Qwen2-VL's four).
MLLAMA_TOKENS = dict(image_token_index="<|image|>")


def tokenizer_ids(tokenizer, **tokens):
    """The vocabulary size and special token ids a VLM config takes, from its tokenizer: bos, eos,
    pad, and the id of each of `tokens` (config field -> token), e.g. MLLAMA_TOKENS."""
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for field, token in tokens.items():
        ids[field] = tokenizer.convert_tokens_to_ids(token)
    return ids


def mllama(size, ids, seed=0, device="cpu", dtype=None):
    """MllamaForConditionalGeneration at `size` ((text, vision) fields: MLLAMA_SIZES, llama32_size),
    random weights, deterministic by seed, built on `device` (11B parameters are not initialised on
    a CPU to be moved). ids: vocab_size, bos/eos/pad_token_id, image_token_index (tokenizer_ids)."""
    text, vision = size
    special = {k: v for k, v in ids.items() if k != "image_token_index"}
    config = MllamaConfig(vision_config=vision, text_config={**text, **special},
                          image_token_index=ids["image_token_index"])
    torch.manual_seed(seed)
    with torch.device(device):
        dtypes = {"dtype": dtype} if dtype else {}  # none given: the config's default (fp32)
        return MllamaForConditionalGeneration._from_config(config, **dtypes)


def mllama_processor(tokenizer, size):
    """The MllamaProcessor of a size: its tiles, its tokenizer, the chat template above."""
    vision = size[1]
    side = vision["image_size"]
    tiles = MllamaImageProcessorPil(size={"height": side, "width": side},
                                    max_image_tiles=vision["max_num_tiles"])
    return MllamaProcessor(image_processor=tiles, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def small_vlm(size, tokenizer, seed=0):
    """(model, processor) at MLLAMA_SIZES[size] with `tokenizer`, random weights, nothing downloaded."""
    size = MLLAMA_SIZES[size]
    ids = tokenizer_ids(tokenizer, **MLLAMA_TOKENS)
    return mllama(size, ids, seed), mllama_processor(tokenizer, size)


def tiny_vlm(seed=0):
    """(model, processor) of the tiny preset: MLLAMA_SIZES["tiny"], the tiny BPE, random weights."""
    return small_vlm("tiny", bpe_tokenizer(), seed)


def tiny_idefics(seed=0, resampler=True, qk_norms=False):
    """(model, processor) of the tiny-idefics preset (flamingo.IDEFICS_SIZES["tiny"], the tiny BPE with
    IDEFICS' special tokens, random weights); resampler=False: CLS + patch keys; qk_norms: q/k norms."""
    tokenizer = bpe_tokenizer(TINY_CORPUS + flamingo.CORPUS, special=flamingo.SPECIAL_TOKENS,
                              roles=flamingo.TOKEN_ROLES)
    return flamingo.tiny_idefics(tokenizer, tokenizer_ids(tokenizer), seed, resampler, qk_norms)


def tiny_qwen2vl(seed=0, model_type="qwen2_vl"):
    """(model, processor) of tiny-qwen2vl (qwen.QWEN_TINY; model_type "qwen2_5_vl": Qwen2.5-VL's
    classes): the tiny BPE with Qwen's vision tokens, the chat template above, random weights."""
    tokenizer = bpe_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(qwen.QWEN_TOKENS.values())})
    ids = tokenizer_ids(tokenizer, **qwen.QWEN_TOKENS)
    return qwen.tiny_qwen2vl(tokenizer, ids, CHAT_TEMPLATE, seed, model_type)


def resolve_dtype(name, device, gpu="bfloat16"):
    """The torch dtype of a --dtype flag: "auto" is `gpu` on a CUDA device (train.py's LoRA and
    evaluate.py: bfloat16; extract.py: float16), float32 on a CPU; any other name is that dtype."""
    if name == "auto":
        name = gpu if torch.device(device).type == "cuda" else "float32"
    return getattr(torch, name)


def load_vlm(name, path=None, dtype=torch.float32, device=None):
    """(model, processor) for a preset name; `path` is a local copy (a save_pretrained folder).
    device: where the weights are placed as they load (device_map; None: the CPU). Hub presets
    load from local files only when they can (hub.weights_source), else fail fast."""
    if name not in VLM_PRESETS:
        raise SystemExit(f"unknown --model {name!r}; choose one of {VLM_PRESETS}")
    built = {"tiny": tiny_vlm, "tiny-idefics": tiny_idefics, "tiny-qwen2vl": tiny_qwen2vl}.get(name)
    if built is not None and path is None:  # built here from a config
        model, processor = built()
        return model.to(device=device, dtype=dtype), processor
    hub_id, path = PRESETS[name]["hub_id"], path or preset_path(name)
    if hub_id is None and not Path(path).is_dir():
        raise SystemExit(f"--model {name}: no model folder at {path!r}; for 'toy' run `python "
                         f"toy.py` first (it writes toy_models/toy-vlm), or pass --model-path DIR "
                         f"(a save_pretrained folder)")
    source, local = hub.weights_source("--model", name, hub_id, path)
    try:
        return FAMILIES[PRESETS[name]["family"]]["load"](source, dtype, device, local)
    except (OSError, ValueError) as err:  # (a path that is neither a folder nor a hub id: ValueError)
        raise hub.load_error("--model", name, source, err, hub_id) from None


# ---- Stable Diffusion's parts at every size ----

# Each part's config fields, in the order they are built (each part's random weights follow the
# draws of the parts before it). tiny-sd: 32 px -> VAE (factor 2) -> 16x16 latents; attn2 at 16x16
# and 8x8. sd14: SD-v1.4's geometry (UNet 320/640/1280/1280, 768-d context, 8 heads, 860M
# parameters; VAE 128/256/512/512; CLIP ViT-L/14 text encoder, 768 wide, 12 layers).
# toy-sd: a 1-level VAE (16 channels, no downsampling): 32 px images -> 4 x 32 x 32 latents, pixel
# space in all but name, kept so that extraction runs SD's encode -> UNet path unchanged. UNet
# blocks 16/32/64 at 32, 16 and 8 px; cross-attention at 32 and 16 px and in the 8 px mid block, as
# SD v1.4 has it at every level; 1, 4 and 4 heads (one at 32 px keeps its self-attention cheap).
# Text encoder: hidden 64, two causal layers, 24 positions (SD: 77; with 77
# the ~65 padding columns took ~70% of every pixel's attention, and the world's longest caption is
# 21 tokens with the start and end tokens). Why this recipe (world v1, toy-sd pointing on 750
# held-out caption words, toy_report.md): a 2-level VAE (16x16 latents) with a position-free, layer-free
# encoder (a bag of word vectors) pointed 46%: colour words 89%, shape words 2%. A bag of words
# cannot tell which shape goes with which colour in "a red circle left of a blue square", so the
# UNet learned to ignore shape words. This recipe points 84.5% (colour 91%, shape 78%); with one
# causal layer it pointed 71% (colour 99%, shape 43%). Our reading: causal layers let "circle" read
# the "red" before it, as SD's CLIP binds attributes; the full-resolution level gives the
# cross-attention layers shape features to query with.
SD_SIZES = {
    "tiny-sd": {
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                    down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32),
        "unet": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                     layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
                     up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32,
                     attention_head_dim=4, norm_num_groups=8)},
    "toy-sd": {
        "vae": dict(block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                    up_block_types=("UpDecoderBlock2D",), latent_channels=4, layers_per_block=1,
                    norm_num_groups=8, sample_size=32, mid_block_add_attention=False),
        "unet": dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                     block_out_channels=(16, 32, 64),
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                     cross_attention_dim=64, attention_head_dim=(1, 4, 4), norm_num_groups=8),
        "text_encoder": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=24)},
    "sd14": {
        "unet": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        "vae": dict(down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                    layers_per_block=2, sample_size=512),
        "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                             projection_dim=768)},
}


def sd_scheduler():
    """A DDIM scheduler with SD 1.x's noise schedule (scaled_linear 0.00085..0.012, 1000 steps)."""
    from diffusers import DDIMScheduler
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         set_alpha_to_one=False, steps_offset=1, clip_sample=False)


def scheduler_config(config, cls):
    """The keys of a scheduler config (SD 1.x ships PNDM's) that scheduler class `cls` accepts."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in dict(config).items() if k in accepted}


def stable_diffusion(size, tokenizer=None, seed=0, device="cpu", dtype=torch.float32, parts=None):
    """dict(vae, unet, text_encoder, tokenizer, scheduler) of SD's classes at `size` (SD_SIZES),
    random weights, deterministic by seed, on `device`; parts: which of vae, unet, text_encoder
    to build (default all); the text encoder's vocabulary: the tokenizer's unless size sets it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def text_encoder(**config):
        ids = teachers.clip_ids(tokenizer) if tokenizer else {}
        return CLIPTextModel(CLIPTextConfig(**{**ids, **config}))
    build = {"vae": AutoencoderKL, "unet": UNet2DConditionModel, "text_encoder": text_encoder}
    dm = dict(tokenizer=tokenizer, scheduler=sd_scheduler())
    torch.manual_seed(seed)
    with torch.device(device):
        for part, config in SD_SIZES[size].items():
            if parts is None or part in parts:
                dm[part] = build[part](**config)
    for part in ("vae", "unet", "text_encoder"):
        if part in dm and dtype != torch.float32:  # (diffusers warns on any dtype .to(), even a no-op)
            dm[part].to(dtype)
    return dm


def tiny_sd(seed=0):
    """The tiny-sd preset: SD_SIZES["tiny-sd"], teachers.tiny_sd_tokenizer, random weights."""
    return stable_diffusion("tiny-sd", teachers.tiny_sd_tokenizer(), seed)


def save_dm(dm, folder):
    """Write a dm dict's parts (each with save_pretrained) in the diffusers layout load_dm reads."""
    for part, value in dm.items():
        if hasattr(value, "save_pretrained"):
            value.save_pretrained(Path(folder) / part)


def load_dm_folder(folder, local_files_only=False, text_encoders=1):
    """dm parts from a folder (or hub id) in diffusers component layout, with a DDIM scheduler;
    text_encoders 2: SDXL's text_encoder_2/ and tokenizer_2/ too."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    local = dict(local_files_only=local_files_only)
    schedule = DDIMScheduler.load_config(folder, subfolder="scheduler", **local)
    parts = dict(vae=AutoencoderKL, unet=UNet2DConditionModel, text_encoder=CLIPTextModel,
                 tokenizer=CLIPTokenizer)
    dm = {part: cls.from_pretrained(folder, subfolder=part, **local) for part, cls in parts.items()}
    dm.update(teachers.load_second_encoder(folder, local_files_only) if text_encoders == 2 else {})
    return dict(dm, scheduler=DDIMScheduler.from_config(scheduler_config(schedule, DDIMScheduler)))


def load_dm(name, path=None, device="cpu", dtype=torch.float32):
    """dict(vae, unet, text_encoder, tokenizer, scheduler, res, name) of a --dm preset, frozen, in
    eval mode.

    One code path for every preset given a folder in diffusers component layout; "tiny-sd",
    "tiny-sd21" and "tiny-sdxl" without a path are built here. res = unet sample_size * the
    VAE's downsampling factor. Hub presets load from local files only when they can
    (hub.weights_source), else fail fast."""
    if name not in DM_PRESETS:
        raise SystemExit(f"unknown --dm {name!r}; choose one of {DM_PRESETS} or give --dm-path")
    if PRESETS[name].get("family") == "mmdit":  # SD3's DiT
        return mmdit.load(name, path, PRESETS[name]["hub_id"], preset_path(name), device, dtype)
    hub_id, dm = PRESETS[name]["hub_id"], tiny_sd() if name == "tiny-sd" and path is None else None
    if name in teachers.TINY_SIZES and path is None:  # tiny-sd21, tiny-sdxl
        dm = teachers.tiny(name, teachers.tiny_sd_tokenizer(), sd_scheduler())
    if dm is None:
        path = path or preset_path(name)
        if hub_id is None and not Path(path).is_dir():
            raise SystemExit(f"--dm {name}: no diffusion model weights at {path!r}; make it with "
                             f"toy.py, or point --dm-path at a folder with unet/ vae/ "
                             f"text_encoder/ tokenizer/ scheduler/")
        source, local = hub.weights_source("--dm", name, hub_id, path, "unet/config.json",
                                           "--dm-path")
        try:
            dm = load_dm_folder(source, local, PRESETS[name].get("text_encoders", 1))
        except (OSError, ValueError) as e:
            raise hub.load_error("--dm", name, source, e, hub_id, "--dm-path") from None
    return teachers.frozen(dm, name, device, dtype)


# ---- per family: where the language model, its attention layers and the image geometry are ----
# A VLM preset names its family; a model's family comes from its config (family()). Each family
# gives, in FAMILIES at the end: its language model, the indices of its text-to-image attention
# layers (those aggregate.aligned_layers chooses from), the attention module of such a layer, how
# to load a folder, its LoRA targets, the queries and keys a cross-attention capture reads
# (query_key; None for self-attention, which selfattn.py reads), the image geometry, which
# attention the capture reads ("cross": aggregate.AttentionCapture; "self": selfattn's), its
# processor class (processor_family) and data.py's prompt fields. PEFT, FSDP and activation
# checkpointing wrap the model: each function finds its piece inside any of them.

# LoRA targets (§6 (4)): q/v projections of the LANGUAGE model only. "q_proj" alone would also
# match Mllama's vision encoder (the authors' release adapts both: DIFFERENCES.md). Qwen2-VL's
# text side matches it too (its vision blocks have one fused `qkv`); IDEFICS has its own.
LORA_TARGETS = r".*language_model\..*\.(q_proj|v_proj)"

# config.model_type -> family
MODEL_FAMILIES = {"mllama": "mllama", "idefics": "idefics", "qwen2_vl": "qwen2vl", "qwen2_5_vl": "qwen2vl"}


def base_model(model):
    """The model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_config(model):
    """The language model's config: its heads (num_attention_heads), its context
    (max_position_embeddings). IDEFICS keeps them in its top-level config."""
    config = base_model(model).config
    return getattr(config, "text_config", config)


def family(model):
    """The family of a model (plain, PEFT-wrapped or FSDP-sharded): "mllama", "idefics" or "qwen2vl"."""
    model_type = getattr(base_model(model).config, "model_type", None)
    if model_type not in MODEL_FAMILIES:
        raise ValueError(f"{type(base_model(model)).__name__} (model_type {model_type!r}) is not a "
                         f"supported VLM; the families are {sorted(set(MODEL_FAMILIES.values()))}")
    return MODEL_FAMILIES[model_type]


def language_model(model):
    """The text decoder inside `model`, whose `.layers` (IDEFICS: `.gated_cross_attn_layers`)
    attention_layers indexes."""
    return FAMILIES[family(model)]["language_model"](model)


def attention_layers(model):
    """Indices of the text-to-image attention layers, in order: in language_model(model).layers
    (Mllama, Qwen2-VL), in its gated_cross_attn_layers (IDEFICS)."""
    return FAMILIES[family(model)]["attention_layers"](model)


def attention_module(model, layer):
    """The text-to-image attention module of attention layer `layer` (it has q_proj and k_proj)."""
    return FAMILIES[family(model)]["attention_module"](model, layer)


def lora_targets(model):
    """The LoRA target regex of the model's family (language model q/v projections only)."""
    return FAMILIES[family(model)]["lora_targets"]


def query_key(model, attn):
    """(q module, k module, q norm, k norm) of a cross-attention module: the modules whose outputs
    are the queries and keys its softmax reads, and the norms (called by .forward, so their hooks
    stay silent) that turn a projection's output into them."""
    return FAMILIES[family(model)]["query_key"](attn)


def vision_geometry(model):
    """Where a map's image keys sit: Mllama's (tile_size px, patch_size px, max_num_tiles,
    supported_aspect_ratios), or a family's dict(family, placed, image_maps: (probs, batch) -> maps)
    that aggregate.image_maps calls (flamingo.vision_geometry, qwen.vision_geometry)."""
    return FAMILIES[family(model)]["vision_geometry"](model)


def processor_family(processor):
    """The family whose processor `processor` is (FAMILIES "processor": its class)."""
    for name, entry in FAMILIES.items():
        if isinstance(processor, entry["processor"]):
            return name
    raise ValueError(f"{type(processor).__name__} is not the processor of a supported VLM; the families "
                     f"are {sorted(FAMILIES)}")


def maps_have_positions(model):
    """False where a map's cells are not places in the image: IDEFICS with its resampler, whose
    latents sit on a square grid by convention (flamingo.py); pointing is then not measured."""
    geometry = vision_geometry(model)
    return not isinstance(geometry, dict) or geometry["placed"]


# ---- family: mllama (llama32, tiny, toy) ----
# Cross-attention decoder layers (`cross_attn`, with q_norm / k_norm) between self-attention
# layers; images in tiles of 1 CLS + P² patch tokens, placed on a canvas by aspect_ratio_ids.

def mllama_language_model(model):
    """Mllama's text model: the module with .layers and .cross_attention_layers."""
    for module in model.modules():
        if hasattr(module, "cross_attention_layers") and hasattr(module, "layers"):
            return module
    raise ValueError(f"{type(model).__name__} has no Mllama text model (a module with .layers and "
                     f".cross_attention_layers)")


def cross_attention_layers(model):
    """Indices (in language_model(model).layers) of Mllama's cross-attention layers, in order."""
    return sorted(mllama_language_model(model).cross_attention_layers)


def cross_attention(model, layer):
    """The text-to-image attention module of decoder layer `layer` (MllamaTextCrossAttention)."""
    block = mllama_language_model(model).layers[layer]
    if not hasattr(block, "cross_attn"):
        raise ValueError(f"language_model.layers[{layer}] is not a cross-attention layer; "
                         f"use cross_attention_layers(model) to list them")
    return block.cross_attn


def mllama_query_key(attn):
    """Mllama's cross-attention: q_norm / k_norm outputs (B, heads, T, D) are what softmax reads."""
    return attn.q_norm, attn.k_norm, attn.q_norm.forward, attn.k_norm.forward


def mllama_vision_geometry(model):
    """(tile_size px, patch_size px, max_num_tiles, supported_aspect_ratios) of the model's tiles."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "vision_config"):
            v = config.vision_config
            ratios = [tuple(r) for r in v.supported_aspect_ratios]
            return v.image_size, v.patch_size, v.max_num_tiles, ratios
    raise ValueError(f"{type(model).__name__} has no config.vision_config")


def load_mllama(source, dtype, device=None, local_files_only=False):
    """(model, processor) of an Mllama folder or hub id, the weights on `device` as they load."""
    processor = MllamaProcessor.from_pretrained(source, local_files_only=local_files_only)
    model = MllamaForConditionalGeneration.from_pretrained(source, dtype=dtype, device_map=device,
                                                           local_files_only=local_files_only)
    return model, processor


# One entry per family; a new family adds its file (builders, loader, where its layers are, its
# geometry) and one entry here, plus its config.model_type in MODEL_FAMILIES and its presets.
# data.py reads the last four: prompts in the processor's chat template unless prompt_texts,
# processor_batch and prompt_problem give the family's own; image_tokens counts the image tokens
# the processor adds beyond the prompt text (None: none).
FAMILIES = {
    "mllama": dict(language_model=mllama_language_model, attention_layers=cross_attention_layers,
                   attention_module=cross_attention, load=load_mllama, lora_targets=LORA_TARGETS,
                   query_key=mllama_query_key, vision_geometry=mllama_vision_geometry, attention="cross",
                   processor=MllamaProcessor, prompt_texts=None, processor_batch=None, prompt_problem=None,
                   image_tokens=None),
    "idefics": dict(language_model=flamingo.language_model, attention_layers=flamingo.cross_attention_layers,
                    attention_module=flamingo.cross_attention, load=flamingo.load,
                    lora_targets=flamingo.LORA_TARGETS, query_key=flamingo.query_key,
                    vision_geometry=flamingo.vision_geometry, attention="cross", processor=IdeficsProcessor,
                    prompt_texts=flamingo.prompt_texts, processor_batch=flamingo.processor_batch,
                    prompt_problem=flamingo.prompt_problem, image_tokens=None),
    "qwen2vl": dict(language_model=qwen.language_model, attention_layers=qwen.attention_layers,
                    attention_module=qwen.attention_module, load=qwen.load, lora_targets=LORA_TARGETS,
                    query_key=None, vision_geometry=qwen.vision_geometry, attention="self",
                    processor=qwen.QwenImageTextProcessor, prompt_texts=None, processor_batch=None,
                    prompt_problem=None, image_tokens=qwen.image_tokens),
}
