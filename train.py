"""Lavender fine-tuning: the torchrun + FSDP2 training loop (paper §5, §6, §8.1.1, §9).

Status: only the model presets are here so far; the loop lands with issue #4.

    python train.py --model tiny ...                       # one process, CPU
    torchrun --nproc_per_node 8 train.py --model llama32   # a GPU node
"""
import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil,
                          MllamaProcessor, PreTrainedTokenizerFast)

# ---------------------------------------------------------------------------------------------
# model presets: --model NAME picks one; --model-path points at a local copy
# ---------------------------------------------------------------------------------------------

# Special tokens of Llama-3.2-Vision that the chat template and the processor rely on.
LLAMA_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|image|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"]

# A chat template with the same shape as Llama-3.2-Vision-Instruct's (no system prompt):
# <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>{question}<|eot_id|>
# <|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

# Text the tiny byte-level BPE is trained on: small enough that common words are one token and
# rarer ones split into pieces ("red" -> "re" "d"), as Llama's tokenizer splits rare words.
TINY_CORPUS = [
    "a red circle left of a blue square", "what colour is the circle?", "what shape is red?",
    "how many objects are there?", "is there a green triangle?", "yes", "no", "two", "three",
    "the photograph shows two dogs playing on the grass", "describe the image in one sentence.",
    "a man riding a horse on a beach", "user", "assistant",
]

VLM_PRESETS = {
    # name: hub id (None: built here), what it is
    "llama32": {"hub_id": "meta-llama/Llama-3.2-11B-Vision-Instruct",
                "about": "Llama-3.2-11B-Vision-Instruct: 40 text layers, cross-attention at 3, 8, ..., 38"},
    "tiny": {"hub_id": None, "about": "the llama32 classes from a tiny config, random weights (tests)"},
    "toy": {"hub_id": None, "about": "a tiny Mllama pre-trained by toy.py on the miniature world"},
}


def tiny_tokenizer():
    """A byte-level BPE tokenizer with Llama-3.2-Vision's special tokens, built in memory."""
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=LLAMA_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TINY_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>")


def tiny_vlm(seed=0, tile_size=56, max_tiles=4):
    """(model, processor): Mllama classes at toy size, random weights, nothing downloaded.

    Text: hidden 64, 5 layers, cross-attention at layers 1 and 3, 4 heads (2 KV heads).
    Vision: hidden 32, 56 px tiles of 14 px patches (4x4 patches + CLS = 17 tokens a tile), up to 4 tiles.
    """
    tokenizer = tiny_tokenizer()
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessorPil(size={"height": tile_size, "width": tile_size}, max_image_tiles=max_tiles),
        tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE)
    config = MllamaConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                           intermediate_size=64, vision_output_dim=32 * 3, image_size=tile_size, patch_size=14,
                           max_num_tiles=max_tiles, intermediate_layers_indices=[0, 1]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, cross_attention_layers=[1, 3],
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, max_position_embeddings=1024),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"))
    torch.manual_seed(seed)
    return MllamaForConditionalGeneration(config), processor


def load_vlm(name, path=None, dtype=torch.float32):
    """(model, processor) for a preset name; `path` is a local copy (a save_pretrained folder)."""
    if name not in VLM_PRESETS:
        raise SystemExit(f"unknown --model {name!r}; choose one of {sorted(VLM_PRESETS)}")
    if name == "tiny" and path is None:
        model, processor = tiny_vlm()
        return model.to(dtype), processor
    source = path or VLM_PRESETS[name]["hub_id"]
    if source is None:
        raise SystemExit(f"--model {name} needs --model-path (for 'toy': run `python toy.py build` first)")
    try:
        processor = MllamaProcessor.from_pretrained(source)
        model = MllamaForConditionalGeneration.from_pretrained(source, dtype=dtype)
    except OSError as err:
        raise SystemExit(
            f"could not load --model {name} from {source!r}: {err}\n"
            f"Download {VLM_PRESETS[name]['hub_id'] or 'the weights'} on a machine with network access "
            f"(e.g. `hf download {VLM_PRESETS[name]['hub_id']} --local-dir DIR`) and pass --model-path DIR.") from None
    return model, processor
