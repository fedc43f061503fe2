"""Benchmarks: what Lavender's extra work costs, as ratios measured in one run (CPU, random weights).

Each benchmark times an arm that does the extra work against one that does not, on the same
process and the same inputs, arms interleaved, and prints the ratio as its last line. Time is the
process's CPU time (time.process_time) with one thread: on a machine shared with other jobs the
wall clock swings by 2x between identical steps, one thread's CPU time much less. Peak memory is
the peak resident set (VmHWM) of a fresh child process per arm. Results, with the machine they
came from: BENCHMARKS.md.

    OMP_NUM_THREADS=1 python bench.py extract   # extract.py: SD capture overhead, SD-v1.4 geometry, 256 px (target <= 1.15)
    python bench.py aggregate                   # aggregate.py: VLM capture, forward time and peak memory (<= 1.10 each)
    python bench.py train                       # train.py: Lavender step vs autoregressive step (<= 1.15, <= 1.10)
    python bench.py train --words 4 --width 8   #   fewer aligned words; a model twice as wide
    python bench.py train-gpu --batch-size 2    # one GPU: Llama-3.2-11B geometry (random bf16 weights, one 560 px tile)
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.utils.checkpoint
from tqdm import tqdm

import aggregate
import aligner as aligner_lib
import extract
import train


def peak_rss(step):
    """Run step() twice in this process; return the peak resident memory of the second run (kB) and
    the resident memory before it. The first run is a warm-up (allocator, lazy inits, AdamW state)."""
    step()
    status = lambda key: next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
    open("/proc/self/clear_refs", "w").write("5")  # Linux: reset the peak RSS to the current RSS
    base = status("VmRSS:")
    step()
    return {"base_kb": base, "peak_kb": status("VmHWM:")}


def child_peak_rss(args):
    """peak_rss of one arm in a fresh process: `python bench.py <args>` prints it as its last line.

    glibc keeps freed heap memory in the RSS, and how much depends on its history (the train arms'
    peaks moved by up to 4% between identical runs); a fixed 64 KiB mmap threshold hands every
    tensor's memory back on free, so the peak RSS tracks the live tensors (as a GPU's
    max_memory_allocated does) and repeats to within 0.5%."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], check=True, capture_output=True,
                         text=True, env=env).stdout
    return json.loads(out.splitlines()[-1])


# ---- extract.py: SD cross-attention capture at SD-v1.4 geometry ----

