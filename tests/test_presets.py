"""The `tiny` preset: llama32's classes at toy size, built offline. Run: python -m pytest -q tests/test_presets.py"""
import pytest
import torch
from PIL import Image

import models


def test_tiny_vlm_runs_forward_with_its_processor():
    model, processor = models.tiny_vlm()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the circle?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    text = processor.apply_chat_template(messages)
    batch = processor(images=[Image.new("RGB", (120, 40))], text=[text], return_tensors="pt")
    assert batch["aspect_ratio_ids"].tolist() == [[3]]  # 120x40 at 56 px tiles: three tiles in a row
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def test_llama32_without_weights_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="--model-path"):
        models.load_vlm("llama32")


def test_toy_without_its_folder_fails_with_a_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="toy.py"):
        models.load_vlm("toy", str(tmp_path / "missing"))


def test_presets_load_a_save_pretrained_folder(tmp_path):
    model, processor = models.tiny_vlm()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    loaded, loaded_processor = models.load_vlm("toy", str(tmp_path / "m"))  # e.g. what toy.py writes
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert loaded_processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) \
        == processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
