"""Lavender fine-tuning: the torchrun + FSDP2 training loop (paper §5, §6, §8.1.1, §9).

One script runs both methods the paper compares, so every comparison is one flag apart:
  --loss ar        autoregressive fine-tuning: L_VLM, the next-token loss on the answer (eq. 6)
  --loss lavender  L_total = L_VLM + λ·L_att (eq. 10/12), L_att the MSE between the VLM's
                   per-word text-to-image attention (aggregate.py, through the Aligner of
                   aligner.py) and Stable Diffusion's per-word maps read from the attention
                   store (extract.py), eq. 9/17.
What else is here, from the paper: LoRA or full fine-tuning (§6 (4), §8.1.1), Aligner
pre-training with the VLM frozen (§6 (1), Fig. 21), exact/root word sampling (§6 (5)), aligned
layer subsets (Fig. 22), learned aggregation with parallel projections (eq. 15-16), FSDP for
Llama-3.2 (§5 (4)).

Set-up, in the order it happens: torchrun env -> process group (nccl on GPU, gloo on CPU) ->
explicit 1-D device mesh (distributed.py) -> load the preset (models.py) -> PEFT LoRA -> parallel
projections -> attention capture -> activation checkpointing -> fully_shard every
decoder/encoder layer, then the root (distributed.shard) -> optimizer. Plain `python train.py`
is one rank with no process group and no sharding. Items and attention maps come from data.py;
the training set, the check of every item before step 1 and the batches (DataLoader workers,
the run's order) from loader.py; the run folder (config.json; checkpoints written new, renamed,
then the old one deleted; --resume refusing a changed experiment; the outputs) is runs.py's.
SIGTERM/SIGINT save at the next step boundary.

    torchrun --nproc_per_node 8 train.py --model llama32   # reads data/train.jsonl, data/attn/
    python train.py --model tiny --data data.jsonl --attn attn/ --out runs/lav --max-steps 10
    python bench.py train      # CPU: Lavender step vs autoregressive step, time and peak memory
"""
import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import aggregate
import aligner as aligner_lib
import data
import loader
import models
import runs
from capture import answer_rows
from runs import Stopped, signals_to_flag  # pre-emption: a checkpoint at the next step
from distributed import all_reduce_sum, any_rank, exit_if_torchrun, gather_objects
from distributed import setup_distributed, shard, teardown


# ---- the model: preset -> LoRA -> parallel projections -> capture -> checkpointing -> FSDP2 ----

def apply_peft(model, args):
    """LoRA on the language model's q/v projections (args.peft == "lora"; models.lora_targets),
    or all weights trainable (§6 (4), §8.1.1)."""
    if args.peft == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(args.seed)  # LoRA A matrices are random: same seed, same start
    targets = models.lora_targets(model)
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, bias="none")
    return get_peft_model(model, config)


def build(args, device, mesh):
    """Model, processor, aligner, capture and aligned layers, in the order the set-up needs."""
    # refuse a placement it cannot honour, before loading
    if args.loss == "lavender" and args.aligner != "none":
        try:
            aggregate.aligner_placement(args.aggregate, args.aligner_mode)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    # the frozen base weights' dtype; auto: bf16 on a GPU with LoRA, else fp32
    gpu = "bfloat16" if args.peft == "lora" else "float32"
    frozen = models.resolve_dtype(args.frozen_dtype, device, gpu)
    model, processor = models.load_vlm(args.model, args.model_path, dtype=frozen)
    model = apply_peft(model, args)
    aligner, capture, layers = None, None, []
    if args.loss == "lavender":
        torch.manual_seed(args.seed + 1)  # parallel projections (random init)
        layers = aggregate.aligned_layers(model, args.layers)
        if args.aggregate == "learn":
            # eq. 15-16: W_Qd, W_Kd beside each aligned layer's W_Q, W_K
            aggregate.add_parallel_projections(model, layers, init=args.projection_init)
        if args.aligner != "none":
            torch.manual_seed(args.seed + 2)
            aligner = runs.new_aligner(model, vars(args))
        capture = aggregate.attention_capture(model, layers, learned=args.aggregate == "learn")
    trainable_in_float32(model)
    if args.activation_checkpointing:
        enable_activation_checkpointing(model)
    if mesh is None:
        model.to(device)
        aligner = aligner.to(device) if aligner is not None else None
    else:
        # fully_shard moves each rank's shard to its device: the full model never sits on one GPU
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, aligner = shard(model, aligner, mesh, compute)
    return model, processor, aligner, capture, layers


