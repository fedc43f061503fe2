"""train.py's run folder and data on CPU: checkpoints that survive kills, resume that refuses a
changed experiment, pre-emption, every item checked before step 1, the card's command.

Needs nothing downloaded (the `tiny` preset, conftest's tiny dataset). One test starts a
`torchrun --nproc_per_node 2` subprocess (a few seconds: it stops at the data check); the rest
train in-process for 1-4 steps. The kill sweep trains about 30 short runs (about 15 s here).
Run: python -m pytest -q tests/test_train_runs.py
"""
import builtins
import io
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import write_dataset
from PIL import Image
from safetensors.torch import save_file
from test_train import run, torchrun
from torch.distributed.checkpoint.api import CheckpointException

import data
import distributed
import models
import runs
import train


# ---- checkpoints: write new, rename, delete; only what training changed ----

class Killed(BaseException):
    """Stands for SIGKILL: no handler, no clean-up (a BaseException, so no `except Exception` sees
    it)."""


def kill_in_save(monkeypatch, save_number, kill_at=None):
    """Count the file operations of the `save_number`-th checkpoint save (DCP's write, each file
    opened for writing, each rename and delete, down to the files rmtree removes) and raise Killed
    before the `kill_at`-th. Returns the list of operations reached, by name."""
    reached, saves = [], {"n": 0, "active": False}

    def counted(name, operation):
        def wrapper(*args, **kwargs):
            mode = str(args[1] if len(args) > 1 else kwargs.get("mode", "r"))
            writes = name != "open" or any(c in mode for c in "wax+")
            if saves["active"] and writes:
                reached.append(name)
                if len(reached) == kill_at:
                    raise Killed(f"before {name} #{kill_at}")
            return operation(*args, **kwargs)
        return wrapper

    for module, name in [(runs.dcp, "save"), (builtins, "open"), (io, "open"), (os, "replace"),
                         (os, "rename"), (os, "unlink"), (os, "rmdir"), (shutil, "rmtree")]:
        monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    save_checkpoint = runs.save_checkpoint

    def save(*args, **kwargs):
        saves["n"] += 1
        saves["active"] = saves["n"] == save_number
        try:
            return save_checkpoint(*args, **kwargs)
        finally:
            saves["active"] = False
    monkeypatch.setattr(runs, "save_checkpoint", save)
    return reached


def test_a_kill_before_any_file_operation_of_a_save_resumes_to_the_same_loss(tmp_path, tiny_dataset,
                                                                            monkeypatch):
    """--save-every 1 over 3 steps: the save after step 2 is killed before its k-th file
    operation, for every k (a complete checkpoint of step 1 exists); --resume then ends on the
    uninterrupted run's loss, bit for bit, with the log of steps 1-3 (dropout on: the RNG state
    is restored too)."""
    flags = ("--batch-size", "2", "--lr", "1e-3", "--max-steps", "3", "--save-every", "1")
    _, full = run(tiny_dataset, tmp_path / "full", *flags)
    operations = kill_in_save(monkeypatch, 2)
    run(tiny_dataset, tmp_path / "counted", *flags)
    monkeypatch.undo()
    assert {"save", "replace", "rmtree", "unlink"} <= set(operations) and len(operations) >= 10
    for k in range(1, len(operations) + 1):
        out = tmp_path / f"kill-{k}"
        kill_in_save(monkeypatch, 2, kill_at=k)
        # DCP wraps what it catches
        with pytest.raises((Killed, CheckpointException), match="before"):
            run(tiny_dataset, out, *flags)
        monkeypatch.undo()
        _, resumed = run(tiny_dataset, out, *flags, "--resume")
        assert [r["step"] for r in resumed] == [1, 2, 3], (k, operations[k - 1])
        assert resumed[-1]["loss"] == full[-1]["loss"], (k, operations[k - 1])
        folders = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint"))
        assert folders == ["checkpoint"]


def checkpoint_keys(run_dir):
    reader = dcp.FileSystemReader(str(run_dir / "checkpoint"))
    return [k for k in reader.read_metadata().state_dict_metadata if k.startswith("model.")]


def checkpoint_bytes(run_dir):
    return sum(p.stat().st_size for p in (run_dir / "checkpoint").iterdir())


