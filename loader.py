"""train.py's data (§5, §6): the training set read and checked, and its batches off the step's
critical path.

read_data finds --data and, for --loss lavender, its attention store, naming what is missing and
the command that makes it; checked_items then checks every item before step 1 (each rank a
share, the problems gathered), counts the words each answer aligns, and stops the run with
every bad item named (or, with --skip-bad-items, leaves them out).

Decoding a step's images and running the processor (data.collate) takes up to a second of one
core a micro-batch (4 items of 1120 px PNGs through Llama-3.2's processor: 1.06 s on a busy
CPU), the step of an 11B model on a node a few hundred milliseconds: done in the loop, the GPU
waits for it every step. Here `--num-workers` processes build each micro-batch ahead of the step
that needs it, while the order stays train.py's own: the batch sampler yields this rank's
micro-batches (data.micro_batches over data.epoch_order, which depend on the seed and the epoch
alone), step after step, from the step a resumed run starts at. Nothing in a batch is random
(the processor resizes and tiles, it does not augment), so a worker builds exactly the batch the
main process would: `--num-workers 2` gives the same losses as `--num-workers 0`, bit for bit,
and a resumed run reads what the uninterrupted one read.

    batches = micro_batch_loader(items, processor, attn_dir, schedule, rank, world, num_workers=2)
    micro = [next(batches) for _ in range(grad_accum)]  # [(batch, [(maps, words) or (None, None)])]
"""
import functools
import signal
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import aggregate
import data
import models
from distributed import gather_objects


# ---- the training set: read, its attention store found ----

def extract_command(data_path, attn):
    """The command that makes the attention store `attn` of the training set at `data_path`."""
    return f"torchrun --nproc_per_node 8 extract.py --dm sd14 --data {data_path} --out {attn}"


def read_data(args):
    """(items, attention folder or None): --data read, and for --loss lavender the attention store
    found; what is missing is named, with where it was looked for and how to make it."""
    path = Path(args.data)
    attn = Path(args.attn) if args.attn else path.parent / "attn"
    then = f", then make the attention targets: {extract_command(path, attn)}"
    items = data.read_items_or_exit(path, then=then)
    if args.loss == "ar":
        return items, None
    if not attn.is_dir():
        where = "--attn" if args.attn else "the default --attn, attn/ beside --data"
        raise SystemExit(f"--loss lavender needs the attention store of extract.py: {where} "
                         f"{attn} does not exist (looked for {attn.resolve()}). Make it with "
                         f"`{extract_command(path, attn)}`, pass --attn DIR, or train without "
                         f"it: --loss ar")
    return items, attn


# ---- every item checked before step 1 ----

def max_length(args, model):
    """--max-length, or by default 2048 tokens (the model's context if shorter)."""
    context = models.text_config(model).max_position_embeddings
    if args.max_length is not None and args.max_length > context:
        raise SystemExit(f"--max-length {args.max_length} exceeds --model {args.model}'s context "
                         f"of {context} tokens")
    return args.max_length or min(2048, context)


def check(args, item, processor, attn_dir, limit):
    """(problem, has_maps, aligned) of one item before step 1: data.check_item, then how many of
    its attention file's words the answer's label words match (aggregate.label_plan, §6 (5);
    with --align-words predicted, training aligns the words the model predicts, known only in
    the forward)."""
    problem, words = data.check_item(item, processor, attn_dir, limit)
    if problem or words is None:
        return problem, False, 0
    input_ids, labels = data.encode(processor, item)  # (1, T) each
    _, plan = aggregate.label_plan(processor.tokenizer, input_ids, labels, [words], args.match)
    aligned = plan["dm_index"] >= 0  # (1, W)
    return None, True, int(aligned.sum())


