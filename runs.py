"""The run folder of train.py (not in the paper; DESIGN.md, "Run folder"): checkpoints that
survive a kill, resume that refuses a changed experiment, the outputs, and load_run, which reads
a finished run.

    runs/<name>/config.json            every setting (refused on --resume if it would change
                                       the experiment)
    runs/<name>/log.jsonl              one line per step
    runs/<name>/checkpoint/            the DCP shards of what training changed, optimizer, RNG,
                                       train state
    runs/<name>/adapter/ or model/     LoRA (PeftModel.from_pretrained) or full weights
                                       (save_pretrained)
    runs/<name>/lavender.safetensors   the Aligner and the parallel projections (eq. 15-16)

A checkpoint is written new, renamed, then the old one deleted; every step of that leaves a
complete checkpoint in place (recover_checkpoint finishes a save that was killed). Every rank
calls the functions that save or load (DCP is a collective); rank 0 alone writes the other files.

    python -c "import runs; model, processor, lavender, cfg = runs.load_run('runs/tiny-lavender')"
    python export.py runs/tiny-lavender exported/   # LoRA merged: one from_pretrained folder
"""
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import threading
import signal
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

import aggregate
import aligner as aligner_lib
import models
from distributed import barrier

# ---- checkpoints: write new, rename, then delete ----

# A checkpoint is a folder: the DCP shards of everything trained (LoRA or all weights, parallel
# projections, Aligner; never the frozen base weights, which --model-path already holds), the
# optimizer, each rank's RNG state, train_state.json (step, scheduler, the run's
# config) and, written last, complete.json listing the files: a folder without it is unfinished.
CHECKPOINT, NEW, OLD, COMPLETE = "checkpoint", "checkpoint.tmp", "checkpoint.old", "complete.json"


def write_durably(path, data):
    """Write bytes and fsync them: once this returns, a power loss keeps the file."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path, text):
    """Replace a text file at once (temp file, fsync, rename): a reader sees the old or the new
    one."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    write_durably(tmp, text.encode("utf-8"))
    os.replace(tmp, path)


