"""train.py on CPU: the loop, FSDP2 over 2 gloo ranks, checkpoints, resume, Aligner pre-training.

Needs nothing downloaded (the `tiny` preset, conftest's tiny dataset). Two tests start
`torchrun --nproc_per_node 2` subprocesses (about 10 s each); the rest train in-process.
Run: python -m pytest -q tests/test_train.py
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import write_dataset
from PIL import Image
from safetensors.torch import load_file

import aggregate
import aligner as aligner_lib
import data
import loader
import mllama
import models
import runs
import train

ROOT = Path(__file__).resolve().parents[1]
# the random tiny model predicts no answer word, so these runs align the label words (§6 (5)'s
# predicted words are tested in test_aggregate.py and in the toy demo, whose VLM is trained)
FAST = ["--no-progress", "--lr-gamma", "1.0", "--align-words", "label"]


def same_steps(reference, *others):
    """Every run's log rows equal the reference's: the same losses (eq. 6 to 1e-5, L_att to 1e-4,
    float sums in another order) and the same aligned words, some in every step."""
    for rows in others:
        assert len(rows) == len(reference)
        for a, r in zip(reference, rows):
            assert r["loss_vlm"] == pytest.approx(a["loss_vlm"], rel=1e-5)
            assert r["loss_att"] == pytest.approx(a["loss_att"], rel=1e-4)
            assert r["aligned_words"] == a["aligned_words"] > 0


def run(data, out, *flags):
    """Train in this process (one rank, no process group); returns (run dir, log rows)."""
    argv = ["--model", "tiny", "--data", str(data), "--out", str(out), *FAST, *flags]
    args = train.build_parser().parse_args(argv)
    run_dir = Path(train.train(args))
    return run_dir, [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def torchrun(data, out, *flags, script=ROOT / "train.py", env=(), fails=False):
    """The same through `torchrun --nproc_per_node 2` (gloo, FSDP2); returns the log rows (or, with
    fails=True, checks that it failed and returns its output)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", **dict(env)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), "--model", "tiny", "--data", str(data), "--out", str(out), *FAST, *flags]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (done.returncode != 0) == fails, done.stdout[-3000:] + done.stderr[-3000:]
    if fails:
        return done.stdout + done.stderr
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_collate_labels_only_the_answer_and_its_end(tiny_dataset):
    _, processor = models.tiny_vlm()
    items = data.read_items(tiny_dataset)[:3]
    batch = data.collate(processor, items)
    tok = processor.tokenizer
    for b, item in enumerate(items):
        answer = batch["labels"][b][batch["labels"][b] != -100]
        # answer + end of turn, nothing else
        assert tok.decode(answer) == item["answer"] + "<|eot_id|>"
        ids = batch["input_ids"][b][batch["attention_mask"][b] == 1]
        # one BOS, chat template
        assert tok.decode(ids).startswith("<|begin_of_text|><|start_header_id|>user")
    assert batch["image_sizes"].tolist() == [image_size(it) for it in items]  # (height, width)
    prompts = data.collate(processor, items, with_answer=False)
    # left padded for generate()
    assert "labels" not in prompts and (prompts["attention_mask"][:, -1] == 1).all()


def image_size(item):
    with Image.open(item["image_path"]) as im:
        return [im.height, im.width]