def enable_activation_checkpointing(model):
    """Recompute each layer in backward; non-reentrant, which works with FSDP2 and lets L_att
    reach the VLM (a reentrant checkpoint captures the maps without a graph)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name in recent transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # earlier 5.x: the same function under its old name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def trainable_in_float32(model):
    """Trainable parameters in fp32 (master weights); frozen ones stay in the load dtype. FSDP2
    needs one dtype per unit among trainable parameters (LoRA and copied projections could
    differ)."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def trainable_modules(model, aligner):
    """One module holding everything trained, so one state-dict call covers the VLM and the
    Aligner."""
    parts = {"vlm": model, **({"aligner": aligner} if aligner is not None else {})}
    return nn.ModuleDict(parts)


# ---- the losses of one micro-batch: eq. 6, eq. 9/17 ----

def vlm_loss_sum(logits, labels):
    """eq. 6: −Σ log p(answer token | image, question, earlier tokens), summed (not averaged), so
    that micro-batches and ranks can be weighted by their token counts. Token t predicts t+1."""
    predicted = logits[:, :-1].flatten(0, 1).float()  # (B·(T-1), V)
    targets = labels[:, 1:].flatten()  # (B·(T-1),)
    return F.cross_entropy(predicted, targets, ignore_index=-100, reduction="sum")


def micro_batch_losses(args, model, aligner, capture, batch, dm, device, tokenizer):
    """(ce_sum, att, n_aligned) for one micro-batch: the pieces of eq. 10. att is eq. 9/17 as
    aligner.attention_loss pools it (--att-pooling: over the micro-batch's words, or per
    sample)."""
    inputs = data.model_inputs(batch, device)
    labels = batch["labels"].to(device)
    if capture is None:  # --loss ar: no hooks, no maps
        logits = model(**inputs).logits
        return vlm_loss_sum(logits, labels), None, 0
    rows = answer_rows(batch["labels"])  # (B, R): every row that predicts an answer token
    capture.set_rows(rows.to(device))
    logits = model(**inputs).logits  # (B, T, V); the hooks filled capture.probs
    tokens = aggregate.row_tokens(rows, batch["input_ids"], logits, args.align_words)  # §6 (5)
    dm_words = [words for _, words in dm]
    plan = aggregate.plan_words(tokenizer, rows, tokens, dm_words, match=args.match)
    dm_maps = [maps for maps, _ in dm]
    batch_and_inputs = {**batch, **inputs}
    att, n_aligned = alignment_loss(args, capture, aligner, plan, dm_maps, batch_and_inputs, device)
    return vlm_loss_sum(logits, labels), att, n_aligned


def alignment_loss(args, capture, aligner, plan, dm_maps, batch, device, recompute=True):
    """(att, n_aligned): eq. 9/17 between the VLM's word maps (capture -> aggregate -> Aligner)
    and the DM maps of the words `plan` aligns, after the forward that filled `capture`.
    recompute: a per-layer Aligner runs under checkpoint (less memory, the same result; not with
    BatchNorm)."""
    if plan["dm_index"].shape[1] == 0:
        # no word to align (no attention file, no matching word): run the very same maps ->
        # Aligner graph on one captured row as a word that the loss weights by 0. Under FSDP
        # every rank must run the same graph: collectives follow autograd's order
        row_word = torch.full_like(plan["rows"], -1)
        row_word[:, 0] = 0
        no_map = torch.full((row_word.shape[0], 1), -1, dtype=torch.long)
        plan = {**plan, "row_word": row_word, "dm_index": no_map}
    mask = plan["dm_index"] >= 0  # (B, W) words aligned with a DM map
    recompute_aligner = recompute and args.aligner_norm != "batch"
    vlm_maps = aggregate.vlm_word_maps(capture, plan, batch, aggregation=args.aggregate,
                                       aligner=aligner, aligner_mode=args.aligner_mode,
                                       recompute=recompute_aligner)  # (B, W, 32, 32)
    target = aggregate.dm_targets(dm_maps, plan["dm_index"]).to(device)  # (B, W, 32, 32)
    att = aligner_lib.attention_loss(vlm_maps, target, mask.to(device), args.att_pooling)  # eq. 9
    return att, int(mask.sum())


