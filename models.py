"""The models: every preset (VLM and DM) in one table, one builder per model class, the loaders,
and per family where the language model, its attention layers and the image geometry are (§5, §6).

A preset is a name (`--model llama32`, `--dm sd14`): a hub id, or a size built from a config
(random weights: the tiny presets of the tests, the benchmarks' scaled geometries), or a folder
that toy.py trains. The same builder makes every size of a class: `mllama.mllama` the
Llama-3.2-Vision classes (tiny, toy, llama32 at 1/16 width), `stable_diffusion` SD's diffusers
parts (tiny-sd, toy-sd, sd14's geometry; teachers.py builds tiny-sd21 and tiny-sdxl). The tiny
presets' tokenizers are built here in memory. With no network and no local copy, one error names
the preset, the hub id and how to point at a local folder. The last part holds what differs
between model families: one FAMILIES entry per family (Mllama's cross-attention in mllama.py;
IDEFICS' gated cross-attention in flamingo.py; Qwen2-VL's self-attention in qwen.py, its capture
in selfattn.py), which the per-family functions (language_model, attention_layers,
vision_geometry, ...) dispatch through.

    python -c "import models; m, p = models.tiny_vlm(); print(models.attention_layers(m))"
"""
import inspect
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as bpe_models
from transformers import IdeficsProcessor, MllamaProcessor, PreTrainedTokenizerFast

import flamingo
import hub
import mllama
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
    "llama32": dict(
        kind="vlm", family="mllama", hub_id="meta-llama/Llama-3.2-11B-Vision-Instruct",
        path=None, about="40 text layers, cross-attention at 3, 8, ..., 38; 560 px tiles"),
    "tiny": dict(
        kind="vlm", family="mllama", hub_id=None, path=None,
        about="the llama32 classes at a tiny size, random weights (tests)"),
    "toy": dict(
        kind="vlm", family="mllama", hub_id=None, path="toy_models/toy-vlm",
        about="the llama32 classes at toy size, pre-trained on the miniature world"),
    "idefics": dict(
        kind="vlm", family="idefics", hub_id="HuggingFaceM4/idefics-9b-instruct", path=None,
        about="Flamingo-style: 32 LLaMA layers, gated cross-attention before "
              "every 4th; 64 resampler latents"),
    "tiny-idefics": dict(
        kind="vlm", family="idefics", hub_id=None, path=None,
        about="IDEFICS' classes at a tiny size with a resampler, random weights (tests)"),
    "qwen2vl": dict(
        kind="vlm", family="qwen2vl", hub_id="Qwen/Qwen2-VL-7B-Instruct", path=None,
        about="self-attention only: 28 layers, 28 heads (4 KV heads), "
              "2x2-merged 14 px patches"),
    "qwen25vl": dict(
        kind="vlm", family="qwen2vl", hub_id="Qwen/Qwen2.5-VL-7B-Instruct", path=None,
        about="Qwen2-VL's successor: the same text side, a windowed vision encoder"),
    "tiny-qwen2vl": dict(
        kind="vlm", family="qwen2vl", hub_id=None, path=None,
        about="the qwen2vl classes at a tiny size, random weights (tests)"),
    "sd14": dict(
        kind="dm", hub_id="CompVis/stable-diffusion-v1-4", path=None, layers={4},
        about="Stable Diffusion v1.4: attn2 at 64², 32², 16², 8² (512 px)"),
    "tiny-sd": dict(
        kind="dm", hub_id=None, path=None, layers=None,
        about="SD's classes at a tiny size, random weights (tests)"),
    "toy-sd": dict(
        kind="dm", hub_id=None, path="toy_models/toy-sd", layers={1},
        about="SD's classes at toy size, trained on the miniature world"),
    "sd21": dict(
        kind="dm", hub_id="stabilityai/stable-diffusion-2-1", path=None, layers={4},
        about="Stable Diffusion 2.1, v-prediction: attn2 at 96², 48², 24², 12² (768)"),
    "tiny-sd21": dict(
        kind="dm", hub_id=None, path=None, layers=None,
        about="sd21's structure at tiny-sd's size, random weights (tests)"),
    "sdxl": dict(
        kind="dm", hub_id="stabilityai/stable-diffusion-xl-base-1.0", path=None,
        layers={4}, text_encoders=2, about="SDXL base 1.0: attn2 at 64², 32² (1024 px)"),
    "tiny-sdxl": dict(
        kind="dm", hub_id=None, path=None, layers=None, text_encoders=2,
        about="sdxl's structure at tiny-sd's size, random weights (tests)"),
    "sd3": dict(
        kind="dm", hub_id="stabilityai/stable-diffusion-3-medium-diffusers", path=None,
        layers=None, family="mmdit", about="SD3 medium: joint attention, 24 blocks (mmdit.py)"),
    "tiny-sd3": dict(
        kind="dm", hub_id=None, path=None, layers=None, family="mmdit",
        about="sd3's classes at a tiny size, one CLIP encoder, random weights (tests)"),
    "toy-sd21": dict(
        kind="dm", hub_id=None, path="toy_models/toy-sd21", layers={1},
        about="SD 2.x's features (v-prediction) at toy size, trained on the world"),
    "toy-sdxl": dict(
        kind="dm", hub_id=None, path="toy_models/toy-sdxl", layers={2}, text_encoders=2,
        about="SDXL's layout at toy size, trained on the world"),
    "toy-sd3": dict(
        kind="dm", hub_id=None, path="toy_models/toy-sd3", layers=None, family="mmdit",
        about="SD3's joint-attention DiT at toy size, trained on the miniature world"),
}
VLM_PRESETS = [name for name, p in PRESETS.items() if p["kind"] == "vlm"]
DM_PRESETS = [name for name, p in PRESETS.items() if p["kind"] == "dm"]


