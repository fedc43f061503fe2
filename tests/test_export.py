"""export.py: a run as one from_pretrained folder, LoRA merged. Each test trains a 1-step run
of a tiny preset with train.py, exports it and loads the export with the family's class alone.
Run: python -m pytest -q tests/test_export.py"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import data
import export
import models
import qwen
import train

ROOT = Path(models.__file__).resolve().parent


def one_step_run(preset, dataset, out, *flags):
    """A 1-step LoRA run (a large --lr: the adapter moves the logits); returns its folder."""
    argv = ["--model", preset, "--data", dataset, "--out", str(out), "--max-steps", "1",
            "--batch-size", "3", "--lr", "0.01", "--no-progress", *flags]
    args = train.build_parser().parse_args(argv)
    return Path(train.train(args))


# tiny: a Lavender run (learned aggregation and an Aligner: lavender.safetensors) from a local
# folder, so the adapter records --model-path; the others: AR runs of presets built from configs
@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2vl", "tiny-idefics"])
def test_export_has_the_adapters_logits(tmp_path, tiny_dataset, preset):
    """The exported model's logits equal PeftModel.from_pretrained(base, adapter)'s on the same
    batch (to 1e-5) and differ from the base's (the merge carries the training); the processor
    keeps its chat template; the adapter names its base; lavender.safetensors is left out."""
    base_dir, flags = None, ["--loss", "ar"]
    if preset == "tiny":
        base_dir = tmp_path / "base"
        for part in models.load_vlm("tiny"):
            part.save_pretrained(base_dir)
        flags = ["--model-path", str(base_dir), "--loss", "lavender", "--aggregate", "learn"]
    run = one_step_run(preset, tiny_dataset, tmp_path / "run", *flags)
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == (str(base_dir.resolve()) if base_dir else preset)

    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "export.py"), str(run), str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = AutoModelForImageTextToText.from_pretrained(out).eval()  # transformers alone
    base, processor = models.load_vlm(preset, None if base_dir is None else str(base_dir))
    reference = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    items = data.read_items(tiny_dataset)[:4]
    batch = data.model_inputs(data.collate(processor, items))
    with torch.no_grad():
        want, got = reference(**batch).logits, exported(**batch).logits    # (B, T, vocab)
        with reference.disable_adapter():
            untrained = reference(**batch).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert (want - untrained).abs().max() > 1e-3

    weights = load_file(out / "model.safetensors")
    assert not any("lora_" in k or "lavender_" in k for k in weights)
    left_out = json.loads((out / "export.json").read_text())["left_out"]
    assert left_out == (["lavender.safetensors"] if preset == "tiny" else [])
    chat_template = processor.chat_template
    if preset == "tiny":
        from transformers import MllamaProcessor
        assert MllamaProcessor.from_pretrained(out).chat_template == chat_template
    elif preset == "tiny-idefics":
        # its prompts are its own (flamingo.prompt_texts), no template
        from transformers import IdeficsProcessor
        vocab = IdeficsProcessor.from_pretrained(out).tokenizer.get_vocab()
        assert vocab == processor.tokenizer.get_vocab()
    else:
        # the files name the stock processor (AutoProcessor builds it; it needs torchvision)
        saved = json.loads((out / "processor_config.json").read_text())
        assert saved["processor_class"] == "Qwen2VLProcessor"
        assert qwen.QwenImageTextProcessor.from_pretrained(out).chat_template == chat_template


def test_export_refuses_an_unfinished_run_and_a_full_folder(tmp_path, tiny_dataset):
    """A folder that is not a finished run, and an export folder that is not empty, are refused
    by name before anything is loaded."""
    with pytest.raises(SystemExit, match="no such folder"):
        export.export_run(tmp_path / "missing", tmp_path / "out")
    run = one_step_run("tiny", tiny_dataset, tmp_path / "run", "--loss", "ar")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        export.export_run(run, tmp_path / "out")