# ---- the training loop ----

def train(args):
    """Fine-tune with --loss ar or lavender; returns the run directory (the library entry of
    toy.py). Raises Stopped after saving a checkpoint when SIGTERM or SIGINT arrives."""
    args.out = args.out or f"runs/{args.model}-{args.loss}"
    data.library_bars(args.progress)
    rank, world, device, mesh = setup_distributed(args.dist_timeout)
    # a few on a GPU, whose step is short; none on a CPU (no core to spare)
    if args.num_workers is None:
        args.num_workers = 4 if device.type == "cuda" else 0
    if args.num_workers < 0:
        raise SystemExit(f"--num-workers {args.num_workers}: give 0 (batches built in the loop) "
                         f"or more")
    try:
        # from here on, SIGTERM/SIGINT stop at the next step boundary
        with signals_to_flag() as stop:
            return fit(args, rank, world, device, mesh, stop)
    finally:
        teardown(world)


NOTHING_ALIGNED_STEPS = 5  # a --loss lavender run warns when its first 5 steps align no word


def warn_if_nothing_aligned(args, steps_run, steps_aligned, master=True):
    """Warn (rank 0) when a --loss lavender run's first NOTHING_ALIGNED_STEPS steps aligned no
    word: such a run trains L_VLM alone (loss_att 0), autoregressive fine-tuning under another
    name."""
    first_steps = steps_run == NOTHING_ALIGNED_STEPS
    if not master or args.loss != "lavender" or not first_steps or steps_aligned:
        return
    if args.align_words == "predicted":
        why = ("--align-words predicted aligns only the answer words the model predicts, and it "
               "predicts none of the DM's words (as a random or untrained model does); "
               "--align-words label aligns the answer's own words")
    else:
        why = "check that the attention store's words are the answers' words"
    warnings.warn(f"the first {steps_run} steps aligned no word (aligned_words 0, loss_att 0), "
                  f"so this run trains L_VLM alone: {why}", stacklevel=2)


def aligned_summary(args, steps_run, steps_aligned):
    """'; 3 of 10 steps aligned a word' for a --loss lavender run's last line ('' for --loss
    ar)."""
    lavender = args.loss == "lavender"
    return f"; {steps_aligned} of {steps_run} steps aligned a word" if lavender else ""


def next_micro_batches(args, run, batches, schedule, step, rank, world, stop):
    """This step's [(batch, dm)] from the loader; when its workers ended (the stop signal reaches
    them too, as Slurm's does), the rank builds this step's micro-batches itself."""
    try:
        return [next(batches) for _ in range(args.grad_accum)]
    except (RuntimeError, OSError):
        if not stop["signal"]:
            raise
        this_step = {**schedule, "first_step": step, "total_steps": step + 1}
        return loader.built_here(run.items, run.processor, run.attn_dir, this_step, rank, world)


def check_finite(total, loss_vlm, loss_att, micro, step, world):
    """Stop with the step's items named when the loss is not finite; every rank sees the same
    reduced value, so all stop together."""
    if math.isfinite(total):
        return
    ids = gather_objects([i for b, _ in micro for i in b["ids"]], world)
    raise FloatingPointError(f"non-finite loss at step {step + 1} (loss_vlm {loss_vlm}, "
                             f"loss_att {loss_att}); items of this step: {ids}. Nothing was "
                             f"saved from this step on; check these items or lower --lr")


def log_step(log, bar, last):
    """One line of log.jsonl (rank 0) and the progress bar."""
    log.write(json.dumps(last) + "\n")
    log.flush()
    bar.update(1)
    bar.set_postfix(loss=f"{last['loss']:.4f}")