def fsync_dir(path):
    """Make a rename or delete inside a folder durable (fsync of the folder itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_checkpoint(path):
    """Delete a checkpoint folder, complete.json first: a kill halfway leaves an unfinished folder,
    never one that looks complete without its shards."""
    if not path.exists():
        return
    (path / COMPLETE).unlink(missing_ok=True)
    fsync_dir(path)
    shutil.rmtree(path)


def checkpoint_state(path):
    """train_state.json of a complete checkpoint folder (complete.json and every file it lists),
    else None."""
    try:
        listed = json.loads((path / COMPLETE).read_text())["files"]
        if all((path / name).is_file() for name in listed):
            return json.loads((path / "train_state.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def recover_checkpoint(out):
    """Make <out>/checkpoint the newest complete checkpoint and delete the other folders: this
    finishes a save that was killed (see save_checkpoint). Rank 0 only. Each operation leaves the
    newest complete checkpoint in place, so a kill in here is recovered by the next call."""
    folders = [out / name for name in (CHECKPOINT, NEW, OLD)]
    steps = {f: state["step"] for f in folders if (state := checkpoint_state(f)) is not None}
    if not steps:
        return
    # a tie: keep checkpoint/
    newest = max(steps, key=lambda f: (steps[f], f.name == CHECKPOINT))
    for folder in folders:
        if folder != newest:  # unfinished, or older than the newest
            remove_checkpoint(folder)
    if newest.name != CHECKPOINT:
        os.replace(newest, out / CHECKPOINT)
        fsync_dir(out)


def checkpoint_tensors(modules, optimizer):
    """What a checkpoint holds as tensors: the trained parameters and the optimizer state (sharded
    under FSDP). ignore_frozen_params: frozen base weights are left out (LoRA); with --peft full
    every weight is trained, so every weight is in."""
    trained = StateDictOptions(ignore_frozen_params=True)
    return {"model": get_model_state_dict(modules, options=trained),
            "optim": get_optimizer_state_dict(modules, optimizer)}


def save_checkpoint(out, modules, optimizer, scheduler, state, rank, world):
    """Write new, rename, then delete. Every rank writes its DCP shards and its RNG state into
    checkpoint.tmp/; rank 0 adds train_state.json and, last, complete.json; then checkpoint/
    becomes checkpoint.old/, checkpoint.tmp/ becomes checkpoint/, and checkpoint.old/ is deleted.
    Killed before any of these operations, the folder still holds a complete checkpoint (the new
    or the previous one), and --resume takes the newest (recover_checkpoint)."""
    out = Path(out)
    new, final, old = out / NEW, out / CHECKPOINT, out / OLD
    # leftovers of a killed save; --resume made checkpoint/ the newest complete one
    if rank == 0:
        remove_checkpoint(new)
        remove_checkpoint(old)
    barrier(world)
    tensors = checkpoint_tensors(modules, optimizer)
    dcp.save(tensors, checkpoint_id=str(new))  # a collective; fsyncs files
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    # tensors and ints only, which restore_rng reads back with weights_only=True
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda}
    buffer = io.BytesIO()
    torch.save(rng, buffer)
    write_durably(new / f"rng_rank{rank}.pt", buffer.getvalue())
    barrier(world)
    if rank == 0:
        record = {**state, "scheduler": scheduler.state_dict()}
        write_durably(new / "train_state.json", json.dumps(record).encode())
        files = sorted(p.name for p in new.iterdir())
        complete = {"step": state["step"], "files": files}
        write_durably(new / COMPLETE, json.dumps(complete).encode())
        if final.exists():
            os.replace(final, old)
            fsync_dir(out)
        os.replace(new, final)
        fsync_dir(out)
        remove_checkpoint(old)
    barrier(world)


def resume_state(out, rank, world):
    """The train state of <out>/checkpoint after recover_checkpoint; every rank reads it."""
    if rank == 0:
        recover_checkpoint(out)
    barrier(world)  # rank 0 may have renamed folders: the others read after it
    state = checkpoint_state(out / CHECKPOINT)
    if state is None:
        raise SystemExit(f"--resume: no complete checkpoint in {out} (looked for "
                         f"{out / CHECKPOINT} with its {COMPLETE}); start the run without "
                         f"--resume (with --overwrite if {out} is not empty)")
    if "config" not in state:
        raise SystemExit(f"--resume: {out / CHECKPOINT} records no run config, so this run cannot "
                         f"be checked against it; start a new run with --overwrite")
    return state


def load_checkpoint(out, modules, optimizer, scheduler, state, rank, world, seed):
    """Restore what save_checkpoint wrote into <out>/checkpoint (state: its train_state.json).

    Another rank count works when the global batch (ranks x --grad-accum x --batch-size) is the
    same, say 8 x 1 x 4 resumed as 4 x 2 x 4: every step then sees the same items
    (data.micro_batches), the losses are normalised by global counts, and DCP reshards model and
    optimizer onto the new ranks. Only the random streams (dropout) cannot carry over: each rank
    is then seeded from (--seed, step, rank)."""
    ckpt = Path(out) / CHECKPOINT
    sd = checkpoint_tensors(modules, optimizer)
    # every rank reads the shards it needs (resharded if ranks differ)
    dcp.load(sd, checkpoint_id=str(ckpt))
    trained = StateDictOptions(ignore_frozen_params=True, strict=False)
    keys = set_model_state_dict(modules, sd["model"], options=trained)
    frozen = {n for n, p in modules.named_parameters() if not p.requires_grad}
    missing = set(keys.missing_keys) - frozen
    if missing or keys.unexpected_keys:  # only frozen weights may be absent
        raise SystemExit(f"--resume: {ckpt} does not fit this model (missing "
                         f"{sorted(missing)[:3]}, unexpected {keys.unexpected_keys[:3]})")
    set_optimizer_state_dict(modules, optimizer, sd["optim"])
    scheduler.load_state_dict(state["scheduler"])
    if state["world"] == world:
        restore_rng(ckpt / f"rng_rank{rank}.pt")
    else:
        # one stream per (seed, step, rank)
        stream = seed * 1_000_003 + state["step"] * 1_009 + rank
        torch.manual_seed(stream)
        random.seed(stream)
        if rank == 0:
            print(f"--resume: {state['world']} ranks -> {world}, same global batch "
                  f"{state['global_batch']}: the same items per step; dropout draws new random "
                  f"numbers")


def restore_rng(path):
    """Set the RNG states saved by save_checkpoint. weights_only=True: the file may hold tensors
    and plain numbers only, so a planted pickle cannot run code."""
    try:
        rng = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 -- unpickling errors come in several types
        raise SystemExit(f"--resume: {path} is not an RNG state written by train.py "
                         f"({type(err).__name__}: {str(err)[:200]}); it was not loaded. Restore "
                         f"the checkpoint or start anew") from None
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


# ---- the run folder before step 1: refused when not empty, resumed, or replaced ----

# What a run writes into --out; --overwrite deletes these (and nothing else) before writing anew.
RUN_FILES = ("config.json", "log.jsonl", "skipped.jsonl", CHECKPOINT, NEW, OLD, "adapter",
             "model", "lavender.safetensors")

# Settings that may change on --resume: they change when or how the run is computed, not what it
# learns (the data order per step depends on the global batch, which is compared instead; --data
# and --attn as paths: the data file is compared by its sha256, the attention folder resolved).
RESUME_MAY_CHANGE = {"max_steps", "epochs", "total_steps", "save_every", "progress", "resume",
                     "overwrite", "out", "dist_timeout", "activation_checkpointing", "world",
                     "batch_size", "grad_accum", "skip_bad_items", "max_length", "data", "attn",
                     "num_workers"}


def may_change_flags():
    """RESUME_MAY_CHANGE as flags, for messages and --help."""
    keys = sorted(RESUME_MAY_CHANGE - {"world", "total_steps"})
    return ", ".join("--" + k.replace("_", "-") for k in keys)


def open_run_dir(args, out, rank, world):
    """The checkpoint's train state with --resume, else None. Without --resume a non-empty --out
    is refused unless --overwrite: a finished run is never replaced by accident."""
    if args.resume and args.overwrite:
        raise SystemExit("--resume continues the run in --out, --overwrite replaces it: give one "
                         "of them")
    if args.resume:
        return resume_state(out, rank, world)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        held = ", ".join(sorted(p.name for p in out.iterdir())[:6])
        raise SystemExit(f"--out {out} is not empty ({held}): pass --resume to continue the run "
                         f"in it, --overwrite to replace it, or another --out")
    return None


def refuse_changes(saved, config, flags, only_given=False):
    """--resume: refuse every setting that differs from the checkpoint's run config, except those
    in RESUME_MAY_CHANGE, naming each with both values (flags: the settings' names that are flags
    of train.py). only_given: compare only the keys of `config` (a first check on the command line
    alone, before the model is loaded)."""
    if saved["global_batch"] != config["global_batch"]:
        raise SystemExit(f"--resume: the checkpoint was written by {saved['world']} ranks with a "
                         f"global batch of {saved['global_batch']}; this run has "
                         f"{config['world']} ranks and a global batch of "
                         f"{config['global_batch']} (ranks x --grad-accum x --batch-size). Keep "
                         f"the global batch: the data order per step depends on it")
    config = json.loads(json.dumps(config))  # tuples -> lists, as in the saved JSON
    name = lambda k: "--" + k.replace("_", "-") if k in flags else k  # noqa: E731
    keys = config.keys() if only_given else saved.keys() | config.keys()
    compared = sorted(keys - RESUME_MAY_CHANGE)
    changed = [f"  {name(k)}: {saved.get(k, '(not recorded)')!r} in the checkpoint, "
               f"{config.get(k, '(not recorded)')!r} now"
               for k in compared if saved.get(k) != config.get(k)]
    if changed:
        raise SystemExit("--resume would change the experiment; these settings differ from the "
                         "checkpoint's run:\n" + "\n".join(changed) + "\nResume with the "
                         "checkpoint's settings, or start a new run (another --out, or "
                         "--overwrite). May differ: " + may_change_flags())


def start_run_dir(args, out, config, skipped, step):
    """Rank 0, once every check passed: --overwrite clears the old run's files, config.json and
    skipped.jsonl are written, and on --resume log.jsonl keeps the checkpoint's steps only.
    Returns log.jsonl, open for appending one line per step."""
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES if args.overwrite else ():
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    write_atomic(out / "config.json", json.dumps(config, indent=1))
    (out / "skipped.jsonl").unlink(missing_ok=True)
    if skipped:
        lines = "".join(json.dumps(s) + "\n" for s in skipped)
        write_atomic(out / "skipped.jsonl", lines)
        print(f"--skip-bad-items: {len(skipped)} item(s) left out, listed in "
              f"{out / 'skipped.jsonl'}")
    if args.resume:
        trim_log(out / "log.jsonl", step)
    return open(out / "log.jsonl", "a" if args.resume else "w")  # noqa: SIM115 -- one line per step


def trim_log(path, step):
    """Keep the log lines of steps 1..step: steps after the checkpoint are trained again, and a
    cut-off line (a full disk, a power loss) is dropped rather than read."""
    rows = []
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", step + 1) <= step:
                rows.append(line + "\n")
    write_atomic(path, "".join(rows))


def train_state(step, config):
    """train_state.json of a checkpoint: the step reached and the run's config, against which
    --resume checks its own (the data order follows from --seed, the items and the global
    batch)."""
    return dict(step=step, world=config["world"], global_batch=config["global_batch"],
                config=config)


def file_sha256(path):
    """The sha256 of a file (the data file's, in config.json: --resume compares it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_config(args, items, attn_dir, limit, layers, counts, world, global_batch):
    """The run's config.json: every setting, the aligned layers, the checked data's counts and
    sha256, and the steps; a data set smaller than one step is refused."""
    steps_per_epoch = len(items) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{args.data} has {len(items)} usable items, fewer than one step needs "
                         f"({world} ranks x --grad-accum {args.grad_accum} x --batch-size "
                         f"{args.batch_size}); lower --batch-size or add data")
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    return {**vars(args), "world": world, "global_batch": global_batch, "aligned_layers": layers,
            **counts, "data_sha256": file_sha256(args.data), "max_length_tokens": limit,
            "attn_dir": str(attn_dir.resolve()) if attn_dir else None,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}


