"""The presets: `tiny` (llama32's classes at toy size, built offline) and the family table every
VLM preset dispatches through. Run: python -m pytest -q tests/test_presets.py"""
import pytest
import torch
from PIL import Image

import models


def test_tiny_vlm_runs_forward_with_its_processor():
    model, processor = models.tiny_vlm()
    question = [{"type": "image"}, {"type": "text", "text": "what colour is the circle?"}]
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    text = processor.apply_chat_template(messages)
    batch = processor(images=[Image.new("RGB", (120, 40))], text=[text], return_tensors="pt")
    # 120x40 at 56 px tiles: three tiles in a row
    assert batch["aspect_ratio_ids"].tolist() == [[3]]
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
    # e.g. what toy.py writes
    loaded, loaded_processor = models.load_vlm("toy", str(tmp_path / "m"))
    pairs = zip(model.state_dict().values(), loaded.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    hi = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert loaded_processor.apply_chat_template(hi) == processor.apply_chat_template(hi)


def test_every_family_has_one_full_entry_and_its_tiny_preset_dispatches_through_it():
    """models.FAMILIES: one entry per family with the same fields; every VLM preset and model_type
    names one; the generic functions reach each family's pieces through it."""
    fields = set(models.FAMILIES["mllama"])
    assert all(set(entry) == fields for entry in models.FAMILIES.values())
    vlms = [p for p in models.PRESETS.values() if p["kind"] == "vlm"]
    assert {p["family"] for p in vlms} == set(models.FAMILIES)
    assert set(models.MODEL_FAMILIES.values()) == set(models.FAMILIES)
    tiny = (("tiny", "mllama", "cross"), ("tiny-idefics", "idefics", "cross"),
            ("tiny-qwen2vl", "qwen2vl", "self"))
    for name, family, attention in tiny:
        model, processor = models.load_vlm(name)
        assert models.family(model) == family == models.processor_family(processor)
        assert models.FAMILIES[family]["attention"] == attention
        layers = models.attention_layers(model)
        assert layers and all(hasattr(models.attention_module(model, i), "q_proj") for i in layers)
        heads = models.text_config(model).num_attention_heads
        assert isinstance(models.lora_targets(model), str) and heads > 0
        # tiny-idefics: resampler latents
        assert models.maps_have_positions(model) == (family != "idefics")


def test_dtype_resolution_follows_the_device():
    """--dtype auto (evaluate.py, train.py's --frozen-dtype, extract.py): the GPU dtype on CUDA,
    float32 on a CPU; a named dtype is itself on either."""
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("auto", "cuda:3") == torch.bfloat16
    cuda = torch.device("cuda", 0)
    assert models.resolve_dtype("auto", cuda, "float16") == torch.float16  # extract.py
    # train.py, full fine-tune
    assert models.resolve_dtype("auto", "cuda", "float32") == torch.float32
    assert models.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert models.resolve_dtype("float32", "cuda") == torch.float32


def test_load_vlm_places_and_casts_the_weights():
    """load_vlm(dtype, device): every weight in that dtype on that device as the call returns."""
    model, _ = models.load_vlm("tiny", dtype=torch.bfloat16, device="cpu")
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "cpu")}