def fit(args, rank, world, device, mesh, stop):
    """The loop (§6): read this rank's micro-batches, forward and backward (train_step), one
    optimizer step, log, and a checkpoint every --save-every steps or after a signal; then the
    outputs."""
    master = rank == 0  # only rank 0 prints and writes; every rank runs every collective
    run = start(args, rank, world, device, mesh)  # everything before step 1, every check passed
    step, last, signum, t_start = run.step, {}, 0, time.time()
    steps_aligned = 0  # steps of this process that aligned any word
    bar = data.progress_bar(show=master and args.progress, total=run.total_steps, initial=step,
                            desc=f"train {args.loss}")
    # this rank's micro-batches from the step the run starts at, built ahead by --num-workers
    # processes; the order depends on (seed, epoch) alone: every rank agrees
    schedule = dict(seed=args.seed, steps_per_epoch=run.steps_per_epoch, first_step=step,
                    total_steps=run.total_steps, batch_size=args.batch_size,
                    grad_accum=args.grad_accum)
    batches = loader.micro_batch_loader(run.items, run.processor, run.attn_dir, schedule, rank,
                                        world, args.num_workers, pin_memory=device.type == "cuda")
    while step < run.total_steps:
        t0 = time.time()
        epoch = step // run.steps_per_epoch
        # §6 (1): only the Aligner (+ projections) learn
        pretraining = step < args.pretrain_aligner_steps
        micro = next_micro_batches(args, run, batches, schedule, step, rank, world, stop)
        data_seconds = time.time() - t0  # the wait for them: ~0 when the workers keep ahead
        # forward and backward of each micro-batch; the step's losses over the global batch
        loss_vlm, loss_att, n_words = train_step(args, run, micro, world)
        total = loss_vlm + args.lam * loss_att  # eq. 10/12
        check_finite(total, loss_vlm, loss_att, micro, step, world)
        grad_norm, lr = optimizer_step(args, run, pretraining)  # clip, AdamW, the schedule
        step += 1
        steps_aligned += n_words > 0
        warn_if_nothing_aligned(args, step - run.step, steps_aligned, master)
        # log one line per step (rank 0)
        last = {"step": step, "epoch": epoch, "loss": total, "loss_vlm": loss_vlm,
                "loss_att": loss_att, "aligned_words": n_words, "lr": lr,
                "phase": "aligner" if pretraining else "all", "grad_norm": grad_norm,
                "seconds": round(time.time() - t0, 4), "data_seconds": round(data_seconds, 4)}
        if master:
            log_step(run.log, bar, last)
        # a checkpoint every --save-every steps, and now when any rank got SIGTERM/SIGINT
        signum = any_rank(stop["signal"], world) if step < run.total_steps else 0
        due = args.save_every and step % args.save_every == 0 and step < run.total_steps
        if signum or due:
            run.save(step)
        if signum:
            break
    bar.close()
    if master:
        run.log.close()
    if signum:
        raise Stopped(signum, step, run.out)
    finish(args, run, step, last, steps_aligned, t_start, rank, world)
    return str(run.out)


def finish(args, run, step, last, steps_aligned, t_start, rank, world):
    """The outputs of a finished run: the checkpoint for --resume, adapter/ or model/ and
    lavender.safetensors (runs.save_outputs, every rank), then the run's last line (rank 0)."""
    run.save(step)
    runs.save_outputs(args, run.out, run.model, run.aligner, run.processor, rank)
    if run.capture is not None:
        run.capture.remove()
    if rank != 0:
        return
    seconds = time.time() - t_start
    nan = float("nan")
    aligned = aligned_summary(args, step - run.step, steps_aligned)
    print(f"trained {args.loss} for {step} steps on {world} rank(s) in {seconds:.1f}s; last loss "
          f"{last.get('loss', nan):.4f} (vlm {last.get('loss_vlm', nan):.4f}, att "
          f"{last.get('loss_att', nan):.4f}){aligned}; run in {run.out}")


