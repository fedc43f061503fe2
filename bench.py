"""Benchmarks: what Lavender's extra work costs, and how it compares with its peers, as ratios
measured in one run (CPU, random weights). bench_gpu.py is the one command for a lent GPU.

Each CPU benchmark times the arms (one doing the extra work, one not, and a peer doing the same
work its way) in one process on the same inputs, arms interleaved, and prints the ratios, the
target's last. Time is the process's CPU time (time.process_time) with one thread: on a machine
shared with other jobs the wall clock swings by 2x between identical steps, one thread's CPU time
much less. Peak memory is the peak resident set (VmHWM) of a fresh child process per arm. The
peers: Prompt-to-Prompt's attention store for extract.py (bench_extract.py, with the memory
helpers), the authors' release (eager attention, output_attentions) for aggregate.py. Results,
with the machine they came from: BENCHMARKS.md.

    OMP_NUM_THREADS=1 python bench.py extract   # extract.py vs SDPA vs Prompt-to-Prompt, 256 px
    OMP_NUM_THREADS=1 python bench.py extract --res 512 --repeats 1   # SD-v1.4's own 512 px
    OMP_NUM_THREADS=1 python bench.py null-text # extract.py --inversion null-text over ddim, 64 px
    python bench.py aggregate                   # aggregate.py vs plain vs the release's eager way
    python bench.py aggregate --model idefics   #   the same at IDEFICS-9B's proportions, no eager
    python bench.py aggregate --model qwen2vl   #   at Qwen2-VL-7B's (selfattn.py), + all 28 layers
    python bench.py train                       # train.py: Lavender vs AR step (<= 1.15, <= 1.10)
    python bench.py train --words 4 --width 8   #   fewer aligned words; a model twice as wide
    python bench.py train --tokens-per-word 2   #   two-token words: one Aligner map per token
    python bench.py train-gpu --batch-size 2    # one GPU: Llama-3.2-11B geometry, one 560 px tile
    python bench_gpu.py                         # one GPU, <= 11 minutes: one table (bench_gpu.md)
"""
import argparse
import gc
import json
import time

import torch
import torch.nn as nn
import torch.utils.checkpoint

import aggregate
import aligner as aligner_lib
import data
import flamingo
import mllama
import models
import qwen
import train
from bench_extract import (EXTRACT_ARMS, bench_extract, bench_null_text, child_peak_rss,
                           extract_memory, peak_rss)


# ---- the VLM: llama32's proportions, scaled down ----
def bench_model(tile_size=112, width=16, tiles=4, device="cpu", dtype=torch.float32, batch_size=1):
    """llama32's proportions at 1/`width` width (mllama.llama32_size; default 1/16), random weights:
    the model and inputs of the aggregate and train benchmarks. width=1, tile_size=560, tiles=1,
    dtype=bfloat16 on a GPU is Llama-3.2-11B-Vision's own geometry with one 560 px tile (the model
    is built on `device`).

    At width 16: 40 text layers of hidden 256, cross-attention at 3, 8, ..., 38, 32 heads / 8 KV
    heads of dim 8, vocab 8016 = 128256 / 16; 112 px tiles of 14 px patches (8x8 + CLS = 65 tokens;
    llama32: 560 px, 1601), 4 tiles. One image in the 2x2 layout (260 image tokens), 256 text
    tokens, 32 captured rows in all 8 cross-attention layers. A narrower model makes the capture
    relatively MORE expensive (its cost grows with heads x rows x image tokens x head dim, the
    model's with tokens x hidden²), so these ratios are conservative for the full size.
    """
    if tiles not in (1, 4):
        raise ValueError(f"bench_model tiles {tiles}: choose 1 (the 1x1 layout) or 4 (2x2)")
    vocab = 128256 // width
    ids = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               image_token_index=vocab - 16)
    size = mllama.llama32_size(width, tile_size)
    model = mllama.mllama(size, ids, seed=0, device=device, dtype=dtype).eval()
    T, R, B = 256, 32, batch_size
    # the same sample B times
    input_ids = torch.randint(3, vocab - 17, (1, T)).repeat(B, 1)  # (B, T)
    input_ids[:, 1] = vocab - 16  # the image token
    cross_mask = torch.zeros(B, T, 1, 4, dtype=torch.long)
    cross_mask[:, 1:, :, :tiles] = 1  # text after the image attends to its tiles
    tile_mask = torch.zeros(B, 1, 4, dtype=torch.long)
    tile_mask[..., :tiles] = 1
    pixels = torch.randn(1, 1, 4, 3, tile_size, tile_size).repeat(B, 1, 1, 1, 1, 1)
    # Mllama's aspect ratio ids: 6 = 2x2, 1 = 1x1
    layout = torch.full((B, 1), 6 if tiles == 4 else 1)
    batch = dict(input_ids=input_ids, attention_mask=torch.ones(B, T, dtype=torch.long),
                 pixel_values=pixels, aspect_ratio_ids=layout, aspect_ratio_mask=tile_mask,
                 cross_attention_mask=cross_mask)
    # the last R positions, as an answer's would be
    rows = torch.arange(T - R - 1, T - 1)[None].repeat(B, 1)  # (B, R)
    return model, batch, rows