def test_two_ranks_match_one_rank_resume_and_reload(tmp_path, tiny_dataset):
    """torchrun 2 ranks x batch 1 (FSDP2, activation checkpointing, a loader worker each) == 1
    rank x 2 accumulated micro-batches of 1 (same global batch, no dropout) at steps 1-3, where
    the 2-rank run is pre-empted during step 2 by a SIGTERM that reaches rank 1 alone (both ranks
    stop after step 2 and save) and resumes from its sharded checkpoint for step 3; the adapter
    loads with PeftModel.from_pretrained, and load_run gives the same logits as the checkpoint.
    The first item has no attention file, so at step 1 rank 0 aligns no word while rank 1 does (a
    hang if the ranks' backward graphs differed)."""
    items = data.read_items(tiny_dataset)
    first = items[data.epoch_order(len(items), 42, 0)[0]]["id"]  # --seed 42: the default
    os.remove(data.maps_path(Path(tiny_dataset).parent / "attn", first))
    flags = ["--lora-dropout", "0", "--lr", "1e-3", "--batch-size", "1"]
    _, one = run(tiny_dataset, tmp_path / "one", "--grad-accum", "2", "--max-steps", "3", *flags)
    two = tmp_path / "two"
    sharded = ("--max-steps", "3", "--activation-checkpointing", "--num-workers", "1", *flags)
    preempt = {"PREEMPT_RANK": "1", "PREEMPT_STEP": "2"}
    said = torchrun(tiny_dataset, two, *sharded, fails=True,
                    script=ROOT / "tests" / "preempted_train.py", env=preempt)
    assert "stopped by SIGTERM after step 2" in said and "exitcode  : 143" in said
    assert json.loads((two / "checkpoint" / "train_state.json").read_text())["step"] == 2
    assert [p.name for p in two.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint"]
    shutil.copytree(two, tmp_path / "two-then-one")
    resumed = torchrun(tiny_dataset, two, "--max-steps", "3", "--resume",
                       "--activation-checkpointing", "--num-workers", "1", *flags)
    assert [r["step"] for r in resumed] == [1, 2, 3]  # the log continues where it stopped
    # the same checkpoint resumed on ONE rank with the same global batch (1 x 2 micro-batches of 1):
    # DCP reshards the FSDP2 checkpoint onto plain tensors and step 3 sees the same items
    _, moved = run(tiny_dataset, tmp_path / "two-then-one", "--grad-accum", "2", "--max-steps", "3",
                   "--resume", *flags)
    assert [r["step"] for r in moved] == [1, 2, 3]
    same_steps(one, resumed, moved)
    # another global batch: refused
    with pytest.raises(SystemExit, match="global batch of 2.*global batch of 1"):
        run(tiny_dataset, tmp_path / "two-then-one", "--max-steps", "4", "--resume", *flags)
    # the authors' README way of loading a LoRA adapter
    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(models.tiny_vlm()[0], str(two / "adapter"))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in peft_model.named_parameters())
    # load_run == the sharded training checkpoint, loaded on one process
    model, processor, lavender, config = runs.load_run(two)
    args = train.build_parser().parse_args(["--data", str(tiny_dataset), *flags])
    ref = train.apply_peft(models.tiny_vlm()[0], args)
    # frozen weights: not saved
    trained = {f"vlm.{k}": v for k, v in ref.state_dict().items() if "lora_" in k}
    sd = {"model": trained}
    dcp.load(sd, checkpoint_id=str(two / "checkpoint"))
    loaded = {k[len("vlm."):]: v for k, v in sd["model"].items()}
    assert ref.load_state_dict(loaded, strict=False).unexpected_keys == []
    batch = data.collate(processor, data.read_items(tiny_dataset)[:2])
    with torch.no_grad():
        logits = model(**data.model_inputs(batch)).logits
        assert torch.equal(logits, ref.eval()(**data.model_inputs(batch)).logits)
    assert (lavender["aligner"] is not None and config["world"] == 2
            and config["items_without_attention"] == 1)


def test_bf16_frozen_weights_on_one_process(tmp_path, tiny_dataset):
    """The one-GPU path without torchrun (frozen weights bf16, LoRA, parallel projections and
    Aligner fp32, no FSDP to cast them), on the CPU: Lavender trains with finite losses that fall
    on a fixed batch, and the run reloads with its adapter and projections."""
    _, log = run(tiny_dataset, tmp_path / "bf16", "--frozen-dtype", "bfloat16", "--batch-size", "6",
                 "--max-steps", "4", "--lr", "3e-3", "--lora-dropout", "0")
    assert all(math.isfinite(r["loss"]) for r in log) and log[-1]["loss_att"] < log[0]["loss_att"]
    model, _, lavender, config = runs.load_run(tmp_path / "bf16")
    assert config["frozen_dtype"] == "bfloat16" and lavender["aligner"] is not None
    assert any("lavender_q_proj" in n for n, _ in model.named_parameters())