def test_the_checkpoint_holds_what_training_changed_and_no_frozen_weight(tmp_path, tiny_dataset):
    """LoRA: the checkpoint holds LoRA, parallel projections and Aligner (and their optimizer
    state), none of the frozen base weights, which --model-path already holds; --peft full: every
    weight."""
    lora, _ = run(tiny_dataset, tmp_path / "lora", "--batch-size", "2", "--max-steps", "1")
    keys = checkpoint_keys(lora)
    trained = ("lora_" in k or "lavender_" in k or k.startswith("model.aligner.") for k in keys)
    assert keys and all(trained)
    assert any("lavender_" in k for k in keys) and any(k.startswith("model.aligner.") for k in keys)
    full, _ = run(tiny_dataset, tmp_path / "full", "--batch-size", "2", "--max-steps", "1",
                  "--peft", "full")
    assert len(checkpoint_keys(full)) > 100  # every weight of the tiny Mllama
    assert checkpoint_bytes(lora) < checkpoint_bytes(full) / 4


def test_rng_state_is_loaded_as_data_not_as_code(tmp_path, tiny_dataset):
    """A pickle planted in the checkpoint as rng_rank0.pt is refused (weights_only=True) with the
    file named, and its code never runs."""
    run_dir, _ = run(tiny_dataset, tmp_path / "r", "--batch-size", "2", "--max-steps", "1")
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))
    torch.save({"torch": torch.get_rng_state(), "python": Payload(), "cuda": None},
               run_dir / "checkpoint" / "rng_rank0.pt")
    with pytest.raises(SystemExit, match="rng_rank0.pt is not an RNG state"):
        run(tiny_dataset, run_dir, "--batch-size", "2", "--max-steps", "2", "--resume")
    assert not marker.exists()


# ---- the run folder: never replaced by accident; resume checks the whole config ----

