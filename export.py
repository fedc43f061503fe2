"""A finished run as one checkpoint that other harnesses load (VLMEvalKit, lmms-eval load a full
model folder, not an adapter): the LoRA merged into the base weights (PEFT's merge_and_unload),
saved with the processor and its chat template, loadable by the family's from_pretrained alone.
A full fine-tuning run's model/ is saved the same way.

Left out: lavender.safetensors. The Aligner (§4.3) and the parallel projections W_Qd, W_Kd (eq.
15-16) make only the map that the alignment loss compares: they read the attention, and no output
of the model depends on them. A harness that generates answers has no use for them; they stay in
the run folder, where evaluate.py reads them for its "head" rows.

    python export.py runs/lavender exported/
    python -c "import transformers as t; t.AutoModelForImageTextToText.from_pretrained('exported/')"
"""
import argparse
import json
from pathlib import Path

import torch

import models
import runs

# The stock processor class an export's files name (processor_class), per config.model_type, where
# ours is another: qwen.QwenImageTextProcessor is Qwen2-VL's without its video part (which needs
# torchvision); the harnesses' AutoProcessor reads the name and builds the stock one.
STOCK_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def merged_model(run_dir, config, dtype):
    """(model, processor) of a run with its training in the weights: base + adapter/ merged
    (LoRA), or model/ (full)."""
    if config["peft"] == "lora":
        from peft import PeftModel
        base, processor = models.load_vlm(config["model"], config["model_path"], dtype)
        model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload()
    else:
        model, processor = models.load_vlm(config["model"], str(run_dir / "model"), dtype)
    return model, processor


def name_stock_processor(out, model_type):
    """Rewrite processor_class in the saved processor and tokenizer configs to the stock class."""
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = Path(out) / name
        if path.is_file():
            saved = json.loads(path.read_text())
            if "processor_class" in saved:
                saved["processor_class"] = STOCK_PROCESSORS[model_type]
                path.write_text(json.dumps(saved, indent=2) + "\n")


def export_run(run_dir, out, dtype=torch.float32, overwrite=False):
    """Write `out`: the run's merged weights (config.json, model*.safetensors,
    generation_config.json), its processor (tokenizer, image processor, chat template) and
    export.json (the run, the base, what was left out). Returns out as a Path."""
    run_dir, out = Path(run_dir), Path(out)
    problem = runs.run_problem(run_dir)
    if problem:
        raise SystemExit(f"export: run {run_dir}: {problem}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SystemExit(f"export: {out} is not empty; give another folder or --overwrite")
    config = json.loads((run_dir / "config.json").read_text())
    model, processor = merged_model(run_dir, config, dtype)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    model_type = model.config.model_type
    if model_type in STOCK_PROCESSORS:
        name_stock_processor(out, model_type)
    left_out = ["lavender.safetensors"] if (run_dir / "lavender.safetensors").exists() else []
    base = runs.base_name(config["model"], config["model_path"])
    record = dict(run=str(run_dir.resolve()), base=base, peft=config["peft"], loss=config["loss"],
                  dtype=str(dtype).removeprefix("torch."), left_out=left_out)
    (out / "export.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def build_parser():
    p = argparse.ArgumentParser(description="A train.py run as one from_pretrained folder (LoRA "
                                            "merged) for other harnesses.")
    p.add_argument("run", help="a finished run folder of train.py")
    p.add_argument("out", help="the folder to write (config.json, weights, processor, template)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the merged weights' dtype: float32 keeps the merge exact; bfloat16 halves "
                        "the files (the hub weights' own dtype: LoRA is merged into them and "
                        "rounded once)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="write into a folder that is not empty")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = export_run(args.run, args.out, getattr(torch, args.dtype), args.overwrite)
    left = json.loads((out / "export.json").read_text())["left_out"]
    note = f"; left out {', '.join(left)} (training only)" if left else ""
    print(f"exported {args.run} -> {out} ({args.dtype}){note}")


if __name__ == "__main__":
    main()
