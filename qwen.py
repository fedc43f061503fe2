"""The self-attention family (paper §4.4 "Self-Attention Only"): Qwen2-VL and Qwen2.5-VL
(`--model qwen2vl`, `qwen25vl`, `tiny-qwen2vl`), the model side.

The paper's self-attention model, MiniCPM-Llama3-V-2.5, has no class in transformers; Qwen2-VL and
Qwen2.5-VL stand for it. The image is a run of <|image_pad|> tokens inside the text, (h/2) x (w/2)
of them for a grid of h x w 14 px patches (image_grid_thw (1, h, w); each token merges 2x2
patches), row-major, covering the whole image (smart_resize scales it to multiples of 28 px: no
padding, no crop). Every decoder layer's self_attn could be read; attention_layers picks 7 spread
over depth at 7B. What this file holds, for models.FAMILIES: the builders (tiny and benchmark
sizes, from a config), the processor and the loader, where the attention layers are, the LoRA
targets and the image geometry (grid_maps). The capture that reads these layers is selfattn.py's.

    python -c "import models; m, p = models.tiny_qwen2vl(); print(models.attention_layers(m))"
"""
import torch
from transformers import (AutoModelForImageTextToText, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil,
                          Qwen2VLProcessor)
from transformers.processing_utils import ProcessorMixin

from aligner import MAP_SIZE, area_matrix

# Qwen's own suggested bound on an image (its README: max_pixels = 1280 * 28 * 28): at most 1280
# image tokens per image, against 16384 with the processor's default.
QWEN_MAX_PIXELS = 1280 * 28 * 28
QWEN_TOKENS = dict(image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                   vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
# what stands for <|image|> in the chat template
IMAGE_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"


# tiny-qwen2vl: text hidden 64, 4 layers, 4 heads (2 KV heads) of dim 16 (M-RoPE sections 2+3+3 =
# 16 / 2); vision 32 wide, 2 blocks, 14 px patches merged 2x2; images of at most 8x8 merged
# tokens. "qwen2_5_vl": the same text side with Qwen2.5-VL's vision tower (windows of 2x2 merged
# tokens, block 1 full attention), so the tests cover its window permutation.
QWEN_TINY = dict(
    text=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, max_position_embeddings=1024,
              rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                   mrope_section=[2, 3, 3])),
    qwen2_vl=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64),
    qwen2_5_vl=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                    out_hidden_size=64, window_size=56, fullatt_block_indexes=[1]),
    max_pixels=64 * 28 * 28)


# ---- builders: Qwen2-VL and Qwen2.5-VL at tiny and benchmark sizes, from a config ----