# ---- the outputs of a finished run, and reading them back ----

def save_outputs(args, out, model, aligner, processor, rank):
    """adapter/ (LoRA, PEFT save_pretrained) or model/ (full), and lavender.safetensors (Aligner +
    parallel projections). Every rank gathers (a collective); rank 0 writes."""
    lora = args.peft == "lora"
    full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
    vlm_sd = get_model_state_dict(model, options=full)  # rank 0: full tensors; others: empty
    aligner_sd = get_model_state_dict(aligner, options=full) if aligner is not None else {}
    if rank != 0:
        return
    lavender = {k: v for k, v in vlm_sd.items() if "lavender_" in k}  # eq. 15-16 projections
    lavender.update({f"aligner.{k}": v for k, v in aligner_sd.items()})
    rest = {k: v for k, v in vlm_sd.items() if "lavender_" not in k}
    if args.peft == "lora":  # loadable by PeftModel.from_pretrained(base, "<run>/adapter")
        for config in model.peft_config.values():  # AutoPeftModel reads the base from here
            config.base_model_name_or_path = base_name(args.model, args.model_path)
        # save_embedding_layers=False: LoRA adapts q/v only; "auto" would ask the hub about the base
        model.save_pretrained(Path(out) / "adapter", state_dict=rest,
                              save_embedding_layers=False)
    else:
        models.base_model(model).save_pretrained(Path(out) / "model", state_dict=rest)
        processor.save_pretrained(Path(out) / "model")
    if lavender:
        contiguous = {k: v.contiguous() for k, v in lavender.items()}
        save_file(contiguous, Path(out) / "lavender.safetensors")