def preset_path(name):
    """A preset's default local folder (absolute), or None."""
    path = PRESETS[name]["path"]
    return str(ROOT / path) if path else None


# ---- tokenizers built in memory (nothing downloaded) ----

# Special tokens of Llama-3.2-Vision that the chat template and the processor rely on.
LLAMA_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|image|>",
                        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                        "<|finetune_right_pad_id|>"]

# A chat template with the same shape as Llama-3.2-Vision-Instruct's (no system prompt), the tiny
# presets' (mllama.mllama_processor; qwen.tiny_qwen2vl with its image tokens):
# <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>{question}<|eot_id|>
# <|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
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
    roles: another family's special tokens and which is which (flamingo.SPECIAL_TOKENS,
    TOKEN_ROLES)."""
    bpe = Tokenizer(bpe_models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **roles)


def tokenizer_ids(tokenizer, **tokens):
    """The vocabulary size and special token ids a VLM config takes, from its tokenizer: bos, eos,
    pad, and the id of each of `tokens` (config field -> token), e.g. mllama.MLLAMA_TOKENS."""
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for field, token in tokens.items():
        ids[field] = tokenizer.convert_tokens_to_ids(token)
    return ids


# ---- the VLMs: each family's tiny preset from the tokenizers above, and the loader ----

def small_vlm(size, tokenizer, seed=0):
    """(model, processor) at mllama.MLLAMA_SIZES[size] with `tokenizer`, random weights, nothing
    downloaded."""
    size = mllama.MLLAMA_SIZES[size]
    ids = tokenizer_ids(tokenizer, **mllama.MLLAMA_TOKENS)
    model = mllama.mllama(size, ids, seed)
    processor = mllama.mllama_processor(tokenizer, size, CHAT_TEMPLATE)
    return model, processor


def tiny_vlm(seed=0):
    """(model, processor) of the tiny preset: mllama.MLLAMA_SIZES["tiny"], the tiny BPE, random
    weights."""
    return small_vlm("tiny", bpe_tokenizer(), seed)


def tiny_idefics(seed=0, resampler=True, qk_norms=False):
    """(model, processor) of the tiny-idefics preset (flamingo.IDEFICS_SIZES["tiny"], the tiny BPE
    with IDEFICS' special tokens, random weights); resampler=False: CLS + patch keys; qk_norms:
    q/k norms."""
    corpus = TINY_CORPUS + flamingo.CORPUS
    tokenizer = bpe_tokenizer(corpus, special=flamingo.SPECIAL_TOKENS,
                              roles=flamingo.TOKEN_ROLES)
    ids = tokenizer_ids(tokenizer)
    return flamingo.tiny_idefics(tokenizer, ids, seed, resampler, qk_norms)


def tiny_qwen2vl(seed=0, model_type="qwen2_vl"):
    """(model, processor) of tiny-qwen2vl (qwen.QWEN_TINY; model_type "qwen2_5_vl": Qwen2.5-VL's
    classes): the tiny BPE with Qwen's vision tokens, the chat template above, random weights."""
    tokenizer = bpe_tokenizer()
    vision_tokens = list(qwen.QWEN_TOKENS.values())
    tokenizer.add_special_tokens({"additional_special_tokens": vision_tokens})
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
    tiny = {"tiny": tiny_vlm, "tiny-idefics": tiny_idefics, "tiny-qwen2vl": tiny_qwen2vl}
    built = tiny.get(name)
    if built is not None and path is None:  # built here from a config
        model, processor = built()
        return model.to(device=device, dtype=dtype), processor
    hub_id, path = PRESETS[name]["hub_id"], path or preset_path(name)
    if hub_id is None and not Path(path).is_dir():
        raise SystemExit(f"--model {name}: no model folder at {path!r}; for 'toy' run `python "
                         f"toy.py` first (it writes toy_models/toy-vlm), or pass --model-path DIR "
                         f"(a save_pretrained folder)")
    source, local = hub.weights_source("--model", name, hub_id, path)
    load = FAMILIES[PRESETS[name]["family"]]["load"]
    try:
        return load(source, dtype, device, local)
    except (OSError, ValueError) as err:  # ValueError: neither a folder nor a hub id
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
# Text encoder: hidden 64, two causal layers, 24 positions (SD: 77; with 77 the ~65 padding
# columns took ~70% of every pixel's attention, and the world's longest caption is 21 tokens with
# the start and end tokens). Why this recipe (world v1, toy-sd pointing on 750 held-out caption
# words, toy_report.md): a 2-level VAE (16x16 latents) with a position-free, layer-free encoder (a
# bag of word vectors) pointed 46%: colour words 89%, shape words 2%. A bag of words
# cannot tell which shape goes with which colour in "a red circle left of a blue square", so the
# UNet learned to ignore shape words. This recipe points 84.5% (colour 91%, shape 78%); with one
# causal layer it pointed 71% (colour 99%, shape 43%). Our reading: causal layers let "circle" read
# the "red" before it, as SD's CLIP binds attributes; the full-resolution level gives the
# cross-attention layers shape features to query with.
SD_SIZES = {
    "tiny-sd": {
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4,
                    block_out_channels=(16, 32),
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
                    up_block_types=("UpDecoderBlock2D",) * 4,
                    block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
        "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=12,
                             max_position_embeddings=77, projection_dim=768)},
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
        # (diffusers warns on any dtype .to(), even a no-op)
        if part in dm and dtype != torch.float32:
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
    dm = {part: cls.from_pretrained(folder, subfolder=part, **local)
          for part, cls in parts.items()}
    if text_encoders == 2:
        dm.update(teachers.load_second_encoder(folder, local_files_only))
    scheduler = DDIMScheduler.from_config(scheduler_config(schedule, DDIMScheduler))
    return dict(dm, scheduler=scheduler)


def load_dm(name, path=None, device="cpu", dtype=torch.float32):
    """dict(vae, unet, text_encoder, tokenizer, scheduler, res, name) of a --dm preset, frozen, in
    eval mode.

    One code path for every preset given a folder in diffusers component layout; "tiny-sd",
    "tiny-sd21" and "tiny-sdxl" without a path are built here. res = unet sample_size * the
    VAE's downsampling factor. Hub presets load from local files only when they can
    (hub.weights_source), else fail fast."""
    if name not in DM_PRESETS:
        raise SystemExit(f"unknown --dm {name!r}; choose one of {DM_PRESETS} or give --dm-path")
    hub_id = PRESETS[name]["hub_id"]
    if PRESETS[name].get("family") == "mmdit":  # SD3's DiT
        return mmdit.load(name, path, hub_id, preset_path(name), device, dtype)
    dm = tiny_sd() if name == "tiny-sd" and path is None else None
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
MODEL_FAMILIES = {"mllama": "mllama", "idefics": "idefics", "qwen2_vl": "qwen2vl",
                  "qwen2_5_vl": "qwen2vl"}


def base_model(model):
    """The model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_config(model):
    """The language model's config: its heads (num_attention_heads), its context
    (max_position_embeddings). IDEFICS keeps them in its top-level config."""
    config = base_model(model).config
    return getattr(config, "text_config", config)


def family(model):
    """The family of a model (plain, PEFT-wrapped or FSDP-sharded): "mllama", "idefics" or
    "qwen2vl"."""
    model_type = getattr(base_model(model).config, "model_type", None)
    if model_type not in MODEL_FAMILIES:
        families = sorted(set(MODEL_FAMILIES.values()))
        raise ValueError(f"{type(base_model(model)).__name__} (model_type {model_type!r}) is not "
                         f"a supported VLM; the families are {families}")
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
    """The text-to-image attention module of attention layer `layer` (it has q_proj and
    k_proj)."""
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
    supported_aspect_ratios: mllama.mllama_vision_geometry), or a family's dict(family, placed,
    image_maps: (probs, batch) -> maps) that aggregate.image_maps calls (flamingo.vision_geometry,
    qwen.vision_geometry)."""
    return FAMILIES[family(model)]["vision_geometry"](model)


def processor_family(processor):
    """The family whose processor `processor` is (FAMILIES "processor": its class)."""
    for name, entry in FAMILIES.items():
        if isinstance(processor, entry["processor"]):
            return name
    raise ValueError(f"{type(processor).__name__} is not the processor of a supported VLM; the "
                     f"families are {sorted(FAMILIES)}")


def maps_have_positions(model):
    """False where a map's cells are not places in the image: IDEFICS with its resampler, whose
    latents sit on a square grid by convention (flamingo.py); pointing is then not measured."""
    geometry = vision_geometry(model)
    return not isinstance(geometry, dict) or geometry["placed"]


# One entry per family; a new family adds its file (builders, loader, where its layers are, its
# geometry) and one entry here, plus its config.model_type in MODEL_FAMILIES and its presets.
# data.py reads the last four: prompts in the processor's chat template unless prompt_texts,
# processor_batch and prompt_problem give the family's own; image_tokens counts the image tokens
# the processor adds beyond the prompt text (None: none).
FAMILIES = {
    "mllama": dict(
        language_model=mllama.mllama_language_model,
        attention_layers=mllama.cross_attention_layers,
        attention_module=mllama.cross_attention, load=mllama.load_mllama,
        lora_targets=LORA_TARGETS, query_key=mllama.mllama_query_key,
        vision_geometry=mllama.mllama_vision_geometry, attention="cross",
        processor=MllamaProcessor, prompt_texts=None, processor_batch=None,
        prompt_problem=None, image_tokens=None),
    "idefics": dict(
        language_model=flamingo.language_model,
        attention_layers=flamingo.cross_attention_layers,
        attention_module=flamingo.cross_attention, load=flamingo.load,
        lora_targets=flamingo.LORA_TARGETS, query_key=flamingo.query_key,
        vision_geometry=flamingo.vision_geometry, attention="cross",
        processor=IdeficsProcessor, prompt_texts=flamingo.prompt_texts,
        processor_batch=flamingo.processor_batch, prompt_problem=flamingo.prompt_problem,
        image_tokens=None),
    "qwen2vl": dict(
        language_model=qwen.language_model,
        attention_layers=qwen.attention_layers,
        attention_module=qwen.attention_module, load=qwen.load,
        lora_targets=LORA_TARGETS, query_key=None,
        vision_geometry=qwen.vision_geometry, attention="self",
        processor=qwen.QwenImageTextProcessor, prompt_texts=None, processor_batch=None,
        prompt_problem=None, image_tokens=qwen.image_tokens),
}