def checked_items(args, items, attn_dir, processor, limit, rank, world, out):
    """(items to train on, skipped, counts): every item checked before step 1 (check, and
    repeated ids), each rank a share, the results gathered so that every rank, and the message,
    see every bad item. Bad items stop the run with their list, or with --skip-bad-items are
    left out and recorded in <out>/skipped.jsonl. A Lavender run with no word to align is
    refused."""
    share = data.progress_bar(range(rank, len(items), world), show=rank == 0 and args.progress,
                              desc="check data", leave=False)
    mine = [(i, check(args, items[i], processor, attn_dir, limit)) for i in share]
    checked = dict(gather_objects(mine, world))  # every rank's share, on every rank
    problems = {i: problem for i, (problem, _, _) in checked.items() if problem}
    # a repeated id also fails its maps' text check: say why
    problems.update(data.duplicate_ids(items))
    if problems and not args.skip_bad_items:
        listed = "\n  ".join(problems[i] for i in sorted(problems)[:20])
        raise SystemExit(f"{len(problems)} of {len(items)} items in {args.data} cannot be "
                         f"trained on (nothing was trained):\n  {listed}\nFix or remove them, "
                         f"or pass --skip-bad-items to train without them (listed then in "
                         f"{out / 'skipped.jsonl'})")
    good = [i for i in range(len(items)) if i not in problems]
    with_maps = sum(checked[i][1] for i in good)
    counts = {"items": len(good), "skipped_items": len(problems),
              "items_without_attention": len(good) - with_maps,
              "items_with_aligned_words": sum(checked[i][2] > 0 for i in good)}
    if attn_dir is not None and counts["items_with_aligned_words"] == 0:
        make = extract_command(args.data, attn_dir)
        raise SystemExit(f"--loss lavender would align nothing: of {len(good)} items, "
                         f"{with_maps} have an attention file in {attn_dir} and none has an "
                         f"answer word among its file's words (--match {args.match}). Make the "
                         f"store for this --data with `{make}`, or use --loss ar")
    skipped = [{"id": items[i]["id"], "line": items[i].get("line"), "reason": problems[i]}
               for i in sorted(problems)]
    return [items[i] for i in good], skipped, counts


# ---- batches ----

def read_batch(processor, attn_dir, rank, items):
    """(batch, [(DM maps, words) or (None, None)]) of a micro-batch. Every item passed the checks
    before step 1; a failure now (a file changed during training) names the items and the rank."""
    try:
        return data.collate(processor, items), [data.read_maps(attn_dir, it["id"]) for it in items]
    except Exception as err:
        raise RuntimeError(f"rank {rank}: items {[it['id'] for it in items]} could not be read "
                           f"({type(err).__name__}: {err}); they passed the checks before step 1, "
                           f"so a file changed since") from err


def step_batches(n_items, seed, steps_per_epoch, first_step, total_steps, batch_size, grad_accum,
                 rank, world):
    """This rank's micro-batches (lists of item indices) of steps first_step + 1 .. total_steps, in
    order: grad_accum per step. Step s of the run is step s % steps_per_epoch of epoch
    s // steps_per_epoch, whose order is data.epoch_order(n_items, seed, epoch).
    8 items, batch 2, 1 rank, 4 steps an epoch, first_step 3, total_steps 5: the last pair of
    epoch 0's order, then the first of epoch 1's."""
    order, order_epoch = None, None
    for step in range(first_step, total_steps):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = data.epoch_order(n_items, seed, epoch), epoch
        yield from data.micro_batches(order, in_epoch, batch_size, grad_accum, rank, world)


def built_here(items, processor, attn_dir, schedule, rank, world):
    """The micro-batches of step_batches(**schedule) built in this process, as with 0 workers:
    train.fit's way on when a stop signal has ended the workers before they delivered its step."""
    return [read_batch(processor, attn_dir, rank, [items[i] for i in idx])
            for idx in step_batches(len(items), rank=rank, world=world, **schedule)]


def quiet_stop(worker_id):
    """In a worker: SIGTERM ends it as Ctrl-C does, quietly with exit code 0 (DataLoader's worker
    loop catches KeyboardInterrupt), not as a worker killed by a signal, which fails the main
    process at once. A scheduler that signals every process (Slurm) thus leaves the main process
    to finish its step (built_here what the workers had not delivered) and save. (Ignoring the
    signal would not do: DataLoader and multiprocessing end stuck workers by SIGTERM, then wait.)"""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def micro_batch_loader(items, processor, attn_dir, schedule, rank, world, num_workers=0,
                       pin_memory=False):
    """An iterator of this rank's (batch, dm) micro-batches, in step_batches' order (schedule: its
    keyword arguments after n_items, rank and world), built by `num_workers` processes ahead of
    the loop (0: in the loop, as they are needed). pin_memory: page-locked host memory, which
    the copies to the GPU read directly. The loader's own generator is private: making its
    iterator draws a seed from it, and a draw from the global one would shift the dropout masks
    of every later step (and so a resumed run's)."""
    sampler = step_batches(len(items), rank=rank, world=world, **schedule)
    loader = DataLoader(items, batch_sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory,
                        collate_fn=functools.partial(read_batch, processor, attn_dir, rank),
                        worker_init_fn=quiet_stop if num_workers else None,
                        generator=torch.Generator().manual_seed(0))
    return iter(loader)