def base_name(preset, model_path):
    """The adapter's base_model_name_or_path: --model-path (absolute) when given, else the
    preset's hub id, else its folder (toy) or, for the presets built from a config (tiny), its
    name."""
    if model_path is not None:
        return str(Path(model_path).resolve())
    return models.PRESETS[preset]["hub_id"] or models.preset_path(preset) or preset


def new_aligner(model, config):
    """The run's Aligner (§4.3), random weights: its variant, normalisation and activation from
    the run's settings (config.json or train.py's args), its channels from the aggregation and
    heads."""
    heads = models.text_config(model).num_attention_heads
    channels = aligner_lib.aligner_channels(config["aggregate"], heads)
    return aligner_lib.Aligner(config["aligner"], channels, norm=config["aligner_norm"],
                               act=config["aligner_act"])


def load_run(run_dir, device="cpu", dtype=torch.float32):
    """(model, processor, lavender, config) of a finished run, on one process, in eval mode.

    The base preset comes from config.json; LoRA runs load adapter/ exactly as the authors'
    README does (PeftModel.from_pretrained(base_model, adapter)), full runs load model/; the VLM
    in `dtype` (bf16 halves the memory: an 11B model then fits a 24 GB GPU), the Aligner in fp32.
    lavender = dict(aligner=nn.Module or None, layers=, aggregation=, aligner_mode=, match=,
    align_words=, learned=).
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    if config["peft"] == "lora":
        from peft import PeftModel
        base, processor = models.load_vlm(config["model"], config["model_path"], dtype, device)
        model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    else:
        model, processor = models.load_vlm(config["model"], str(run_dir / "model"), dtype, device)
    learned = config["loss"] == "lavender" and config["aggregate"] == "learn"
    lavender = dict(aligner=None, layers=config.get("aligned_layers", []),
                    aggregation=config["aggregate"], aligner_mode=config["aligner_mode"],
                    match=config["match"], align_words=config["align_words"], learned=learned)
    path = run_dir / "lavender.safetensors"
    if path.exists():
        sd = load_file(path)
        if lavender["learned"]:
            aggregate.add_parallel_projections(model, lavender["layers"], init="random")
            own = {k: v for k, v in sd.items() if not k.startswith("aligner.")}
            missing = set(own) - {k for k, _ in model.named_parameters()}
            if missing:
                raise ValueError(f"{path}: parameters {sorted(missing)[:3]} have no place in the "
                                 f"model")
            model.load_state_dict(own, strict=False)
        if config["aligner"] != "none":
            lavender["aligner"] = new_aligner(model, config)
            prefix = "aligner."
            weights = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            lavender["aligner"].load_state_dict(weights)
            lavender["aligner"].to(device).eval()
    return model.to(device).eval(), processor, lavender, config


def run_problem(run_dir):
    """None when run_dir looks like a finished train.py run, else what is missing or broken."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return "no such folder"
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        return f"config.json cannot be read ({type(err).__name__}: {err})"
    needed = ("model", "peft", "loss", "aggregate", "aligner", "aligner_mode", "match")
    if not isinstance(config, dict) or any(k not in config for k in needed):
        return f"config.json lacks some of {needed}: not written by train.py"
    lora = config["peft"] == "lora"
    weights = run_dir / ("adapter/adapter_config.json" if lora else "model/config.json")
    if not weights.is_file():
        return (f"{weights.relative_to(run_dir)} is missing: the run did not finish "
                f"(train.py --resume)")
    return None


# ---- stopping on a signal: pre-emption (SIGTERM) and Ctrl-C (SIGINT) ----

class Stopped(Exception):
    """A signal stopped training at a step boundary, after its checkpoint was written."""

    def __init__(self, signum, step, out):
        self.signum = int(signum)
        self.step = step
        name = signal.Signals(self.signum).name
        super().__init__(f"stopped by {name} after step {step}; the checkpoint is in "
                         f"{out / CHECKPOINT}: continue with the same command and --resume")


@contextlib.contextmanager
def signals_to_flag():
    """While training, SIGTERM (how schedulers pre-empt) and SIGINT (Ctrl-C) only set
    flag["signal"]: the loop saves a checkpoint at the next step boundary and stops. A second
    Ctrl-C stops at once. (Signal handlers can only be set in the main thread; elsewhere signals
    keep their behaviour.)"""
    flag = {"signal": 0}

    def handler(signum, frame):
        if signum == signal.SIGINT and flag["signal"] == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signal"] = signum

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