def bench_extract(res=256, inversion_steps=5, denoise_steps=10, repeats=3, columns=77):
    """Time inversion + denoising with capture vs the same UNet calls without; returns the ratio.

    Only UNet calls are timed (VAE and text encoder would only dilute the ratio). SD-v1.4's UNet
    geometry (320/640/1280/1280, 768-d context, 8 heads), random weights; columns=77 captures every
    context position (the worst case). Each step runs the UNet twice on the same input, plain and
    capturing, in alternating order (outputs are equal: see tests).
    """
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # sd14 geometry
    unet.eval().requires_grad_(False)
    inverse, forward = extract.ddim_grids(extract.sd_scheduler(), inversion_steps, denoise_steps)
    context = torch.randn(1, 77, 768)                                          # a CLIP text embedding's shape
    plain, n = dict(unet.attn_processors), inversion_steps + denoise_steps
    seconds = {False: [], True: []}                                            # per UNet call
    with torch.no_grad():
        unet(torch.randn(1, 4, res // 8, res // 8), 1, encoder_hidden_states=context)  # warm-up
        for r in range(repeats):
            latents = torch.randn(1, 4, res // 8, res // 8, generator=torch.Generator().manual_seed(0))  # (1, 4, 32, 32)
            store = extract.new_store(latents.shape[-2:], columns)
            for i, t in enumerate(torch.cat([inverse.timesteps, forward.timesteps])):
                for capture in ((False, True) if (r + i) % 2 == 0 else (True, False)):
                    processors = extract.capture_processors(plain, store) if capture else dict(plain)
                    unet.set_attn_processor(processors)  # (pops its argument)
                    t0 = time.process_time()
                    eps = unet(latents, t, encoder_hidden_states=context).sample
                    if capture and i == n - 1:
                        store["sum"] / store["count"]                          # the mean map: capture's cost too
                    seconds[capture].append(time.process_time() - t0)
                latents = (inverse if i < inversion_steps else forward).step(eps, t, latents).prev_sample
    # two estimates: total time, and per call the best of the repeats (what a call costs when no
    # other process interferes: timeit's rule); the last line is the second
    total = {c: sum(s) for c, s in seconds.items()}
    best = {c: sum(min(s[i::n]) for i in range(n)) for c, s in seconds.items()}
    print(f"bench: SD-v1.4 geometry UNet (random), {res} px ({res // 8}x{res // 8} latents), {inversion_steps} inversion "
          f"+ {denoise_steps} denoise steps, x{repeats}, {torch.get_num_threads()} threads")
    for capture, label in ((False, "without capture"), (True, "with capture   ")):
        print(f"{label}: {total[capture]:.2f} CPU s in all, best of {repeats} per call {best[capture]:.2f} CPU s "
              f"({best[capture] / n:.3f} per UNet call)")
    print(f"capture overhead ratio, total time: {total[True] / total[False]:.3f}")
    print(f"capture overhead ratio: {best[True] / best[False]:.3f}")
    return best[True] / best[False]


# ---- the VLM: llama32's proportions, scaled down ----

def bench_model(tile_size=112, width=16, tiles=4, device="cpu", dtype=torch.float32, batch_size=1):
    """llama32's proportions at 1/`width` width (default 1/16), random weights: the model and inputs of
    the aggregate and train benchmarks. width=1, tile_size=560, tiles=1, dtype=bfloat16 on a GPU is
    Llama-3.2-11B-Vision's own geometry with one 560 px tile (the model is built on `device`).

    Text: all 40 layers, cross-attention at 3, 8, ..., 38, 32 heads / 8 KV heads; at width 16 head
    dim 8 (hidden 256 = 4096 / 16, MLP 896 = 3.5x, vocab 8016 = 128256 / 16). Vision: 32 + 8 global
    layers of hidden 80 at width 16 (1280 / 16, 16 heads), 112 px tiles of 14 px patches (8x8 + CLS = 65 tokens;
    llama32: 560 px, 1601), 4 tiles. One image in the 2x2 layout (260 image tokens), 256 text
    tokens, 32 captured rows in all 8 cross-attention layers. A narrower model makes the capture
    relatively MORE expensive (its cost grows with heads x rows x image tokens x head dim, the
    model's with tokens x hidden²), so these ratios are conservative for the full size.
    """
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    if width not in (1, 2, 4, 8, 16):
        raise ValueError(f"bench_model width {width}: choose 1, 2, 4, 8 or 16 (llama32's widths divided by it)")
    if tiles not in (1, 4):
        raise ValueError(f"bench_model tiles {tiles}: choose 1 (the 1x1 layout) or 4 (2x2)")
    hidden, vision, vocab = 4096 // width, 1280 // width, 128256 // width  # width 16: 256, 80, 8016
    config = MllamaConfig(
        vision_config=dict(hidden_size=vision, num_hidden_layers=32, num_global_layers=8, attention_heads=16,
                           intermediate_size=4 * vision, vision_output_dim=vision * 6, image_size=tile_size,
                           patch_size=14, max_num_tiles=4, intermediate_layers_indices=[3, 7, 15, 23, 30]),
        text_config=dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=40, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=hidden * 7 // 2,
                         cross_attention_layers=list(range(3, 40, 5)),
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=vocab - 16)
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: 11B parameters are not initialised on a CPU
        model = MllamaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    T, R, B = 256, 32, batch_size
    input_ids = torch.randint(3, vocab - 17, (1, T)).repeat(B, 1)  # (B, T): the same sample B times
    input_ids[:, 1] = vocab - 16  # the image token
    cross_mask = torch.zeros(B, T, 1, 4, dtype=torch.long)
    cross_mask[:, 1:, :, :tiles] = 1  # text after the image attends to its tiles
    tile_mask = torch.zeros(B, 1, 4, dtype=torch.long)
    tile_mask[..., :tiles] = 1
    batch = dict(input_ids=input_ids, attention_mask=torch.ones(B, T, dtype=torch.long),
                 pixel_values=torch.randn(1, 1, 4, 3, tile_size, tile_size).repeat(B, 1, 1, 1, 1, 1),
                 aspect_ratio_ids=torch.full((B, 1), 6 if tiles == 4 else 1),  # Mllama's ids: 6 = 2x2, 1 = 1x1
                 aspect_ratio_mask=tile_mask, cross_attention_mask=cross_mask)
    rows = torch.arange(T - R - 1, T - 1)[None].repeat(B, 1)  # (B, R): the last R positions, as an answer's would be
    return model, batch, rows


# ---- aggregate.py: VLM attention capture, one forward ----

CAPTURE_ARMS = ("plain", "capture", "learn")


def capture_forward(model, batch, rows, arm):
    """One forward with autograd on (as in training), returning a scalar built from what the arm made."""
    if arm == "plain":
        return model(**batch).logits.float().mean()
    with aggregate.AttentionCapture(model, aggregate.aligned_layers(model), learned=arm == "learn") as capture:
        capture.set_rows(rows)
        logits = model(**batch).logits
        return logits.float().mean() + capture.probs.mean()


def capture_setup(projections=True):
    """The benchmark's model, with parallel projections (unused by the other arms) when asked."""
    model, batch, rows = bench_model()
    if projections:
        aggregate.add_parallel_projections(model, aggregate.aligned_layers(model))
    return model, batch, rows


def bench_aggregate(reps=7):
    """Capture overhead: forward time (median of reps) and peak memory. Ratios are capture / plain."""
    torch.set_num_threads(1)
    model, batch, rows = capture_setup()
    times = {arm: [] for arm in CAPTURE_ARMS}
    for _ in tqdm(range(reps + 1), desc="forward time"):
        for arm in CAPTURE_ARMS:
            t0 = time.process_time()
            capture_forward(model, batch, rows, arm)
            times[arm].append(time.process_time() - t0)
    med = {arm: sorted(v[1:])[len(v[1:]) // 2] for arm, v in times.items()}  # first rep is warm-up
    best = {arm: min(v[1:]) for arm, v in times.items()}  # minima: robust to other jobs' load
    mem = {arm: child_peak_rss(["aggregate", "--memory-arm", arm]) for arm in tqdm(CAPTURE_ARMS, desc="peak memory")}
    for arm in CAPTURE_ARMS:
        m = mem[arm]
        print(f"{arm:8s} forward {med[arm]:.3f} s CPU (median of {reps}, min {best[arm]:.3f}); peak RSS {m['peak_kb'] / 1024:.0f} MiB, "
              f"forward's increment over the loaded model {(m['peak_kb'] - m['base_kb']) / 1024:.0f} MiB")
    inc = {arm: mem[arm]["peak_kb"] - mem[arm]["base_kb"] for arm in CAPTURE_ARMS}
    print("ratios (capture/plain, learn/plain): time median {:.3f} {:.3f}, min {:.3f} {:.3f}; peak memory {:.3f} "
          "{:.3f}; forward's memory increment {:.3f} {:.3f}".format(
              med["capture"] / med["plain"], med["learn"] / med["plain"], best["capture"] / best["plain"],
              best["learn"] / best["plain"],
              mem["capture"]["peak_kb"] / mem["plain"]["peak_kb"], mem["learn"]["peak_kb"] / mem["plain"]["peak_kb"],
              inc["capture"] / inc["plain"], inc["learn"] / inc["plain"]))


# ---- train.py: a Lavender step vs an autoregressive step ----

STEP_ARMS = ("ar", "lavender", "lavender-no-recompute", "lavender-after")


def step_setup(arm, words=16, width=16, tiles=4, tile=112, device="cpu", dtype=torch.float32, batch_size=1):
    """One optimizer step at bench_model()'s geometry (llama32's 40 text layers, cross-attention at
    3, 8, ..., 38, 32/8 heads, at 1/`width` width, 16 being the issue's; one image of `tiles` tiles;
    256 text tokens, the last 33 the answer; `batch_size` samples) with LoRA; "lavender" adds
    parallel projections, the sim Aligner (per layer, recomputed in backward as by default;
    "lavender-no-recompute": kept; "lavender-after": after aggregation) and the capture of `words`
    two-token words (the last 2 x words rows, at most 16). Frozen weights in `dtype`, trained ones
    in float32, as train.build sets them up. Returns a step function."""
    if not 1 <= words <= 16:
        raise ValueError(f"--words {words}: choose 1 to 16 (the answer has 33 tokens)")
    model, batch, rows = bench_model(tile, width, tiles, device, dtype, batch_size)
    rows = rows[:, rows.shape[1] - 2 * words:]  # (B, 2 * words): the answer's last positions
    mode = "after" if arm == "lavender-after" else "per-layer"
    args = train.build_parser().parse_args(["--loss", "ar" if arm == "ar" else "lavender", "--aligner-mode", mode])
    model = train.apply_peft(model, args).train()
    labels = batch["input_ids"].clone()
    labels[:, :-33] = -100  # (B, 256)
    side = tile if tiles == 1 else tile * 200 // 112  # the original image: 200 px on the 2x2 canvas of 112 px tiles
    batch = {**batch, "labels": labels, "image_sizes": torch.tensor([[side, side]] * batch_size)}
    capture, aligner, layers = None, None, aggregate.aligned_layers(model)
    if arm != "ar":
        aggregate.add_parallel_projections(model, layers)
        aligner = aligner_lib.Aligner("sim", aligner_lib.aligner_channels("learn", 32)).to(device)
        capture = aggregate.AttentionCapture(model, layers, learned=True)
    train.trainable_in_float32(model)
    row_word = (torch.arange(rows.shape[1]) // 2).repeat(batch_size, 1)
    plan = dict(rows=rows, row_word=row_word, dm_index=torch.arange(words).repeat(batch_size, 1))
    modules = train.trainable_modules(model, aligner)
    optimizer = torch.optim.AdamW([p for p in modules.parameters() if p.requires_grad], lr=1e-5)
    dm_maps = [torch.rand(words, 32, 32) for _ in range(batch_size)]

    def step():
        inputs = train.model_inputs(batch, device)
        if capture is not None:
            capture.set_rows(rows.to(device))
        ce = train.vlm_loss_sum(model(**inputs).logits, batch["labels"].to(device))
        att = None if capture is None else train.alignment_loss(
            args, capture, aligner, plan, dm_maps, {**batch, **inputs}, device, recompute=arm == "lavender")[0]
        (ce / (33 * batch_size) + (args.lam * att if att is not None else 0)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def aligner_alone_setup(words=16, layers=8, heads=32, device="cpu"):
    """The default arm's Aligner work alone, on random maps of its shapes: `layers` calls on (words,
    heads, 32, 32), each under checkpoint (forward, recompute, backward; input gradients on, as the
    parallel projections need them). Returns (step function, GFLOP of its convolutions per step)."""
    aligner = aligner_lib.Aligner("sim", heads).to(device)
    maps = torch.rand(layers, words, heads, aligner_lib.MAP_SIZE, aligner_lib.MAP_SIZE, device=device, requires_grad=True)

    def step():
        out = [torch.utils.checkpoint.checkpoint(aligner, x, use_reentrant=False) for x in maps.unbind(0)]
        torch.stack(out).mean().backward()
        maps.grad = None
        aligner.zero_grad(set_to_none=True)
    # per convolution: 2·N·h·w·C_out·C_in·k² FLOP forward; run twice (forward, recompute) + twice in
    # backward (gradients of input and weight)
    convs = [m for m in aligner.modules() if isinstance(m, nn.Conv2d)]
    flop = sum(2 * words * aligner_lib.MAP_SIZE ** 2 * m.out_channels * m.in_channels * m.weight[0, 0].numel()
               for m in convs) * layers * 4
    return step, flop / 1e9


def bench_train(reps=7, words=16, width=16):
    """Step time (one process, one thread, arms interleaved, median of reps; default allocator) and
    peak memory (a fresh process per arm, freed memory handed back: child_peak_rss)."""
    torch.set_num_threads(1)  # a second thread on a loaded 2-core machine mostly waits
    steps = {arm: step_setup(arm, words, width) for arm in STEP_ARMS}
    steps["aligner-alone"], aligner_gflop = aligner_alone_setup(words)
    cpu, wall = {arm: [] for arm in steps}, {arm: [] for arm in steps}
    for _ in tqdm(range(reps + 1), desc="step time"):
        for arm, step in steps.items():
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            cpu[arm].append(time.process_time() - c0)
            wall[arm].append(time.perf_counter() - t0)
    med = {arm: sorted(t[1:])[reps // 2] for arm, t in cpu.items()}  # the first rep is a warm-up
    med_wall = {arm: sorted(t[1:])[reps // 2] for arm, t in wall.items()}
    mem = {arm: child_peak_rss(["train", "--memory-arm", arm, "--words", str(words), "--width", str(width)])
           for arm in STEP_ARMS}
    for arm, m in mem.items():
        print(f"{arm:21s} step {med[arm]:.3f} s CPU, {med_wall[arm]:.3f} s wall (medians of {reps}); peak RSS "
              f"{m['peak_kb'] / 1024:.0f} MiB, {(m['peak_kb'] - m['base_kb']) / 1024:.0f} MiB over the loaded model")
    print_step_ratios(med, {arm: m["peak_kb"] for arm, m in mem.items()}, aligner_gflop,
                      f"{words} words, 1/{width} width", med_wall)


def bench_train_gpu(reps=7, words=16, width=1, tiles=1, tile=560, batch_size=1, device="cuda", dtype="bfloat16"):
    """The same arms one at a time on a GPU (a full-size model per arm fills it; a GPU of its own
    needs no interleaving): build, one warm-up step, `reps` timed steps (synchronised wall clock,
    median), then the peak of torch.cuda.max_memory_allocated over one more step. With width=1,
    tile=560, tiles=1, bf16: Llama-3.2-11B-Vision's geometry, random weights. On a CPU device
    (a check of this code path only) the memory is the process's peak RSS."""
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    geometry = dict(words=words, width=width, tiles=tiles, tile=tile, device=device, dtype=getattr(torch, dtype),
                    batch_size=batch_size)
    med, peak = {}, {}
    for arm in tqdm((*STEP_ARMS, "aligner-alone"), desc="arms"):
        if arm == "aligner-alone":
            step, aligner_gflop = aligner_alone_setup(words * batch_size, device=device)
        else:
            step = step_setup(arm, **geometry)
        step()  # warm-up
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        med[arm] = sorted(times)[reps // 2]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            step()
            sync()
            peak[arm] = torch.cuda.max_memory_allocated() / 1024  # kB, as peak RSS is
        else:
            peak[arm] = peak_rss(step)["peak_kb"]
        del step
        gc.collect()  # the capture's hooks and the model reference each other: free the arm's model now
        if cuda:
            torch.cuda.empty_cache()
        print(f"{arm:21s} step {med[arm]:.4f} s (median of {reps}); peak {peak[arm] / 2 ** 20:.2f} GiB")
    print_step_ratios(med, peak, aligner_gflop, f"{words} words, batch {batch_size}, 1/{width} width, {tiles} tile(s) "
                      f"of {tile} px, {dtype}, {torch.cuda.get_device_name() if cuda else device}")


def print_step_ratios(med, peak_kb, aligner_gflop, label, med_wall=None):
    """The train benchmark's summary; the last line carries the issue's two ratios."""
    print(f"aligner-alone         step {med['aligner-alone']:.3f} s = {med['aligner-alone'] / med['ar']:.3f} of the "
          f"ar step ({aligner_gflop:.1f} GFLOP of convolutions, {aligner_gflop / med['aligner-alone']:.0f} GFLOP/s): "
          f"the default arm's Aligner work, a floor under its time ratio of 1 + that")
    wall = lambda arm: f" (wall {med_wall[arm] / med_wall['ar']:.3f})" if med_wall else ""  # noqa: E731
    ratio = lambda arm: (f"step time {med[arm] / med['ar']:.3f}{wall(arm)}, "  # noqa: E731
                         f"peak memory {peak_kb[arm] / peak_kb['ar']:.3f}")
    print(f"lavender-after/ar: {ratio('lavender-after')}")
    print(f"lavender-no-recompute/ar: {ratio('lavender-no-recompute')}")
    print(f"ratios lavender/ar (default: per-layer Aligner, recomputed; {label}): {ratio('lavender')}; "
          f"targets <= 1.15, <= 1.10")


# ---- command line ----

def main(argv=None):
    p = argparse.ArgumentParser(description="Lavender's benchmarks (see the module docstring; results in BENCHMARKS.md).")
    sub = p.add_subparsers(dest="which", required=True)
    e = sub.add_parser("extract", help="extract.py: SD capture overhead at SD-v1.4 geometry (a few minutes)")
    e.add_argument("--res", type=int, default=256, help="image size in pixels (latents are 1/8)")
    e.add_argument("--repeats", type=int, default=3, help="passes over the steps; a call's time is its best pass")
    e.add_argument("--inversion-steps", type=int, default=5, help="DDIM inversion steps")
    e.add_argument("--denoise-steps", type=int, default=10, help="DDIM denoising steps")
    a = sub.add_parser("aggregate", help="aggregate.py: VLM capture, forward time and peak memory")
    a.add_argument("--reps", type=int, default=7, help="timed forwards per arm (median reported)")
    a.add_argument("--memory-arm", choices=CAPTURE_ARMS, help="internal: one arm's peak memory in this process")
    t = sub.add_parser("train", help="train.py: Lavender step vs autoregressive step, time and peak memory")
    t.add_argument("--reps", type=int, default=7, help="timed steps per arm (median reported)")
    t.add_argument("--words", type=int, default=16, help="aligned two-token words per item (1-16)")
    t.add_argument("--width", type=int, default=16, choices=(16, 8, 4),
                   help="the model is llama32 at 1/N width (16: the issue's geometry; 8, 4: wider, slower)")
    t.add_argument("--memory-arm", choices=STEP_ARMS, help="internal: one arm's peak memory in this process")
    g = sub.add_parser("train-gpu", help="the train benchmark one arm at a time on a GPU, default Llama-3.2-11B's geometry")
    g.add_argument("--reps", type=int, default=7, help="timed steps per arm (median reported)")
    g.add_argument("--words", type=int, default=16, help="aligned two-token words per item (1-16)")
    g.add_argument("--width", type=int, default=1, choices=(1, 2, 4, 8, 16), help="llama32 at 1/N width (1: full size)")
    g.add_argument("--tiles", type=int, default=1, choices=(1, 4), help="image tiles: 1 (1x1) or 4 (2x2)")
    g.add_argument("--tile", type=int, default=560, help="tile size in pixels (llama32: 560)")
    g.add_argument("--batch-size", type=int, default=1, help="samples per step")
    g.add_argument("--device", default="cuda", help="cuda (or cpu, to check this code path on a small --width)")
    g.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="frozen weights' dtype")
    args = p.parse_args(argv)
    if args.which == "train-gpu":
        return bench_train_gpu(args.reps, args.words, args.width, args.tiles, args.tile, args.batch_size, args.device,
                               args.dtype)
    if args.which == "extract":
        return bench_extract(args.res, args.inversion_steps, args.denoise_steps, args.repeats)
    if args.which == "aggregate" and args.memory_arm:
        torch.set_num_threads(2)
        model, batch, rows = capture_setup(projections=args.memory_arm == "learn")
        return print(json.dumps(peak_rss(lambda: capture_forward(model, batch, rows, args.memory_arm))))
    if args.which == "aggregate":
        return bench_aggregate(args.reps)
    if args.memory_arm:
        torch.set_num_threads(1)
        return print(json.dumps(peak_rss(step_setup(args.memory_arm, args.words, args.width))))
    return bench_train(args.reps, args.words, args.width)


if __name__ == "__main__":
    main()
