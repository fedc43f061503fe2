"""§5, §6: Llama-3.2-Vision's family (Mllama): `--model llama32`, `tiny`, `toy`, the model side.

Llama-3.2-Vision is the paper's main model: a Llama 3 text decoder whose self-attention layers
are interleaved with cross-attention decoder layers (`cross_attn`, with q_norm / k_norm), in which
the text queries read the image keys. An image comes in tiles of 1 CLS + P² patch tokens, placed
on a canvas by aspect_ratio_ids (aggregate.py rebuilds the image grid from them). What this file
holds, for models.FAMILIES: the builders (tiny, toy and llama32 at 1/width, from a config), the
processor and the loader, where the cross-attention layers and their queries and keys are, and
the tile geometry. The tiny tokenizer and the chat template are models.py's (models.bpe_tokenizer,
models.CHAT_TEMPLATE), shared with the other families' tiny presets.

    python -c "import models, mllama; print(mllama.cross_attention_layers(models.tiny_vlm()[0]))"
"""
import torch
from transformers import (MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil,
                          MllamaProcessor)

# ---- builders: Mllama at tiny, toy and llama32 sizes, from a config ----

# (text, vision) config fields. tiny: hidden 64, 5 layers, cross-attention at 1 and 3, 4 heads (2
# KV heads); vision hidden 32, 56 px tiles of 14 px patches (4x4 patches + CLS = 17 tokens a tile),
# up to 4 tiles. toy: hidden 128; vision hidden 64, 4 + 1 layers, one 32 px tile of 4 px patches
# (8x8 + CLS = 65 tokens), max_num_tiles 1 with the one aspect ratio 1x1, so no padding tiles are
# encoded (4x less vision work).
MLLAMA_SIZES = {
    "tiny": (
        dict(hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=128,
             cross_attention_layers=[1, 3], max_position_embeddings=1024),
        dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1,
             attention_heads=2, intermediate_size=64, vision_output_dim=32 * 3,
             image_size=56, patch_size=14, max_num_tiles=4,
             intermediate_layers_indices=[0, 1])),
    "toy": (
        dict(hidden_size=128, num_hidden_layers=5, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=256,
             cross_attention_layers=[1, 3], max_position_embeddings=256),
        dict(hidden_size=64, num_hidden_layers=4, num_global_layers=1,
             attention_heads=4, intermediate_size=128, vision_output_dim=64 * 3,
             image_size=32, patch_size=4, max_num_tiles=1,
             supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[1, 3])),
}


def llama32_size(width=1, tile_size=560):
    """(text, vision) fields of Llama-3.2-11B-Vision at 1/`width` width (1, 2, 4, 8 or 16), all
    depths kept: 40 text layers, cross-attention at 3, 8, ..., 38, 32 heads / 8 KV heads (head dim
    128 / width); vision 32 + 8 global layers, 16 heads, 14 px patches in up to 4 tiles. Width 16
    (the benchmarks'): hidden 256 = 4096 / 16, MLP 896 = 3.5x, vision hidden 80 = 1280 / 16."""
    if width not in (1, 2, 4, 8, 16):
        raise ValueError(f"llama32 width {width}: choose 1, 2, 4, 8 or 16 "
                         f"(its widths divided by it)")
    hidden, vision = 4096 // width, 1280 // width
    text_config = dict(hidden_size=hidden, num_hidden_layers=40, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=hidden * 7 // 2,
                       cross_attention_layers=list(range(3, 40, 5)),
                       max_position_embeddings=1024)
    vision_config = dict(hidden_size=vision, num_hidden_layers=32, num_global_layers=8,
                         attention_heads=16, intermediate_size=4 * vision,
                         vision_output_dim=vision * 6, image_size=tile_size, patch_size=14,
                         max_num_tiles=4, intermediate_layers_indices=[3, 7, 15, 23, 30])
    return text_config, vision_config


# The image token of Mllama's config, by config field (qwen.QWEN_TOKENS: Qwen2-VL's four), for
# models.tokenizer_ids.
MLLAMA_TOKENS = dict(image_token_index="<|image|>")


def mllama(size, ids, seed=0, device="cpu", dtype=None):
    """MllamaForConditionalGeneration at `size` ((text, vision) fields: MLLAMA_SIZES, llama32_size),
    random weights, deterministic by seed, built on `device` (11B parameters are not initialised on
    a CPU to be moved). ids: vocab_size, bos/eos/pad_token_id, image_token_index
    (models.tokenizer_ids)."""
    text, vision = size
    special = {k: v for k, v in ids.items() if k != "image_token_index"}
    config = MllamaConfig(vision_config=vision, text_config={**text, **special},
                          image_token_index=ids["image_token_index"])
    torch.manual_seed(seed)
    with torch.device(device):
        # none given: the config's default (fp32)
        dtypes = {"dtype": dtype} if dtype else {}
        return MllamaForConditionalGeneration._from_config(config, **dtypes)


def mllama_processor(tokenizer, size, chat_template):
    """The MllamaProcessor of a size: its tiles, `tokenizer` and `chat_template`
    (models.CHAT_TEMPLATE for the tiny and toy presets)."""
    vision = size[1]
    side = vision["image_size"]
    tiles = MllamaImageProcessorPil(size={"height": side, "width": side},
                                    max_image_tiles=vision["max_num_tiles"])
    return MllamaProcessor(image_processor=tiles, tokenizer=tokenizer,
                           chat_template=chat_template)


def load_mllama(source, dtype, device=None, local_files_only=False):
    """(model, processor) of an Mllama folder or hub id, the weights on `device` as they load."""
    local = dict(local_files_only=local_files_only)
    processor = MllamaProcessor.from_pretrained(source, **local)
    model = MllamaForConditionalGeneration.from_pretrained(
        source, dtype=dtype, device_map=device, **local)
    return model, processor


# ---- where the cross-attention is, its queries and keys, and the tile geometry ----

def mllama_language_model(model):
    """Mllama's text model: the module with .layers and .cross_attention_layers."""
    for module in model.modules():
        if hasattr(module, "cross_attention_layers") and hasattr(module, "layers"):
            return module
    raise ValueError(f"{type(model).__name__} has no Mllama text model (a module with .layers "
                     f"and .cross_attention_layers)")


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
    """(tile_size px, patch_size px, max_num_tiles, supported_aspect_ratios) of the model's
    tiles."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "vision_config"):
            v = config.vision_config
            ratios = [tuple(r) for r in v.supported_aspect_ratios]
            return v.image_size, v.patch_size, v.max_num_tiles, ratios
    raise ValueError(f"{type(model).__name__} has no config.vision_config")
