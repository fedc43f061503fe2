"""Tests of data.py's formats: the attention store, the dataset JSONL, images of any mode.

    python -m pytest -q tests/test_data.py        # seconds, nothing downloaded
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data


# ---- the attention store, the dataset JSONL, images --------------------------------------------

def test_store_round_trip_and_reads_the_documented_format(tiny_dataset, tmp_path):
    maps = torch.rand(3, 32, 32)
    meta = {"text": "a b c", "dm": "t", "res": 512}
    data.save_maps(tmp_path / "x.safetensors", maps, ["a", "b", "c"], meta)
    back, words, meta = data.load_maps(tmp_path / "x.safetensors")
    assert words == ["a", "b", "c"] and meta["res"] == 512 and torch.allclose(back, maps, atol=1e-3)
    with pytest.raises(ValueError, match="one per word"):
        data.save_maps(tmp_path / "y.safetensors", maps, ["a", "b"], {})
    # files written by the fixture straight from the DESIGN.md spec (not by save_maps)
    attn = Path(tiny_dataset).parent / "attn"
    maps, words, meta = data.load_maps(data.maps_path(attn, "item000"))
    assert words == ["red", "circle"] and maps.shape == (2, 32, 32) and meta["inversion_steps"] == 5


def test_read_items_names_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a", "image": "a.png", "question": "q", "answer": "x"}\n'
                    '{"id": "b", "image": "b.png"}\n')
    with pytest.raises(ValueError, match="line 2.*'question'"):
        data.read_items(path)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "1", "LA"])
def test_images_of_any_mode_become_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    img = rgb.convert("L").convert(mode) if mode in ("I;16", "1", "LA") else rgb.convert(mode)
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    img.save(path)
    x = data.load_image(path, 16)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.05


def test_sixteen_bit_white_and_transparent_pixels_become_white(tmp_path):
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "w16.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    # palette colour 0 (black) transparent
    Image.new("P", (8, 8), 0).save(tmp_path / "clear-palette.png", transparency=0)
    for name in ("w16.png", "clear.png", "clear-palette.png"):
        assert torch.allclose(data.load_image(tmp_path / name, 8), torch.ones(3, 8, 8))


@pytest.mark.parametrize("preset", ["tiny", "tiny-idefics", "tiny-qwen2vl"])
def test_labels_are_the_answer_and_its_end_token_in_every_family(preset, tmp_path):
    """collate's labels (eq. 6) hold exactly the answer's tokens and the end-of-turn token, for
    every family, with images whose processors expand into different numbers of tokens; encode()
    (the up-front count) labels the same tokens."""
    import models
    _, processor = models.load_vlm(preset)
    items = []
    images = [((80, 60), "red"), ((40, 120), "a red circle")]
    for i, (size, answer) in enumerate(images):
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / f"{i}.png")
        items.append({"id": str(i), "image_path": str(tmp_path / f"{i}.png"),
                      "question": "what colour is the circle?", "answer": answer})
    batch = data.collate(processor, items)
    tokenizer = processor.tokenizer
    for b, item in enumerate(items):
        labelled = batch["input_ids"][b][batch["labels"][b] != -100].tolist()
        # the answer's tokens as the template joins them (after a space in IDEFICS' dialogue)
        spellings = [tokenizer(text, add_special_tokens=False)["input_ids"]
                     for text in (item["answer"], " " + item["answer"])]
        assert labelled[:-1] in spellings
        end_tokens = ["<|eot_id|>", "<end_of_utterance>", "<|im_end|>"]
        assert labelled[-1] in tokenizer.convert_tokens_to_ids(end_tokens)
        input_ids, labels = data.encode(processor, item)
        assert input_ids[0][labels[0] != -100].tolist() == labelled  # the same tokens, text only