def start(args, rank, world, device, mesh):
    """Everything before step 1, each part checked before the next: the run folder (never
    replaced by accident; on --resume, a changed experiment refused before the model is loaded),
    the data, the model, every item, the run's config, the optimizer and, on --resume, its
    state."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    saved = runs.open_run_dir(args, out, rank, world)  # the checkpoint's train state or None
    # items per optimizer step, over all ranks
    global_batch = world * args.grad_accum * args.batch_size
    if saved:
        given = {**vars(args), "world": world, "global_batch": global_batch}
        runs.refuse_changes(saved["config"], given, vars(args), only_given=True)
    items, attn_dir = loader.read_data(args)
    model, processor, aligner, capture, layers = build(args, device, mesh)
    limit = loader.max_length(args, model)
    items, skipped, counts = loader.checked_items(args, items, attn_dir, processor, limit, rank,
                                                  world, out)
    config = runs.run_config(args, items, attn_dir, limit, layers, counts, world, global_batch)
    modules = trainable_modules(model, aligner)
    steps_per_epoch = config["steps_per_epoch"]
    optimizer, scheduler, vlm_params, lavender_params = optimizer_and_schedule(
        args, modules, steps_per_epoch)
    step = 0
    if saved:
        runs.refuse_changes(saved["config"], config, vars(args))
        runs.load_checkpoint(out, modules, optimizer, scheduler, saved, rank, world, args.seed)
        step = saved["step"]
    log = runs.start_run_dir(args, out, config, skipped, step) if rank == 0 else None
    if rank == 0 and args.loss == "lavender" and counts["items_without_attention"]:
        print(f"{counts['items_without_attention']} of {len(items)} items have no attention "
              f"file in {attn_dir}: they train with L_VLM alone")
    modules.train()

    def save(step):
        """A checkpoint after `step`: every rank calls it (DCP is a collective)."""
        state = runs.train_state(step, config)
        runs.save_checkpoint(out, modules, optimizer, scheduler, state, rank, world)

    return SimpleNamespace(
        out=out, model=model, processor=processor, aligner=aligner, capture=capture,
        items=items, attn_dir=attn_dir, global_batch=global_batch, step=step, log=log,
        steps_per_epoch=steps_per_epoch, total_steps=config["total_steps"], modules=modules,
        optimizer=optimizer, scheduler=scheduler, vlm_params=vlm_params,
        lavender_params=lavender_params, save=save, device=device, mesh=mesh)


def train_step(args, run, micro, world):
    """Forward and backward of this rank's micro-batches of one step (eq. 6, eq. 10/12). Each
    loss is this rank's share of the global batch's mean (FSDP averages gradients over ranks),
    so 1 rank x 2 micro-batches and 2 ranks x 1 give the same gradients. L_att with --att-pooling
    words (the release's): each micro-batch pooled over its own aligned words, then the mean over
    the step's micro-batches and ranks (the release divides each micro-batch's loss by the
    accumulation steps, DDP averages ranks), so the same global batch split into other
    micro-batches weighs its words differently; with samples: the mean over the global batch's
    samples, whatever the split. Returns the step's (loss_vlm, loss_att, aligned words) over the
    global batch, the same on every rank."""
    # eq. 6 is a mean over the answer tokens of the global batch: count them on every rank first
    rank_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b, _ in micro)
    n_tokens = all_reduce_sum([rank_tokens], world)[0]
    sums = [0.0, 0.0, 0.0]  # this rank's summed CE, its share of the step's L_att, aligned words
    for m, (batch, dm) in enumerate(micro):
        if run.mesh is not None:  # reduce-scatter gradients only after the last micro-batch
            for module in run.modules.values():
                module.set_requires_gradient_sync(m == len(micro) - 1)
        ce_sum, att, n_aligned = micro_batch_losses(args, run.model, run.aligner, run.capture,
                                                    batch, dm, run.device,
                                                    run.processor.tokenizer)
        loss_vlm = ce_sum / max(n_tokens, 1) * world  # eq. 6, per answer token of the global batch
        # this micro-batch's weight in the step's L_att (eq. 9/17): its samples' share of the
        # global batch, or one micro-batch of the step's world x len(micro) (words);
        # x world: FSDP averages
        by_samples = args.att_pooling == "samples"
        weight = len(batch["ids"]) / run.global_batch if by_samples else 1 / (world * len(micro))
        loss_att = att * weight * world if att is not None else 0.0
        loss = aligner_lib.total_loss(loss_vlm, loss_att, args.lam)  # eq. 10/12
        loss.backward()
        sums[0] += ce_sum.item()
        sums[1] += att.item() * weight if att is not None else 0.0
        sums[2] += n_aligned
    ce, att_sum, n_words = all_reduce_sum(sums, world)
    return ce / max(n_tokens, 1), att_sum, int(n_words)


def optimizer_step(args, run, pretraining):
    """Clip the gradients, step AdamW, zero the gradients, step the schedule; returns (gradient
    norm before clipping, the step's learning rate). Aligner pre-training (§6 (1)) steps the
    Lavender group alone."""
    if pretraining:
        # the VLM stays frozen: drop its gradients before clipping and the step
        for p in run.vlm_params:
            p.grad = None
    stepped = run.lavender_params if pretraining else run.vlm_params + run.lavender_params
    params = [p for p in stepped if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    full_norm = getattr(grad_norm, "full_tensor", lambda: grad_norm)()  # a DTensor under FSDP
    return float(full_norm), lr


def optimizer_and_schedule(args, modules, steps_per_epoch):
    """(AdamW, its schedule, VLM parameters, Lavender parameters): one AdamW over two groups, so
    that Aligner pre-training (§6 (1)) can step the Lavender group (Aligner, parallel
    projections) alone."""
    is_lavender = lambda n: "lavender_" in n or n.startswith("aligner.")  # noqa: E731
    trained = [(n, p) for n, p in modules.named_parameters() if p.requires_grad]
    lavender_params = [p for n, p in trained if is_lavender(n)]
    vlm_params = [p for n, p in trained if not is_lavender(n)]
    groups = [{"params": vlm_params}, {"params": lavender_params}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)

    # decay per epoch, like the authors' StepLR (gamma 0.85), after an optional linear warm-up
    # (none in the release): a function of the step alone, not of the total number of steps, so
    # a run cut short and resumed follows the same schedule as an uninterrupted one
    def factor(s):
        warmup = min(1.0, (s + 1) / args.warmup_steps) if args.warmup_steps else 1.0
        return warmup * args.lr_gamma ** (s // steps_per_epoch)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler, vlm_params, lavender_params


# ---- command line ----

def build_parser():
    p = argparse.ArgumentParser(description="Lavender or autoregressive fine-tuning of a VLM "
                                            "(torchrun: many ranks).")
    add = p.add_argument
    # ---- model and data ----
    add("--model", default="tiny", choices=models.VLM_PRESETS, help="VLM preset (models.py)")
    add("--model-path", default=None, help="local copy of the preset (a save_pretrained folder)")
    add("--data", default="data/train.jsonl", help="dataset JSONL (DESIGN.md format)")
    add("--attn", default=None,
        help="attention store of extract.py (default: attn/ beside --data: data/attn/)")
    add("--out", default=None, help="run directory to write (default: runs/<model>-<loss>)")
    add("--max-length", type=int, default=None,
        help="longest item in tokens (prompt + answer); a longer one is a bad item. Default: "
             "2048, or the model's context if shorter")
    add("--num-workers", type=int, default=None,
        help="processes that build the batches ahead of the step (DataLoader workers); default "
             "4 on a GPU, 0 on a CPU (in the loop). The same batches, in the same order, with "
             "any number")
    add("--skip-bad-items", action=argparse.BooleanOptionalAction, default=False,
        help="train without the items that fail the checks before step 1 (listed in "
             "<out>/skipped.jsonl); default: stop before step 1 and name them")
    # ---- method ----
    add("--loss", default="lavender", choices=["ar", "lavender"],
        help="ar: eq. 6 only; lavender: + λ·L_att (eq. 10)")
    add("--lam", type=float, default=10.0,
        help="λ of eq. 10 (= 1/σ², eq. 8); 10 as in the authors' release")
    add("--aggregate", default="learn", choices=aggregate.AGGREGATIONS,
        help="over heads-layers (§4.2); learn: parallel projections (eq. 15-16), best in Fig. 19")
    add("--projection-init", default="copy", choices=["copy", "random"],
        help="learn: W_Qd, W_Kd start as copies of W_Q, W_K (A_d = A) or random (the authors' "
             "release)")
    add("--layers", default="all", choices=aggregate.LAYER_SUBSETS,
        help="text-to-image attention layers aligned (Fig. 22): the family's "
             "(models.attention_layers) or a quarter")
    add("--aligner", default="sim", choices=["none", *aligner_lib.VARIANTS],
        help="Aligner variant (§4.3)")
    add("--aligner-mode", default="auto", choices=aggregate.ALIGNER_MODES,
        help="auto: the release's placement (per layer for mean-mean, mean-max, learn; after the "
             "layers are combined for max-*, flow-*); per-layer; after "
             "(aggregate.aligner_placement)")
    add("--aligner-norm", default="instance", choices=sorted(aligner_lib.NORMS),
        help="Aligner normalisation (instance: no affine, the release's default)")
    add("--aligner-act", default="relu6", choices=sorted(aligner_lib.ACTIVATIONS),
        help="Aligner activation (the release: ReLU6, or LeakyReLU 0.1 for flow)")
    add("--match", default="exact", choices=["exact", "root"],
        help="word sampling (§6 (5)): same word or same stem")
    add("--align-words", default="predicted", choices=aggregate.ALIGN_WORDS,
        help="§6 (5): align the word the model predicts at a row (the paper and the release), "
             "or the label word")
    add("--att-pooling", default="words", choices=aligner_lib.POOLINGS,
        help="eq. 9/17 over a micro-batch: words: the sum of its aligned words' MSE over their "
             "number (the authors' release); samples: each sample's mean over its words, then "
             "over samples")
    add("--pretrain-aligner-steps", type=int, default=0,
        help="first N steps train only the Aligner and parallel projections, VLM frozen (§6 (1), "
             "Fig. 21)")
    # ---- fine-tuning and optimisation ----
    add("--peft", default="lora", choices=["lora", "full"],
        help="LoRA on the language model's q/v, or full")
    add("--lora-r", type=int, default=8, help="LoRA rank")
    add("--lora-alpha", type=int, default=32, help="LoRA alpha")
    add("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    add("--frozen-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
        help="dtype of the frozen base weights (LoRA); auto: bfloat16 on a GPU, float32 on a "
             "CPU. Trained ones stay float32")
    add("--epochs", type=int, default=3, help="epochs (unless --max-steps)")
    add("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    add("--batch-size", type=int, default=4, help="items per rank per micro-batch")
    add("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    add("--lr", type=float, default=1e-4, help="AdamW learning rate")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    add("--lr-gamma", type=float, default=0.85, help="learning-rate decay per epoch")
    add("--warmup-steps", type=int, default=0,
        help="linear learning-rate warm-up over the first N steps (0: none, as the release)")
    add("--clip", type=float, default=1.0, help="gradient-norm clipping")
    add("--seed", type=int, default=42, help="seed of LoRA/Aligner init, data order and dropout")
    add("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
        help="recompute layer activations in backward (non-reentrant)")
    # ---- checkpoints and output ----
    add("--save-every", type=int, default=500,
        help="write checkpoint/ every N steps (0: only at the end and on SIGTERM/SIGINT); a "
             "SIGKILL loses at most N steps")
    add("--resume", action=argparse.BooleanOptionalAction, default=False,
        help="continue the run in --out from its newest complete checkpoint; every setting must "
             "be the checkpoint's except " + runs.may_change_flags() + "; the rank count may "
             "change when ranks x --grad-accum x --batch-size stays the same; --data and --attn "
             "may be spelled differently, but the data file's sha256 and the attention folder "
             "(resolved) must be the same")
    add("--overwrite", action=argparse.BooleanOptionalAction, default=False,
        help="replace the run in a non-empty --out (its run files are deleted once the checks "
             "pass)")
    add("--dist-timeout", type=float, default=10,
        help="minutes a collective waits for a stalled rank before the job fails")
    add("--progress", action=argparse.BooleanOptionalAction, default=True,
        help="tqdm bar on rank 0 when stderr is a terminal (--no-progress: none)")
    add("--quiet", dest="progress", action="store_false", help="no progress bars: --no-progress")
    return p


def main():
    args = build_parser().parse_args()
    try:
        train(args)
    except Stopped as stopped:
        # the checkpoint is written; 128 + signal, as a process killed by it
        if int(os.environ.get("RANK", "0")) == 0:
            print(stopped, file=sys.stderr)
        exit_if_torchrun(128 + stopped.signum)
        raise SystemExit(128 + stopped.signum) from None
    exit_if_torchrun()


if __name__ == "__main__":
    main()