def test_a_run_folder_is_refused_without_resume_or_overwrite(tmp_path, tiny_dataset):
    run_dir, first = run(tiny_dataset, tmp_path / "r", "--batch-size", "2", "--max-steps", "1")
    adapter = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="not empty.*--resume.*--overwrite"):
        run(tiny_dataset, run_dir, "--batch-size", "2", "--max-steps", "1", "--lr", "1e-2")
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter  # untouched
    (run_dir / "notes.txt").write_text("mine")
    _, again = run(tiny_dataset, run_dir, "--batch-size", "2", "--max-steps", "2", "--overwrite")
    assert [r["step"] for r in again] == [1, 2] and again[0]["loss"] == first[0]["loss"]
    # --overwrite deletes only what a run writes
    assert (run_dir / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("change", [["--lr", "1e-2"], ["--lam", "0"], ["--aggregate", "mean-mean"],
                                    ["--aligner", "none"], ["--lora-r", "4"], ["--peft", "full"],
                                    ["--model", "toy"], ["--seed", "1"],
                                    "other data, same item count"])
def test_resume_refuses_a_changed_experiment(tmp_path, tiny_dataset, change):
    """Every setting that changes the experiment is refused on --resume, naming the setting and both
    values; another data file with the same number of items is caught by its sha256."""
    flags = ["--batch-size", "2", "--max-steps", "1"]
    run_dir, _ = run(tiny_dataset, tmp_path / "r", *flags)
    data = tiny_dataset
    if isinstance(change, str):  # the same items in another order: the same count, other batches
        data = Path(tiny_dataset).with_name("reversed.jsonl")
        data.write_text("".join(reversed(Path(tiny_dataset).read_text().splitlines(keepends=True))))
        change, match = [], "data_sha256: '[0-9a-f]+' in the checkpoint"
    else:
        match = rf"\n  {change[0]}: \S+ in the checkpoint, \S+ now\n"
    with pytest.raises(SystemExit, match=match):
        run(data, run_dir, *flags, "--max-steps", "2", "--resume", *change)
    # config.json still tells the truth
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 1e-4


def test_resume_accepts_the_harmless_changes(tmp_path, tiny_dataset):
    flags = ["--batch-size", "2", "--lr", "1e-3"]
    run_dir, _ = run(tiny_dataset, tmp_path / "r", *flags, "--max-steps", "1")
    attn = str(Path(tiny_dataset).parent / "attn")
    _, log = run(tiny_dataset, run_dir, *flags, "--max-steps", "2", "--resume", "--save-every", "7",
                 "--progress", "--activation-checkpointing", "--dist-timeout", "3", "--attn", attn)
    assert [r["step"] for r in log] == [1, 2]
    assert json.loads((run_dir / "config.json").read_text())["save_every"] == 7


def test_a_cut_off_log_line_does_not_stop_resume(tmp_path, tiny_dataset):
    flags = ("--batch-size", "2", "--lr", "1e-3")
    _, full = run(tiny_dataset, tmp_path / "full", *flags, "--max-steps", "3")
    run_dir, _ = run(tiny_dataset, tmp_path / "r", *flags, "--max-steps", "2")
    with open(run_dir / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a disk that filled up mid-line
    _, resumed = run(tiny_dataset, run_dir, *flags, "--max-steps", "3", "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed[-1]["loss"] == full[-1]["loss"]


# ---- pre-emption: SIGTERM / SIGINT save at the next step boundary ----

def signal_during_step(monkeypatch, signum, step):
    """Send this process `signum` while step `step` computes its losses (one micro-batch a step)."""
    calls, losses = {"n": 0}, train.micro_batch_losses

    def with_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signum)
        return losses(*args, **kwargs)
    monkeypatch.setattr(train, "micro_batch_losses", with_signal)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_at_the_next_step_boundary(tmp_path, tiny_dataset, monkeypatch, signum):
    """SIGTERM (pre-emption) or Ctrl-C during step 2 of 4, with the default --save-every: step 2
    ends, its checkpoint is written, train raises Stopped; --resume ends on the uninterrupted
    loss."""
    flags = ("--batch-size", "2", "--lr", "1e-3", "--max-steps", "4")
    _, full = run(tiny_dataset, tmp_path / "full", *flags)
    signal_during_step(monkeypatch, signum, 2)
    with pytest.raises(train.Stopped, match=f"{signum.name} after step 2"):
        run(tiny_dataset, tmp_path / "r", *flags)
    monkeypatch.undo()
    assert (signal.getsignal(signum) is not None
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    assert json.loads((tmp_path / "r" / "checkpoint" / "train_state.json").read_text())["step"] == 2
    assert not (tmp_path / "r" / "adapter").exists()  # the run is not finished
    _, resumed = run(tiny_dataset, tmp_path / "r", *flags, "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and resumed[-1]["loss"] == full[-1]["loss"]


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    def init_process_group(backend, **kw):
        seen.update(kw, backend=backend)
    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    import torch.distributed.device_mesh as device_mesh
    monkeypatch.setattr(device_mesh, "init_device_mesh", lambda *a, **kw: "mesh")
    args = train.build_parser().parse_args(["--dist-timeout", "3"])
    distributed.setup_distributed(args.dist_timeout)
    assert seen["timeout"].total_seconds() == 180 and seen["backend"] == "gloo"


# ---- every item checked before step 1 ----

def truncate(path, keep=0.6):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:int(len(data) * keep)])


def rewrite_maps(root, item_id, maps=None, **meta):
    """Rewrite attn/<id>.safetensors with other maps and/or metadata (the rest as conftest wrote
    it)."""
    path = Path(root) / "attn" / f"{item_id}.safetensors"
    old, words, old_meta = data.load_maps(path)
    metadata = {**{k: str(v) for k, v in old_meta.items()}, "words": json.dumps(words), **meta}
    save_file({"maps": old.half() if maps is None else maps(old)}, str(path), metadata=metadata)


def rewrite_items(data, edit):
    lines = [json.loads(line) for line in Path(data).read_text().splitlines()]
    Path(data).write_text("".join(json.dumps(item) + "\n" for item in edit(lines)))


def item002_maps(maps=None, **meta):
    """A BAD_DATA maker: item002's attention file rewritten (rewrite_maps)."""
    return lambda root, data: rewrite_maps(root, "item002", maps, **meta)


def item_changed(item_id, **change):
    """A BAD_DATA maker: the data file with the item `item_id` changed."""
    return lambda root, data: rewrite_items(data, lambda items: [
        {**it, **change} if it["id"] == item_id else it for it in items])


def jpeg_then_cut(root, data):
    """item002's image as a JPEG cut short: PIL's verify() passes it, decoding fails."""
    images = Path(root) / "images"
    Image.open(images / "item002.png").save(images / "item002.jpg", quality=90)
    truncate(images / "item002.jpg")
    item_changed("item002", image="images/item002.jpg")(root, data)


def copy_item000_maps(root, data):
    """A BAD_DATA maker: item000's attention file copied as item002's."""
    attn = Path(root) / "attn"
    shutil.copy(attn / "item000.safetensors", attn / "item002.safetensors")


BAD_DATA = {  # name: (make it, what the message says); every one names item002
    "truncated attention file": (
        lambda root, data: truncate(Path(root) / "attn" / "item002.safetensors"),
        "attention file .*item002.safetensors cannot be read"),
    "truncated JPEG": (jpeg_then_cut, "image .*item002.jpg cannot be read"),
    "maps stored as uint8 0-255": (item002_maps(lambda m: (m * 255).to(torch.uint8)),
                                   "torch.uint8"),
    "maps scaled x1000": (item002_maps(lambda m: (m * 1000).half()), r"range over \[0, 1000\]"),
    "NaN in the maps": (item002_maps(lambda m: (m * float("nan")).half()), "NaN"),
    "maps of the wrong size": (item002_maps(lambda m: m[:, :16, :16].half()),
                               r"\(1, 16, 16\), expected"),
    "no words": (item002_maps(words="[]"), "'words'"),
    "another item's file": (copy_item000_maps,
                            "made for the text 'red circle', not this item's answer 'two'"),
    "duplicate id": (item_changed("item004", id="item002"),
                     "duplicate id, already used by line 3"),
    "id leaving its folder": (item_changed("item002", id="../item002"),
                              "id cannot be a file name"),
    "answer longer than the context": (
        item_changed("item002", answer="two " * 3000),
        r"\d{4} tokens \(prompt \+ answer\) exceed --max-length 1024"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_named_before_step_1(tmp_path, case):
    """Each bad item stops a Lavender run before anything is trained or written, naming the item."""
    make, says = BAD_DATA[case]
    root = tmp_path / "d"
    data = write_dataset(root, n=6)
    make(root, data)
    with pytest.raises(SystemExit, match=f"item002.*{says}"):
        run(data, tmp_path / "r", "--batch-size", "2", "--max-steps", "1")
    assert not (tmp_path / "r").exists()


def test_a_bad_item_on_one_rank_is_named(tmp_path):
    """Under torchrun each rank checks a share of the items and the problems are gathered: item001,
    checked by rank 1, is named (by rank 0 too) and nothing trains."""
    data = write_dataset(tmp_path / "d", n=4)
    truncate(tmp_path / "d" / "attn" / "item001.safetensors")
    said = torchrun(data, tmp_path / "r", "--batch-size", "1", "--max-steps", "1", fails=True)
    # each rank's message names it
    assert said.count("item 'item001' (line 2): attention file") == 2
    assert not (tmp_path / "r").exists()


def test_skip_bad_items_trains_without_them_and_records_them(tmp_path):
    data = write_dataset(tmp_path / "d", n=6)
    truncate(tmp_path / "d" / "attn" / "item002.safetensors")
    rewrite_maps(tmp_path / "d", "item004", lambda m: (m * 255).to(torch.uint8))
    run_dir, log = run(data, tmp_path / "r", "--batch-size", "2", "--max-steps", "2",
                       "--skip-bad-items")
    skipped = [json.loads(line) for line in (run_dir / "skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], s["line"]) for s in skipped] == [("item002", 3), ("item004", 5)]
    assert "cannot be read" in skipped[0]["reason"] and "uint8" in skipped[1]["reason"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["items"] == 4 and config["skipped_items"] == 2 and len(log) == 2


def test_a_lavender_run_that_would_align_nothing_is_refused(tmp_path):
    data = write_dataset(tmp_path / "d", n=4)
    missing = r"--attn .*nowhere does not exist.*extract.py --dm sd14 --data .*--out "
    with pytest.raises(SystemExit, match=missing):
        run(data, tmp_path / "r", "--batch-size", "2", "--max-steps", "1", "--attn",
            str(tmp_path / "nowhere"))
    for item_id in ("item000", "item001", "item002", "item003"):  # words the answers do not contain
        rewrite_maps(tmp_path / "d", item_id, lambda m: m[:1].half(), words='["zebra"]')
    nothing = "would align nothing: of 4 items, 4 have an attention file"
    with pytest.raises(SystemExit, match=nothing):
        run(data, tmp_path / "r", "--batch-size", "2", "--max-steps", "1")
    assert not (tmp_path / "r").exists()
    # AR needs no maps
    _, log = run(data, tmp_path / "ar", "--batch-size", "2", "--max-steps", "1", "--loss", "ar")
    assert log[0]["aligned_words"] == 0


def test_a_file_that_changes_during_training_is_named_with_its_rank(tmp_path, monkeypatch):
    path = write_dataset(tmp_path / "d", n=6)
    check_item = data.check_item

    def then_cut(item, *args):  # the attention file is cut after its check, as by another job
        result = check_item(item, *args)
        if item["id"] == "item003":
            truncate(tmp_path / "d" / "attn" / "item003.safetensors")
        return result
    monkeypatch.setattr(data, "check_item", then_cut)
    with pytest.raises(RuntimeError, match=r"rank 0: items \[.*'item003'.*\] could not be read"):
        run(path, tmp_path / "r", "--batch-size", "2", "--max-steps", "3")


def test_data_file_problems_name_the_file_and_line(tmp_path):
    data = write_dataset(tmp_path / "d", n=4)
    lines = Path(data).read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"two", b"caf\xe9")  # latin-1, not UTF-8
    Path(data).write_bytes(b"".join(lines))
    with pytest.raises(SystemExit, match=r"data.jsonl line 3: not UTF-8"):
        run(data, tmp_path / "r")
    no_file = r"--data .*missing.jsonl: no such file .*extract.py --dm sd14"
    with pytest.raises(SystemExit, match=no_file):
        run(tmp_path / "missing.jsonl", tmp_path / "r")


def test_the_card_command_runs_as_written(tmp_path, monkeypatch, capsys):
    """`train.py --model llama32` with nothing else: --data data/train.jsonl, --attn data/attn/,
    --out runs/llama32-lavender. Without the data it says where it looked and how to make it; with
    them in place it trains (the llama32 weights stand in for by the tiny model: none here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", "--model", "llama32"])
    said = (r"--data data/train.jsonl: no such file \(looked for .*data/train.jsonl\)"
            r".*extract.py --dm sd14 --data data/train.jsonl --out data/attn")
    with pytest.raises(SystemExit, match=said):
        train.main()
    os.rename(write_dataset(tmp_path / "data", n=4), tmp_path / "data" / "train.jsonl")
    loaded = []
    def load_vlm(name, path=None, dtype=None):
        loaded.append(name)
        return models.tiny_vlm()
    monkeypatch.setattr(models, "load_vlm", load_vlm)
    train.main()
    run_dir = tmp_path / "runs" / "llama32-lavender"
    config = json.loads((run_dir / "config.json").read_text())
    assert (loaded == ["llama32"] and (run_dir / "adapter").is_dir()
            and config["items_without_attention"] == 0)
    assert config["attn_dir"] == str(tmp_path / "data" / "attn")


def test_the_vlm_sees_the_pixels_the_dm_saw(tmp_path):
    """A 16-bit grey scan and a transparent RGBA image reach the VLM as extract.py reads them (the
    16-bit one as its 8-bit equivalent, the transparent one on white), not clipped to white."""
    ramp = np.linspace(0, 65535, 56 * 56).reshape(56, 56).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "scan16.png")  # mode I;16
    Image.fromarray((ramp // 257).astype(np.uint8), "L").save(tmp_path / "scan8.png")
    rgba = np.zeros((56, 56, 4), dtype=np.uint8)
    rgba[:28, :, :] = (255, 0, 0, 255)  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    white = np.full((56, 56, 3), 255, dtype=np.uint8)
    white[:28] = (255, 0, 0)
    Image.fromarray(white, "RGB").save(tmp_path / "half_on_white.png")
    _, processor = models.tiny_vlm()
    pixels = {}
    for name in ("scan16", "scan8", "half", "half_on_white"):
        item = {"id": name, "image_path": str(tmp_path / f"{name}.png"),
                "question": "what colour is the circle?", "answer": "red"}
        pixels[name] = data.collate(processor, [item])["pixel_values"]
    assert (torch.equal(pixels["scan16"], pixels["scan8"])
            and torch.equal(pixels["half"], pixels["half_on_white"]))
    # the DM's side: not white either
    assert data.load_image(tmp_path / "scan16.png", 8).mean() < 0.5