def test_resume_reaches_the_uninterrupted_loss(tmp_path, tiny_dataset):
    """One rank, with LoRA dropout on (so the RNG state must be restored): 3 steps == 2 + resume 1,
    inside a 4-step linear warm-up (so the scheduler's state must be restored too)."""
    flags = ("--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "4")
    _, full = run(tiny_dataset, tmp_path / "a", "--max-steps", "3", *flags)
    run(tiny_dataset, tmp_path / "b", "--max-steps", "2", *flags)
    _, resumed = run(tiny_dataset, tmp_path / "b", "--max-steps", "3", "--resume", *flags)
    assert resumed[2]["loss"] == full[2]["loss"]
    # step s: lr · (s + 1) / 4
    assert [r["lr"] for r in full] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3])
    assert resumed[2]["lr"] == full[2]["lr"]


def test_lavender_loss_falls_on_a_fixed_batch(tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    _, log = run(data, tmp_path / "r", "--batch-size", "2", "--max-steps", "8", "--lr", "3e-3",
                 "--lora-dropout", "0")
    assert log[-1]["loss_att"] < log[0]["loss_att"] and log[-1]["loss"] < log[0]["loss"]
    # same batch every step
    assert all(r["aligned_words"] == log[0]["aligned_words"] > 0 for r in log)


def test_ar_never_calls_capture_hooks_and_full_finetuning_saves_model(tmp_path, tiny_dataset,
                                                                      monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("--loss ar built an AttentionCapture")
    monkeypatch.setattr(aggregate, "AttentionCapture", forbidden)
    run_dir, log = run(tiny_dataset, tmp_path / "ar", "--loss", "ar", "--peft", "full",
                       "--batch-size", "2", "--max-steps", "2", "--lr", "1e-3")
    assert all(r["loss_att"] == 0 and r["aligned_words"] == 0 for r in log)
    assert (run_dir / "model").is_dir() and not (run_dir / "lavender.safetensors").exists()
    # full weights: model/ is a save_pretrained folder
    model, processor, lavender, _ = runs.load_run(run_dir)
    base = models.tiny_vlm()[0].eval()
    batch = data.model_inputs(data.collate(processor, data.read_items(tiny_dataset)[:1]))
    with torch.no_grad():
        # trained weights were saved
        assert not torch.allclose(model(**batch).logits, base(**batch).logits)
    assert lavender["aligner"] is None


def test_aligner_pretraining_leaves_the_vlm_unchanged(tmp_path, tiny_dataset):
    run_dir, log = run(tiny_dataset, tmp_path / "pre", "--batch-size", "2", "--max-steps", "2",
                       "--pretrain-aligner-steps", "2", "--lr", "1e-2")
    assert [r["phase"] for r in log] == ["aligner", "aligner"]
    args = train.build_parser().parse_args(["--data", str(tiny_dataset)])
    peft_model = train.apply_peft(models.tiny_vlm()[0], args)
    fresh = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == len(fresh) > 0
    for k, v in fresh.items():  # PEFT drops the adapter name ("default") when saving
        assert torch.equal(adapter[k.replace(".default", "")], v), k
    lavender = load_file(run_dir / "lavender.safetensors")
    torch.manual_seed(args.seed + 2)  # as train.build() seeds the Aligner
    channels = aligner_lib.aligner_channels("learn", 4)  # tiny: 4 heads
    fresh_aligner = aligner_lib.Aligner("sim", channels)
    changed = [not torch.equal(lavender[f"aligner.{k}"], v)
               for k, v in fresh_aligner.state_dict().items() if v.dtype.is_floating_point]
    assert any(changed)  # ... while the Aligner did learn


def test_bad_input_stops_early_and_saves_nothing(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "d", n=4)
    os.remove(tmp_path / "d" / "images" / "item002.png")
    with pytest.raises(SystemExit, match="item002"):
        run(data, tmp_path / "r", "--batch-size", "2", "--max-steps", "1")
    assert not (tmp_path / "r").exists()  # checked before anything was built or written
    # an item without an attention file trains with L_VLM alone and is counted
    data = write_dataset(tmp_path / "e", n=4)
    os.remove(tmp_path / "e" / "attn" / "item001.safetensors")
    # a non-finite loss names the step and the items, and leaves no adapter behind
    nan_loss = lambda pred, *rest: pred.sum() * float("nan")  # noqa: E731
    monkeypatch.setattr(aligner_lib, "attention_loss", nan_loss)
    with pytest.raises(FloatingPointError, match=r"step 1 .*item00"):
        run(data, tmp_path / "nan", "--batch-size", "2", "--max-steps", "1")
    nan_run = tmp_path / "nan"
    assert not (nan_run / "adapter").exists() and not (nan_run / "checkpoint").exists()
    monkeypatch.undo()
    run_dir, _ = run(data, tmp_path / "ok", "--batch-size", "2", "--max-steps", "1")
    assert json.loads((run_dir / "config.json").read_text())["items_without_attention"] == 1


def test_only_non_reentrant_checkpointing_lets_the_attention_loss_reach_the_vlm():
    """Why --activation-checkpointing passes use_reentrant=False: a reentrant checkpoint runs the
    layer's forward under no_grad, so maps captured inside it carry no graph and L_att reaches
    nothing in the model (the authors' release checkpoints reentrantly: DIFFERENCES.md)."""
    from test_aggregate import _att_loss, make_batch
    grads = {}
    for reentrant in (None, False, True):  # None: no checkpointing
        model, processor = models.tiny_vlm()
        image = Image.new("RGB", (120, 40), (200, 10, 10))
        batch = make_batch(processor, [(image, "what colour is the circle?", "a red circle")])
        layers = aggregate.aligned_layers(model)
        aggregate.add_parallel_projections(model, layers, init="copy")
        if reentrant is not None:
            kwargs = {"use_reentrant": reentrant}
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            model.enable_input_require_grads()  # what a reentrant checkpoint needs for L_VLM
        model.train()
        with aggregate.AttentionCapture(model, layers, learned=True) as capture:
            _, loss_att, maps = _att_loss(model, processor, batch, capture, "learn", None, "auto")
            if maps.requires_grad:
                loss_att.backward()
        grads[reentrant] = mllama.cross_attention(model, layers[0]).lavender_q_proj.weight.grad
    assert grads[None].abs().sum() > 0 and torch.allclose(grads[False], grads[None], atol=1e-6)
    assert grads[True] is None  # the maps were captured without a graph


def test_micro_batches_split_one_global_batch():
    """Step 1 of an epoch with 2 ranks x 2 micro-batches x batch 2 takes items 8..15 of the
    order."""
    order = list(range(100, 116))
    assert data.micro_batches(order, 1, 2, 2, 0, 2) == [[108, 109], [112, 113]]
    assert data.micro_batches(order, 1, 2, 2, 1, 2) == [[110, 111], [114, 115]]
    assert data.micro_batches(order, 0, 4, 1, 0, 1) == [[100, 101, 102, 103]]
    assert data.epoch_order(16, 42, 0) == data.epoch_order(16, 42, 0) != data.epoch_order(16, 42, 1)
    # the loader's sampler from step 3 of 4-step epochs: epoch 0's last pair, then epoch 1's first
    schedule = dict(seed=42, steps_per_epoch=4, first_step=3, total_steps=5, batch_size=2,
                    grad_accum=1)
    expected = [data.epoch_order(8, 42, 0)[6:8], data.epoch_order(8, 42, 1)[0:2]]
    assert list(loader.step_batches(8, rank=0, world=1, **schedule)) == expected
    # 2 ranks x 2 micro-batches of 1: rank r's micro-batch m is micro_batches' at every step
    schedule.update(first_step=0, total_steps=4, batch_size=1, grad_accum=2)
    for r in (0, 1):
        expected = []
        for s in range(4):
            order = data.epoch_order(16, 42, s // 4)
            expected += data.micro_batches(order, s % 4, 1, 2, r, 2)
        assert list(loader.step_batches(16, rank=r, world=2, **schedule)) == expected


def test_workers_give_the_same_losses_bit_for_bit_and_resume(tmp_path, tiny_dataset):
    """--num-workers 2 (batches built in two processes) == --num-workers 0, exactly, over an epoch
    boundary with 2 accumulated micro-batches and LoRA dropout on (so a draw from the global RNG
    would show); a run stopped after step 2 and resumed with workers reaches the same steps 3-4."""
    # 3 steps an epoch
    flags = ("--batch-size", "1", "--grad-accum", "2", "--lr", "1e-3", "--max-steps", "4")
    _, plain = run(tiny_dataset, tmp_path / "w0", "--num-workers", "0", *flags)
    _, workers = run(tiny_dataset, tmp_path / "w2", "--num-workers", "2", *flags)
    run(tiny_dataset, tmp_path / "cut", "--num-workers", "2", *flags[:-1], "2")
    _, resumed = run(tiny_dataset, tmp_path / "cut", "--num-workers", "2", "--resume", *flags)
    keys = ("loss_vlm", "loss_att", "aligned_words", "grad_norm", "epoch")
    epochs = [r["epoch"] for r in plain]
    assert epochs == [0, 0, 0, 1] and all(r["aligned_words"] > 0 for r in plain)
    for rows in (workers, resumed):
        assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in plain]
    rows = workers + plain
    assert all(r["data_seconds"] >= 0 and r["data_seconds"] <= r["seconds"] for r in rows)


def test_a_sigterm_ends_the_workers_quietly(tiny_dataset):
    """A scheduler's SIGTERM to every process (Slurm) ends the loader's workers with exit code 0,
    not as killed by a signal, which would fail the main process at once (DataLoader's SIGCHLD
    handler) while it finishes the step whose micro-batches it holds and saves."""
    import multiprocessing
    import signal
    items, (_, processor) = data.read_items(tiny_dataset), models.tiny_vlm()
    schedule = dict(seed=42, steps_per_epoch=3, first_step=0, total_steps=3, batch_size=2,
                    grad_accum=1)
    attn = Path(tiny_dataset).parent / "attn"
    batches = loader.micro_batch_loader(items, processor, attn, schedule, 0, 1, 2)
    held = next(batches)  # this step's micro-batch
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    for w in workers:
        os.kill(w.pid, signal.SIGTERM)
        w.join(timeout=30)
    assert [w.exitcode for w in workers] == [0, 0]
    order = data.epoch_order(len(items), 42, 0)  # the main process goes on with what it holds
    assert held[0]["ids"] == [items[i]["id"] for i in order[:2]] and len(held[1]) == 2
    del batches  # and ends the loader without an error


def test_a_stop_signal_that_ends_a_worker_mid_step_still_trains_and_saves_that_step(
        tmp_path, tiny_dataset, monkeypatch):
    """Slurm's SIGTERM reaches every process: here worker 1 signals the main process and ends
    before it delivers step 1's second micro-batch. The main process builds that step itself,
    trains it as the uninterrupted run does, saves after it and stops."""
    import signal
    flags = ("--batch-size", "1", "--grad-accum", "2", "--lr", "1e-3", "--max-steps", "3")
    _, full = run(tiny_dataset, tmp_path / "full", *flags)
    read_batch = loader.read_batch

    def preempted(*args):
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.id == 1:  # the worker of micro-batches 2, 4, ...
            os.kill(os.getppid(), signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)  # ends this worker, quietly (loader.quiet_stop)
        return read_batch(*args)
    monkeypatch.setattr(loader, "read_batch", preempted)
    with pytest.raises(train.Stopped, match="SIGTERM after step 1"):
        run(tiny_dataset, tmp_path / "cut", "--num-workers", "2", *flags)
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    keys = ("loss_vlm", "loss_att", "aligned_words", "grad_norm")
    assert [[r[k] for k in keys] for r in log] == [[r[k] for k in keys] for r in full[:1]]
    state = json.loads((tmp_path / "cut" / "checkpoint" / "train_state.json").read_text())
    assert state["step"] == 1


def test_att_pooling_per_micro_batch(tmp_path, tiny_dataset):
    """--att-pooling: a micro-batch of 2 pooled per sample trains as 2 micro-batches of 1 (one
    sample each, so either pooling), the same losses in both steps; pooled over its words (the
    default, the release's) the same step weighs the two items' words otherwise."""
    flags = ["--lora-dropout", "0", "--lr", "1e-3", "--max-steps", "2"]
    _, samples = run(tiny_dataset, tmp_path / "samples", "--att-pooling", "samples",
                     "--batch-size", "2", *flags)
    _, accum = run(tiny_dataset, tmp_path / "accum", "--grad-accum", "2", "--batch-size", "1",
                   *flags)
    same_steps(samples, accum)
    _, words = run(tiny_dataset, tmp_path / "words", "--batch-size", "2", *flags)
    assert words[0]["loss_vlm"] == samples[0]["loss_vlm"]  # step 1: the same model, the same batch
    assert words[0]["aligned_words"] == samples[0]["aligned_words"]
    assert words[0]["loss_att"] != pytest.approx(samples[0]["loss_att"], rel=1e-4)


METHOD_FLAGS = [["--aggregate", "mean-mean", "--aligner", "none"],
                ["--aggregate", "flow-sum", "--aligner-mode", "after", "--layers", "last"],
                ["--aggregate", "max-max", "--aligner-act", "leakyrelu"],
                ["--match", "root", "--aligner", "light", "--projection-init", "random"]]


@pytest.mark.parametrize("flags", METHOD_FLAGS)
def test_method_flags_train_and_reload(tmp_path, tiny_dataset, flags):
    run_dir, log = run(tiny_dataset, tmp_path / "r", "--batch-size", "3", "--max-steps", "1",
                       *flags)
    assert log[0]["aligned_words"] > 0 and log[0]["loss_att"] > 0
    _, _, lavender, config = runs.load_run(run_dir)
    expected = flags[1] if flags[0] == "--aggregate" else "learn"
    assert lavender["aggregation"] == config["aggregate"] == expected
    assert (lavender["aligner"] is None) == ("none" in flags)
    # tiny: cross-attention at 1 and 3
    assert lavender["layers"] == ([3] if "last" in flags else [1, 3])


def test_placements_the_release_does_not_have_are_refused_before_loading(tmp_path, tiny_dataset,
                                                                         monkeypatch):
    """A per-layer Aligner cannot honour max-* (one channel) or flow-* (a flow of probabilities):
    refused with the working alternatives named, before the model is loaded."""
    def refuse(*a, **k):
        pytest.fail("loaded the model before refusing")
    monkeypatch.setattr(models, "load_vlm", refuse)
    for aggregation in ("max-max", "max-mean", "flow-multi"):
        with pytest.raises(SystemExit, match="--aligner-mode after.*mean-mean, mean-max or learn"):
            run(tiny_dataset, tmp_path / aggregation, "--aggregate", aggregation, "--aligner-mode",
                "per-layer")