# ---- aggregate.py: VLM attention capture, one forward, against the release's eager attention ----

CAPTURE_ARMS = ("plain", "capture", "learn", "eager")


def release_attention(model, batch, rows):
    """The authors' release's way (AstraZeneca/vlm): the model in eager attention, as
    from_pretrained(..., attn_implementation="eager") gives it (every attention, the vision
    encoder's too), and output_attentions=True, so every layer's full (heads, T, keys) softmax is
    materialised and returned; the aligned rows are then read from the cross-attention layers'
    maps. Returns (logits, probs (B, L, H, R, N)): the same probabilities AttentionCapture makes."""
    model.set_attn_implementation("eager")
    try:
        out = model(**batch, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")  # bench_model's own
    layers = aggregate.aligned_layers(model)
    attentions = [out.attentions[layer] for layer in layers]  # (B, H, T, N) each
    probs = torch.stack(attentions, dim=1)                     # (B, L, H, T, N)
    B, L, H, _, N = probs.shape
    R = rows.shape[1]
    index = rows.to(probs.device)[:, None, None, :, None].expand(B, L, H, R, N)
    return out.logits, probs.gather(3, index)                  # (B, L, H, R, N)


def capture_forward(model, batch, rows, arm):
    """One forward with autograd on (as in training), returning a scalar built from what the arm
    made."""
    if arm == "plain":
        return model(**batch).logits.float().mean()
    if arm == "eager":
        logits, probs = release_attention(model, batch, rows)
        return logits.float().mean() + probs.float().mean()
    if arm == "every-layer":
        # qwen2vl: all 28 self-attention layers, not 7
        n_layers = len(models.language_model(model).layers)
        layers = list(range(n_layers))
    else:
        layers = aggregate.aligned_layers(model)
    with aggregate.attention_capture(model, layers, learned=arm == "learn") as capture:
        capture.set_rows(rows)
        logits = model(**batch).logits
        return logits.float().mean() + capture.probs.mean()


def capture_setup(projections=True, model="llama32", **geometry):
    """The benchmark's model (llama32's, IDEFICS-9B's or qwen2vl's proportions), with parallel
    projections (unused by the other arms) when asked."""
    builders = {"llama32": bench_model, "idefics": flamingo.bench_model,
                "qwen2vl": qwen.bench_model}
    model, batch, rows = builders[model](**geometry)
    if projections:
        aggregate.add_parallel_projections(model, aggregate.aligned_layers(model))
    return model, batch, rows


def bench_aggregate(reps=7, name="llama32"):
    """Forward time (one thread, arms interleaved, median of reps) and peak memory (a fresh process
    per arm) of plain, capture (ours), learn (ours, eq. 15-16) and eager (the release's way; not
    for idefics: IDEFICS' output_attentions omits its cross-attention, and the release has no
    IDEFICS code); for qwen2vl also every-layer, the capture of all 28 layers instead of the
    default 7."""
    torch.set_num_threads(1)
    model, batch, rows = capture_setup(model=name)
    arms_of = {"idefics": CAPTURE_ARMS[:3], "qwen2vl": (*CAPTURE_ARMS, "every-layer")}
    arms = arms_of.get(name, CAPTURE_ARMS)
    times = {arm: [] for arm in arms}
    for _ in data.progress_bar(range(reps + 1), desc="forward time"):
        for arm in arms:
            t0 = time.process_time()
            capture_forward(model, batch, rows, arm)
            times[arm].append(time.process_time() - t0)
        # the forward after eager's runs ~0.1 s slower (its freed memory is faulted in again): an
        # untimed one takes that, so the next plain is not charged for it (nor is eager:
        # conservative)
        capture_forward(model, batch, rows, "plain")
    # the first rep is a warm-up; minima: robust to other jobs' load
    med = {arm: sorted(v[1:])[len(v[1:]) // 2] for arm, v in times.items()}
    best = {arm: min(v[1:]) for arm, v in times.items()}
    memory_arms = data.progress_bar(arms, desc="peak memory")
    mem = {arm: child_peak_rss(["aggregate", "--memory-arm", arm, "--model", name])
           for arm in memory_arms}
    for arm in arms:
        m = mem[arm]
        peak_mib = m["peak_kb"] / 1024
        inc_mib = (m["peak_kb"] - m["base_kb"]) / 1024
        print(f"{arm:8s} forward {med[arm]:.3f} s CPU (median of {reps}, min {best[arm]:.3f}); "
              f"peak RSS {peak_mib:.0f} MiB, "
              f"forward's increment over the loaded model {inc_mib:.0f} MiB")
    inc = {arm: mem[arm]["peak_kb"] - mem[arm]["base_kb"] for arm in arms}

    def ratio(a, b):
        peak = mem[a]["peak_kb"] / mem[b]["peak_kb"]
        return (f"{a}/{b}: time median {med[a] / med[b]:.3f}, min {best[a] / best[b]:.3f}; "
                f"peak memory {peak:.3f}; forward's increment {inc[a] / inc[b]:.3f}")
    print("\n".join(ratio(arm, "plain") for arm in arms if arm not in ("plain", "capture")))
    if "eager" in arms:
        print(f"the release's way against ours, {ratio('eager', 'capture')}")
    print(f"ratios {ratio('capture', 'plain')} (target <= 1.10)")


# ---- train.py: a Lavender step vs an autoregressive step ----

STEP_ARMS = ("ar", "lavender", "lavender-no-recompute", "lavender-after")


def step_setup(arm, words=16, width=16, tiles=4, tile=112, device="cpu", dtype=torch.float32,
               batch_size=1, tokens=1):
    """One optimizer step at bench_model()'s geometry (llama32's 40 text layers, cross-attention at
    3, 8, ..., 38, 32/8 heads, at 1/`width` width; one image of `tiles` tiles;
    256 text tokens, the last 33 the answer; `batch_size` samples) with LoRA; "lavender" adds
    parallel projections, the sim Aligner (per layer, recomputed in backward as by default;
    "lavender-no-recompute": kept; "lavender-after": after aggregation) and the capture of `words`
    aligned words of `tokens` tokens each (the answer's last words x tokens rows; each token's map
    goes through the Aligner, §4.2's order). Frozen weights in `dtype`, trained ones in float32, as
    train.build sets them up. Returns a step function."""
    if not 1 <= words * tokens <= 32:
        raise ValueError(f"--words {words} x --tokens-per-word {tokens}: at most 32 rows "
                         f"(the answer has 33 tokens)")
    model, batch, rows = bench_model(tile, width, tiles, device, dtype, batch_size)
    # the answer's last positions
    rows = rows[:, rows.shape[1] - tokens * words:]  # (B, tokens * words)
    mode = "after" if arm == "lavender-after" else "per-layer"
    loss = "ar" if arm == "ar" else "lavender"
    args = train.build_parser().parse_args(["--loss", loss, "--aligner-mode", mode])
    model = train.apply_peft(model, args).train()
    labels = batch["input_ids"].clone()
    labels[:, :-33] = -100  # (B, 256)
    # the original image: 200 px on the 2x2 canvas of 112 px tiles
    side = tile if tiles == 1 else tile * 200 // 112
    sizes = torch.tensor([[side, side]] * batch_size)
    batch = {**batch, "labels": labels, "image_sizes": sizes}
    capture = None
    aligner = None
    layers = aggregate.aligned_layers(model)
    if arm != "ar":
        aggregate.add_parallel_projections(model, layers)
        channels = aligner_lib.aligner_channels("learn", 32)
        aligner = aligner_lib.Aligner("sim", channels).to(device)
        capture = aggregate.attention_capture(model, layers, learned=True)
    train.trainable_in_float32(model)
    row_word = (torch.arange(rows.shape[1]) // tokens).repeat(batch_size, 1)
    plan = dict(rows=rows, row_word=row_word, dm_index=torch.arange(words).repeat(batch_size, 1))
    modules = train.trainable_modules(model, aligner)
    trained = [p for p in modules.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5)
    dm_maps = [torch.rand(words, 32, 32) for _ in range(batch_size)]

    def step():
        inputs = data.model_inputs(batch, device)
        if capture is not None:
            capture.set_rows(rows.to(device))
        logits = model(**inputs).logits
        ce = train.vlm_loss_sum(logits, batch["labels"].to(device))
        att = None
        if capture is not None:
            step_batch = {**batch, **inputs}
            att = train.alignment_loss(args, capture, aligner, plan, dm_maps, step_batch, device,
                                       recompute=arm == "lavender")[0]
        loss = ce / (33 * batch_size) + (args.lam * att if att is not None else 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def aligner_alone_setup(words=16, layers=8, heads=32, device="cpu"):
    """The default arm's Aligner work alone, on random maps of its shapes: `layers` calls on
    (words, heads, 32, 32), each under checkpoint (forward, recompute, backward; input gradients
    on, as the parallel projections need them). Returns (step function, GFLOP of its convolutions
    per step)."""
    aligner = aligner_lib.Aligner("sim", heads).to(device)
    side = aligner_lib.MAP_SIZE
    maps = torch.rand(layers, words, heads, side, side, device=device, requires_grad=True)
    checkpoint = torch.utils.checkpoint.checkpoint

    def step():
        out = [checkpoint(aligner, x, use_reentrant=False) for x in maps.unbind(0)]
        torch.stack(out).mean().backward()
        maps.grad = None
        aligner.zero_grad(set_to_none=True)
    # per convolution: 2·N·h·w·C_out·C_in·k² FLOP forward; run twice (forward, recompute) + twice
    # in backward (gradients of input and weight)
    convs = [m for m in aligner.modules() if isinstance(m, nn.Conv2d)]
    per_pass = sum(2 * words * side ** 2 * m.out_channels * m.in_channels * m.weight[0, 0].numel()
                   for m in convs)
    flop = per_pass * layers * 4
    return step, flop / 1e9


def bench_train(reps=7, words=16, width=16, tokens=1):
    """Step time (one process, one thread, arms interleaved, median of reps; default allocator) and
    peak memory (a fresh process per arm, freed memory handed back: child_peak_rss)."""
    torch.set_num_threads(1)  # a second thread on a loaded 2-core machine mostly waits
    steps = {arm: step_setup(arm, words, width, tokens=tokens) for arm in STEP_ARMS}
    # one Aligner map per token
    steps["aligner-alone"], aligner_gflop = aligner_alone_setup(words * tokens)
    cpu = {arm: [] for arm in steps}
    wall = {arm: [] for arm in steps}
    for _ in data.progress_bar(range(reps + 1), desc="step time"):
        for arm, step in steps.items():
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            cpu[arm].append(time.process_time() - c0)
            wall[arm].append(time.perf_counter() - t0)
    # the first rep is a warm-up
    med = {arm: sorted(t[1:])[reps // 2] for arm, t in cpu.items()}
    med_wall = {arm: sorted(t[1:])[reps // 2] for arm, t in wall.items()}
    geometry = ["--words", str(words), "--width", str(width), "--tokens-per-word", str(tokens)]
    mem = {arm: child_peak_rss(["train", "--memory-arm", arm, *geometry]) for arm in STEP_ARMS}
    for arm, m in mem.items():
        peak_mib = m["peak_kb"] / 1024
        over_mib = (m["peak_kb"] - m["base_kb"]) / 1024
        print(f"{arm:21s} step {med[arm]:.3f} s CPU, {med_wall[arm]:.3f} s wall "
              f"(medians of {reps}); peak RSS {peak_mib:.0f} MiB, "
              f"{over_mib:.0f} MiB over the loaded model")
    peak = {arm: m["peak_kb"] for arm, m in mem.items()}
    label = f"{words} words of {tokens} token(s), 1/{width} width"
    print_step_ratios(med, peak, aligner_gflop, label, med_wall)


def bench_train_gpu(reps=7, words=16, width=1, tiles=1, tile=560, batch_size=1, device="cuda",
                    dtype="bfloat16", arms=(*STEP_ARMS, "aligner-alone")):
    """The same arms one at a time on a GPU (a full-size model per arm fills it; a GPU of its own
    needs no interleaving), each timed and measured by `measure`. With width=1, tile=560, tiles=1,
    bf16: Llama-3.2-11B-Vision's geometry, random weights. On a CPU device (a check of this code
    path only) the memory is the process's peak RSS. Returns (median seconds, peak GiB, the
    Aligner's GFLOP a step), each arm's by name."""
    cuda = torch.device(device).type == "cuda"
    geometry = dict(words=words, width=width, tiles=tiles, tile=tile, device=device,
                    dtype=getattr(torch, dtype), batch_size=batch_size)
    med, peak, aligner_gflop = {}, {}, None
    for arm in data.progress_bar(arms, desc="arms"):
        if arm == "aligner-alone":
            step, aligner_gflop = aligner_alone_setup(words * batch_size, device=device)
        else:
            step = step_setup(arm, **geometry)
        med[arm], peak[arm], _ = measure(step, "cuda" if cuda else "cpu", reps)
        del step
        # the capture's hooks and the model reference each other: free the arm's model now
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        print(f"{arm:21s} step {med[arm]:.4f} s (median of {reps}); peak {peak[arm]:.2f} GiB")
    return med, peak, aligner_gflop


def measure(fn, device, reps):
    """(median seconds of `reps` calls after a warm-up, peak GiB of one more call, GiB before it).
    cuda: synchronised wall clock, torch.cuda.max_memory_allocated; cpu (smoke): wall clock, peak
    RSS."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    if not cuda:
        m = peak_rss(fn, warm_up=False)
        return sorted(times)[reps // 2], m["peak_kb"] / 2 ** 20, m["base_kb"] / 2 ** 20
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30
    return sorted(times)[reps // 2], peak_gib, base / 2 ** 30


def print_step_ratios(med, peak, aligner_gflop, label, med_wall=None):
    """The train benchmark's summary (peak: each arm's peak memory, any unit); the last line
    carries the two ratios and their targets."""
    alone = med["aligner-alone"]
    print(f"aligner-alone         step {alone:.3f} s = {alone / med['ar']:.3f} of the ar step "
          f"({aligner_gflop:.1f} GFLOP of convolutions, {aligner_gflop / alone:.0f} GFLOP/s): "
          f"the default arm's Aligner work, a floor under its time ratio of 1 + that")

    def wall(arm):
        return f" (wall {med_wall[arm] / med_wall['ar']:.3f})" if med_wall else ""

    def ratio(arm):
        return (f"step time {med[arm] / med['ar']:.3f}{wall(arm)}, "
                f"peak memory {peak[arm] / peak['ar']:.3f}")
    print(f"lavender-after/ar: {ratio('lavender-after')}")
    print(f"lavender-no-recompute/ar: {ratio('lavender-no-recompute')}")
    print(f"ratios lavender/ar (default: per-layer Aligner, recomputed; {label}): "
          f"{ratio('lavender')}; targets <= 1.15, <= 1.10")


# ---- command line ----

def build_parser():
    p = argparse.ArgumentParser(description="Lavender's benchmarks (see the module docstring; "
                                            "results in BENCHMARKS.md).")
    sub = p.add_subparsers(dest="which", required=True)
    e = sub.add_parser("extract",
                       help="extract.py: SD capture overhead at SD-v1.4 geometry (a few minutes)")
    e.add_argument("--res", type=int, default=256, help="image size in pixels (latents are 1/8)")
    e.add_argument("--repeats", type=int, default=3,
                   help="passes over the steps; a call's time is its best pass")
    e.add_argument("--inversion-steps", type=int, default=5, help="DDIM inversion steps")
    e.add_argument("--denoise-steps", type=int, default=10, help="DDIM denoising steps")
    e.add_argument("--memory-arm", choices=EXTRACT_ARMS,
                   help="internal: one arm's peak memory in this process")
    n = sub.add_parser("null-text",
                       help="extract.py --inversion null-text: CPU s per image over ddim")
    n.add_argument("--res", type=int, default=64, help="image size in pixels (latents are 1/8)")
    n.add_argument("--repeats", type=int, default=2,
                   help="passes per arm; an arm's time is its best")
    a = sub.add_parser("aggregate", help="aggregate.py: VLM capture, forward time and peak memory")
    a.add_argument("--reps", type=int, default=7, help="timed forwards per arm (median reported)")
    a.add_argument("--memory-arm", choices=(*CAPTURE_ARMS, "every-layer"),
                   help="internal: one arm's peak memory")
    a.add_argument("--model", default="llama32", choices=("llama32", "idefics", "qwen2vl"),
                   help="the geometry at 1/16 width: Llama-3.2-11B-Vision (cross-attention), "
                        "IDEFICS-9B (gated cross-attention) or Qwen2-VL-7B (self-attention)")
    t = sub.add_parser("train", help="train.py: Lavender step vs autoregressive step, "
                                     "time and peak memory")
    t.add_argument("--reps", type=int, default=7, help="timed steps per arm (median reported)")
    t.add_argument("--words", type=int, default=16, help="aligned words per item")
    t.add_argument("--tokens-per-word", type=int, default=1, choices=(1, 2),
                   help="tokens of each aligned word "
                        "(Llama 3's 128k vocabulary keeps most words whole)")
    t.add_argument("--width", type=int, default=16, choices=(16, 8, 4),
                   help="the model is llama32 at 1/N width "
                        "(16: the benchmarks' geometry; 8, 4: wider, slower)")
    t.add_argument("--memory-arm", choices=STEP_ARMS,
                   help="internal: one arm's peak memory in this process")
    g = sub.add_parser("train-gpu", help="the train benchmark one arm at a time on a GPU, "
                                         "default Llama-3.2-11B's geometry")
    g.add_argument("--reps", type=int, default=7, help="timed steps per arm (median reported)")
    g.add_argument("--words", type=int, default=16, help="aligned one-token words per item")
    g.add_argument("--width", type=int, default=1, choices=(1, 2, 4, 8, 16),
                   help="llama32 at 1/N width (1: full size)")
    g.add_argument("--tiles", type=int, default=1, choices=(1, 4),
                   help="image tiles: 1 (1x1) or 4 (2x2)")
    g.add_argument("--tile", type=int, default=560, help="tile size in pixels (llama32: 560)")
    g.add_argument("--batch-size", type=int, default=1, help="samples per step")
    g.add_argument("--device", default="cuda",
                   help="cuda (or cpu, to check this code path on a small --width)")
    g.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="frozen weights' dtype")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.which == "train-gpu":
        med, peak, gflop = bench_train_gpu(args.reps, args.words, args.width, args.tiles,
                                           args.tile, args.batch_size, args.device, args.dtype)
        cuda = torch.device(args.device).type == "cuda"
        device = torch.cuda.get_device_name() if cuda else args.device
        label = (f"{args.words} words, batch {args.batch_size}, 1/{args.width} width, "
                 f"{args.tiles} tile(s) of {args.tile} px, {args.dtype}, {device}")
        return print_step_ratios(med, peak, gflop, label)
    if args.which == "extract" and args.memory_arm:
        return print(json.dumps(extract_memory(args.memory_arm, args.res)))
    if args.which == "extract":
        return bench_extract(args.res, args.inversion_steps, args.denoise_steps, args.repeats)
    if args.which == "null-text":
        return bench_null_text(args.res, repeats=args.repeats)
    if args.which == "aggregate" and args.memory_arm:
        torch.set_num_threads(2)
        projections = args.memory_arm == "learn"
        model, batch, rows = capture_setup(projections=projections, model=args.model)
        m = peak_rss(lambda: capture_forward(model, batch, rows, args.memory_arm))
        return print(json.dumps(m))
    if args.which == "aggregate":
        return bench_aggregate(args.reps, args.model)
    if args.memory_arm:
        torch.set_num_threads(1)
        step = step_setup(args.memory_arm, args.words, args.width, tokens=args.tokens_per_word)
        return print(json.dumps(peak_rss(step)))
    return bench_train(args.reps, args.words, args.width, args.tokens_per_word)


if __name__ == "__main__":
    main()