def qwen2vl_size(width=16):
    """(text, vision) fields of Qwen2-VL-7B at 1/`width` width, all depths kept: 28 layers, 28 heads
    / 4 KV heads of dim 128 / width, MLP 18944 / width; vision 32 blocks 1280 / width wide. Width
    16 (the benchmarks'): hidden 224 = 3584 / 16, head dim 8, vision 80 wide in 4 heads."""
    # M-RoPE's (temporal, height, width) sections split half the head dim 2:3:3
    half = 64 // width
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # width 1: [16, 24, 24]
    rope = dict(rope_type="default", rope_theta=1e6, mrope_section=section)
    text = dict(hidden_size=3584 // width, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, intermediate_size=18944 // width,
                max_position_embeddings=4096, rope_parameters=rope)
    # vision heads of dim 80 (1/16: 20): its 2-D RoPE needs 4 | dim
    heads = 16 // max(1, width // 4)
    vision = dict(depth=32, embed_dim=1280 // width, num_heads=heads, mlp_ratio=4,
                  hidden_size=3584 // width)
    return text, vision


def bench_model(width=16, side=448, device="cpu", dtype=torch.float32, batch_size=1):
    """Qwen2-VL-7B's proportions at 1/`width` width (qwen2vl_size; default 1/16; bench.py
    aggregate --model qwen2vl), random weights: 28 layers of hidden 224, 28 heads / 4 KV heads of
    dim 8, vocab 9504 = 152064 / 16; vision 32 blocks 80 wide. One `side` px image (448: 32 x 32
    patches -> 16 x 16 = 256 image tokens, as bench.bench_model's 260) inside 256 text tokens, 32
    captured rows in the 7 aligned layers (3, 7, ..., 27). The same inputs as bench.bench_model,
    so the families' figures compare."""
    vocab, tokens = 152064 // width, (side // 28) ** 2
    # the last ids of the vocabulary: image, video, start, end
    vision_ids = {k: vocab - 1 - i for i, k in enumerate(QWEN_TOKENS)}
    ids = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, **vision_ids)
    model = qwen2vl(qwen2vl_size(width), ids, device=device, dtype=dtype).eval()
    T, R, B = 256 + tokens, 32, batch_size
    input_ids = torch.randint(3, vocab - 8, (1, T)).repeat(B, 1)  # (B, T): the same sample B times
    input_ids[:, 1] = vocab - 3  # <|vision_start|>
    input_ids[:, 2:2 + tokens] = vocab - 1  # <|image_pad|>
    input_ids[:, 2 + tokens] = vocab - 4  # <|vision_end|>
    types_ = (input_ids == vocab - 1).int()  # mm_token_type_ids: 1 at image tokens
    attention_mask = torch.ones(B, T, dtype=torch.long)
    patches = torch.randn(B * tokens * 4, 3 * 2 * 14 * 14, dtype=dtype, device=device)
    grid = torch.tensor([[1, side // 14, side // 14]] * B)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=types_,
                 pixel_values=patches, image_grid_thw=grid)
    rows = torch.arange(T - R - 1, T - 1)[None].repeat(B, 1)  # (B, R): the last R positions
    return model, batch, rows


class QwenImageTextProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor for images and text: the stock one also builds a video processor,
    which needs torchvision even when no video is given; this one has only the image processor
    (the PIL backend) and the tokenizer, and makes the same batches (input_ids with one
    <|image_pad|> per merged token, mm_token_type_ids, pixel_values, image_grid_thw)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def qwen2vl(size, ids, model_type="qwen2_vl", seed=0, device="cpu", dtype=None):
    """Qwen2VLForConditionalGeneration (model_type "qwen2_vl") or Qwen2_5_VL... ("qwen2_5_vl") at
    `size` ((text, vision) fields), random weights, deterministic by seed, on `device`. ids:
    vocab_size, bos/eos/pad_token_id and the ids of QWEN_TOKENS."""
    classes = {"qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
               "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)}
    config_class, model_class = classes[model_type]
    text = {k: ids[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    vision_ids = {k: ids[k] for k in QWEN_TOKENS}
    config = config_class(text_config={**size[0], **text}, vision_config=size[1], **vision_ids)
    torch.manual_seed(seed)
    with torch.device(device):
        dtypes = {"dtype": dtype} if dtype else {}
        return model_class._from_config(config, **dtypes)


def tiny_qwen2vl(tokenizer, ids, chat_template, seed=0, model_type="qwen2_vl"):
    """(model, processor) of QWEN_TINY (model_type "qwen2_5_vl": Qwen2.5-VL's classes) with
    `tokenizer` (Qwen's vision tokens among its special tokens), its `ids` (models.tokenizer_ids
    with QWEN_TOKENS) and a Llama-shaped `chat_template` whose <|image|> becomes IMAGE_TOKENS,
    random weights."""
    images = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=QWEN_TINY["max_pixels"])
    template = chat_template.replace("<|image|>", IMAGE_TOKENS)
    processor = QwenImageTextProcessor(images, tokenizer, chat_template=template)
    size = (QWEN_TINY["text"], QWEN_TINY[model_type])
    return qwen2vl(size, ids, model_type, seed), processor


def load(source, dtype, device=None, local_files_only=False):
    """(model, processor) of a Qwen2-VL or Qwen2.5-VL folder or hub id, the weights placed on
    `device` as they load; images bounded by QWEN_MAX_PIXELS (or the folder's own max_pixels
    when smaller)."""
    local = dict(local_files_only=local_files_only)
    processor = QwenImageTextProcessor.from_pretrained(source, **local)
    bound = min(processor.image_processor.size["longest_edge"], QWEN_MAX_PIXELS)
    images = Qwen2VLImageProcessorPil.from_pretrained(source, max_pixels=bound, **local)
    processor.image_processor = images
    # adapter_kwargs: the Auto class looks for an adapter_config.json without local_files_only
    # (transformers 5.25), which would reach for the network from a complete cache
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, device_map=device,
                                                        adapter_kwargs=local, **local)
    return model, processor


def image_tokens(processor, image):
    """Tokens the processor adds for `image` beyond its one <|image_pad|> in the chat template:
    (h/2)·(w/2) - 1, one <|image_pad|> per merged token."""
    images = processor.image_processor
    patches = images.get_number_of_image_patches(image.height, image.width)
    return patches // images.merge_size ** 2 - 1


# ---- where the attention layers are, and the image geometry ----

def _base(model):
    """The model inside a PeftModel (models.base_model, which imports this file)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def language_model(model):
    """Qwen2-VL's text model (Qwen2VLTextModel / Qwen2_5_VLTextModel), inside a PeftModel too."""
    return _base(model).model.language_model


def attention_layers(model):
    """Every (n // 7)-th of the n decoder layers, ending at the last: 28 (7B) -> 3, 7, ..., 27, as
    Mllama spaces its 8 cross-attention layers in 40 (every 5th from 3); 4 (tiny) -> all four."""
    n = len(language_model(model).layers)
    stride = max(1, n // 7)
    return list(range(n - 1 - stride * ((n - 1) // stride), n, stride))


def attention_module(model, layer):
    """The self-attention module of decoder layer `layer` (Qwen2VLAttention)."""
    return language_model(model).layers[layer].self_attn


def vision_geometry(model):
    """dict(family, placed: True (every cell is a place in the image), image_maps: probs (B, L, H,
    R, N), batch -> (B, L, H, R, 32, 32) through grid_maps); aggregate.image_maps calls it."""
    merge = _base(model).config.vision_config.spatial_merge_size
    return dict(family="qwen2vl", placed=True,
                image_maps=lambda probs, batch: grid_maps(probs, batch["image_grid_thw"], merge))


def grid_maps(probs, image_grid_thw, merge):
    """Image-token attention -> 32x32 maps over each sample's image (§4.4).

    probs (B, ..., N): sample b's first (h/merge)·(w/merge) columns are its image tokens,
    row-major, where image_grid_thw[b] = (1, h, w) in patches; the tokens cover the whole
    (resized) image, so each output cell is the area-weighted mean of the tokens it overlaps.
    -> (B, ..., 32, 32).
    Worked example: a 2x4 token grid of one token at row 0, column 3 -> mass in the top-right
    16x8 cells.
    """
    if image_grid_thw.shape[0] != probs.shape[0]:
        raise ValueError(f"image_grid_thw has {image_grid_thw.shape[0]} images for "
                         f"{probs.shape[0]} samples: Lavender maps exactly one image per sample")
    out = []
    for b, (t, h, w) in enumerate(image_grid_thw.tolist()):
        gh, gw = h // merge, w // merge
        x = probs[b, ..., :t * gh * gw].reshape(*probs.shape[1:-1], gh, gw)  # (..., gh, gw)
        m_h = area_matrix(MAP_SIZE, gh, gh, 1, x.device, x.dtype)  # (32, gh)
        m_w = area_matrix(MAP_SIZE, gw, gw, 1, x.device, x.dtype)  # (32, gw)
        out.append(m_h @ x @ m_w.T)
    return torch.stack(out)  # (B, ..., 32, 32)
