"""(not in the paper) One lent GPU, one command: every figure a CPU cannot give, in one table
(BENCHMARKS.md).

A lent GPU is there for minutes. Each part runs in a process of its own under its own timeout, so
a part that fails or hangs costs only its own minutes and its row says why; the rest go on. The
table is printed and written to --out. --smoke runs the very same parts at tiny sizes on the CPU
(the test suite does), so the command is known to work before a GPU is ever lent. The parts:
extraction seconds per image at 512 px (ours, plain SDPA, Prompt-to-Prompt's store), the Lavender
vs AR train step and the VLM capture at Llama-3.2-11B geometry (bench.py's arms), the capture at
IDEFICS-9B geometry (the Flamingo-style family) and at Qwen2-VL-7B geometry (self-attention),
train.py under torchrun with FSDP2 on NCCL, and train.py's own loop (DataLoader workers, forward,
backward, AdamW) for 20 steps at 11B geometry, 1 and 4 tiles, AR and Lavender, activation
checkpointing off and on: step time, data wait, peak memory.

    # first, on any CPU: the same parts at tiny sizes (about 3 minutes)
    python bench_gpu.py --smoke
    # on one GPU: at most 20 minutes (its parts' timeouts)
    python bench_gpu.py --out bench_gpu.md
    # some parts only
    python bench_gpu.py --parts train,fsdp
    # train.py's loop alone: at most 10 minutes
    python bench_gpu.py --parts loop-1tile,loop-4tiles

Not a part (it needs SD v1.4's weights and ImageNet-Segmentation's gtsegs_ijcv.mat on the machine;
nothing here downloads them): the map-quality figure of BENCHMARKS.md, "Map quality",

    python segment.py imagenet --mat gtsegs_ijcv.mat --out imagenet_seg/ --class-names names.json
    python extract.py --dm sd14 --data imagenet_seg/data.jsonl --out attn_seg/ --batch-size 8
    python segment.py score --data imagenet_seg/data.jsonl --attn attn_seg/
"""
import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import data
import extract
import flamingo
import mllama
import models
import qwen
import teachers
from bench import bench_model, bench_train_gpu, capture_forward, measure
from bench_extract import EXTRACT_ARMS, arm_processors, finish

# each part's time limit in seconds on a GPU; --smoke gives SMOKE_TIME_FACTOR times as long (bf16
# on a CPU is slow, and CI's cores may be shared)
SMOKE_TIME_FACTOR = 2
GPU_PARTS = {"extract-b1": 60, "extract-b8": 75, "train": 150, "aggregate": 90,
             "aggregate-idefics": 90, "aggregate-qwen": 90, "fsdp": 75,
             "loop-1tile": 270, "loop-4tiles": 300}


def row(part, arm, seconds, unit, peak_gib, ratio="", note=""):
    """One row of the table: its cells as text."""
    time_cell = f"{seconds:.4g} {unit}"
    memory_cell = f"{peak_gib:.2f} GiB"
    return dict(part=part, arm=arm, time=time_cell, memory=memory_cell, ratio=ratio, note=note)


# ---- extraction (extract.py against its peers) ----

def sd14_parts(device, dtype):
    """An extract.py dm dict at SD-v1.4's geometry (models.SD_SIZES["sd14"]), random weights: UNet,
    VAE, CLIP ViT-L/14 text encoder; tiny-sd's tokenizer (its ids fit CLIP's vocabulary; the tokens
    do not matter to the timing)."""
    tokenizer = teachers.tiny_sd_tokenizer()
    dm = models.stable_diffusion("sd14", tokenizer, device=device, dtype=dtype)
    for part in ("vae", "unet", "text_encoder"):
        dm[part].eval().requires_grad_(False)
    return dm


@torch.no_grad()
def extraction(dm, images, texts, arm, steps):
    """One batch through an arm: VAE and text encoder, inversion + denoising, the arm's mean maps.
    ours is extract.dm_attention itself, capturing every step, layer and column (its worst case,
    as Prompt-to-Prompt's store sees every step); the other arms repeat its encoding and swap the
    processors."""
    if arm == "ours":
        return extract.dm_attention(dm, images, texts, 77, *steps,
                                    capture_steps="all", layers=None)
    unet = dm["unet"]
    latents = teachers.encode_image(dm, images.to(unet.device, unet.dtype))
    context, _ = teachers.encode_text(dm, texts)                             # (B, 77, 768)
    plain = dict(unet.attn_processors)
    processors, store = arm_processors(arm, plain, latents.shape[-2:])
    unet.set_attn_processor(processors)
    try:
        grids = extract.ddim_grids(dm["scheduler"], *steps)
        extract.invert_and_denoise(unet, latents, context, *grids)
    finally:
        unet.set_attn_processor(plain)
    return finish(arm, store)


def part_extract(batch, smoke):
    """Extraction seconds per image, 512 px, SD-v1.4 geometry in fp16, 5 + 10 steps (the paper's
    setting, §5): plain, ours, P2P."""
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.float16)
    # tiny-sd: 32 px, 16x16 latents
    dm = models.tiny_sd() if smoke else sd14_parts(device, dtype)
    res, steps, batch = (32, (1, 2), min(batch, 2)) if smoke else (512, (5, 10), batch)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, res, res, generator=generator) * 2 - 1
    texts = ["a red circle left of a blue square"] * batch
    part = f"extract {res} px, {steps[0]} + {steps[1]} steps, batch {batch}"
    out = {}
    reps = 1 if smoke else 3
    for arm in EXTRACT_ARMS:
        out[arm] = measure(lambda: extraction(dm, images, texts, arm, steps), device, reps)
    about = {"plain": "plain: SDPA everywhere, no capture",
             "ours": "ours: attn2 rows captured, SDPA in attn1",
             "p2p": "Prompt-to-Prompt: every layer explicit, AttentionStore"}
    ratio = {"ours": f"{out['ours'][0] / out['plain'][0]:.3f} of plain",
             "p2p": f"{out['p2p'][0] / out['ours'][0]:.3f} of ours"}
    note = {"ours": "paper: 20 s per image on a V100",
            "p2p": f"memory {out['p2p'][1] / out['ours'][1]:.3f} of ours"}
    return [row(part, about[arm], out[arm][0] / batch, "s/image", out[arm][1],
                ratio.get(arm, ""), note.get(arm, ""))
            for arm in EXTRACT_ARMS]


# ---- the train step and the VLM capture at full geometry ----

def part_train(smoke):
    """The Lavender vs AR step at Llama-3.2-11B geometry (random bf16 weights, one 560 px tile,
    16 words)."""
    if smoke:
        geometry = dict(width=16, tile=56, device="cpu")
    else:
        geometry = dict(width=1, tile=560, device="cuda")
    words = 2 if smoke else 16
    reps = 1 if smoke else 5
    med, peak, _ = bench_train_gpu(reps=reps, words=words, tiles=1, batch_size=1,
                                   dtype="bfloat16", arms=("ar", "lavender"), **geometry)
    part = (f"train step, llama32 at 1/{geometry['width']} width, {geometry['tile']} px tile, "
            f"batch 1, {words} words")
    lavender = "lavender (learn, sim Aligner per layer, recomputed)"
    ratio = f"{med['lavender'] / med['ar']:.3f} of ar"
    note = f"memory {peak['lavender'] / peak['ar']:.3f} of ar"
    return [row(part, "ar", med["ar"], "s/step", peak["ar"]),
            row(part, lavender, med["lavender"], "s/step", peak["lavender"], ratio, note)]


def part_aggregate(smoke, name="llama32"):
    """One forward (autograd on) at Llama-3.2-11B's geometry (one 560 px tile), IDEFICS-9B's
    (flamingo.bench_model: resampler, 8 gated cross-attention layers) or Qwen2-VL-7B's (one
    448 px image, 256 image tokens; 7 of its 28 layers aligned), random bf16 weights: plain, our
    capture, the release's eager attention (not for IDEFICS: its output_attentions omits its
    cross-attention)."""
    device, width = ("cpu", 16) if smoke else ("cuda", 1)
    builders = {
        "llama32": lambda: bench_model(56 if smoke else 560, width, 1, device, torch.bfloat16),
        "idefics": lambda: flamingo.bench_model(width, device, torch.bfloat16),
        "qwen2vl": lambda: qwen.bench_model(width, 112 if smoke else 448, device, torch.bfloat16)}
    model, batch, rows = builders[name]()
    batch = {k: v.to(device) for k, v in batch.items()}
    arms = ("plain", "capture") if name == "idefics" else ("plain", "capture", "eager")
    reps = 1 if smoke else 3
    out = {arm: measure(lambda: capture_forward(model, batch, rows, arm), device, reps)
           for arm in arms}
    image = {"llama32": "one tile", "idefics": "one 224 px image"}.get(name, "one image")
    part = f"VLM forward, {name} at 1/{width} width, {image}, 32 rows"
    # the forward's increment: each arm's peak less the memory before it
    inc = {arm: out[arm][1] - out[arm][2] for arm in out}
    note = lambda arm: f"forward's increment {inc[arm]:.2f} GiB"  # noqa: E731
    plain_row = row(part, "plain (SDPA, no capture)", out["plain"][0], "s", out["plain"][1],
                    "", note("plain"))
    capture_ratio = f"{out['capture'][0] / out['plain'][0]:.3f} of plain"
    capture_row = row(part, "ours: capture hooks (aggregate.attention_capture)",
                      out["capture"][0], "s", out["capture"][1], capture_ratio, note("capture"))
    rows_ = [plain_row, capture_row]
    if "eager" in out:
        eager_ratio = f"{out['eager'][0] / out['capture'][0]:.3f} of ours"
        eager_note = note("eager") + f", {inc['eager'] / inc['capture']:.2f}x ours"
        rows_.append(row(part, "the release: eager + output_attentions", out["eager"][0], "s",
                         out["eager"][1], eager_ratio, eager_note))
    return rows_


def write_items(root, n=8, sizes=((56, 56), (112, 50), (50, 112), (100, 100))):
    """n items with images of the (width, height) sizes in turn (by default four tile layouts),
    data.jsonl, and attention maps for every answer word."""
    from PIL import Image
    root = Path(root)
    rng = torch.Generator().manual_seed(0)
    answers = ["a red circle left of a blue square", "two", "a circle", "yes"]
    with open(root / "data.jsonl", "w") as f:
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=rng).numpy()
            Image.fromarray(pixels).save(root / f"{i}.png")
            answer = answers[i % len(answers)]
            record = dict(id=f"item{i}", image=f"{i}.png", question="what is there?", answer=answer)
            f.write(json.dumps(record) + "\n")
            words = list(dict.fromkeys(answer.split()))
            maps = torch.rand(len(words), 32, 32, generator=rng)
            data.save_maps(root / "attn" / f"item{i}.safetensors", maps, words, {"text": answer})
    return root / "data.jsonl"


# ---- train.py's own loop at Llama-3.2-11B geometry ----

# (--loss, --activation-checkpointing, --num-workers or None for the part's default)
LOOP_ARMS = (("ar", False, None),
             ("lavender", False, None),
             ("ar", True, None),
             ("lavender", True, None),
             ("lavender", False, 0))


def random_llama32(smoke, device):
    """A stand-in for models.load_vlm: Llama-3.2-11B-Vision's geometry (mllama.llama32_size; smoke:
    the tiny preset's), random weights built on `device` in the dtype train.build asks for, and a
    processor of its tiles (560 px, up to 4) with the tiny BPE; the 11B model keeps its 128,256-row
    vocabulary, of which the BPE uses the first few hundred."""
    size = mllama.MLLAMA_SIZES["tiny"] if smoke else mllama.llama32_size(1, 560)
    tokenizer = models.bpe_tokenizer()
    token_ids = models.tokenizer_ids(tokenizer, **mllama.MLLAMA_TOKENS)
    vocab = {} if smoke else {"vocab_size": 128256}
    ids = {**token_ids, **vocab}
    processor = mllama.mllama_processor(tokenizer, size, models.CHAT_TEMPLATE)

    def load_vlm(name, path=None, dtype=torch.float32):
        return mllama.mllama(size, ids, 0, device, dtype), processor
    return load_vlm


def loop_arm(tmp, items, loss, checkpointing, workers, steps, batch):
    """One train.train run (one process, no torchrun) of `steps` steps; returns (its log rows, its
    peak memory in GiB: max_memory_allocated on a GPU, the process's peak RSS on a CPU)."""
    import resource
    import train
    out = Path(tmp) / f"{loss}-{checkpointing}-{workers}"
    argv = ["--model", "llama32", "--data", str(items), "--out", str(out), "--loss", loss,
            "--max-steps", str(steps), "--batch-size", str(batch), "--num-workers", str(workers),
            "--align-words", "label", "--save-every", "0", "--no-progress",
            *(["--activation-checkpointing"] if checkpointing else [])]
    args = train.build_parser().parse_args(argv)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train.train(args)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
        # the capture's hooks and the model reference each other: free this arm's model now
        gc.collect()
        torch.cuda.empty_cache()
    else:
        # kB -> GiB, the process so far
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # at 11B a Lavender run writes about 3 GB (projections, AdamW state)
    shutil.rmtree(out)
    return log, peak


def median_after_warmup(log, key):
    """The median of the log rows' `key` over the steps after the first two (warm-up)."""
    values = sorted(r[key] for r in log[2:])
    return values[(len(log) - 2) // 2]


def part_loop(smoke, tiles):
    """train.py's loop itself (train.train: DataLoader, forward, backward, AdamW, log) for 20 steps
    (smoke: 4, tiny size) on one GPU at Llama-3.2-11B geometry with random bf16 weights, on
    synthetic 560 px images of 1 or 4 tiles (560 or 1120 px squares), batch 4: each arm of
    LOOP_ARMS. Step time and data wait: medians over the steps after the first two (warm-up)."""
    import tempfile
    # random weights instead of a download, in this process only
    models.load_vlm = random_llama32(smoke, "cpu" if smoke else "cuda")
    side = (56 if smoke else 560) * (2 if tiles == 4 else 1)
    steps, batch, workers = (4, 2, 2) if smoke else (20, 4, 4)
    preset = " (tiny preset size)" if smoke else ""
    tile_px = side // (2 if tiles == 4 else 1)
    part = (f"train.py loop, llama32{preset}, {tiles} tile(s) of {tile_px} px, batch {batch}, "
            f"{steps} steps")
    rows = []
    step_of = {}
    with tempfile.TemporaryDirectory() as tmp:
        items = write_items(tmp, n=4 * batch, sizes=[(side, side)])
        for loss, checkpointing, arm_workers in LOOP_ARMS:
            arm_workers = workers if arm_workers is None else arm_workers
            log, peak = loop_arm(tmp, items, loss, checkpointing, arm_workers, steps, batch)
            seconds = median_after_warmup(log, "seconds")
            data_wait = median_after_warmup(log, "data_seconds")
            step_of[loss, checkpointing, arm_workers] = (seconds, peak)
            # lavender against ar in the same loop
            ar = step_of.get(("ar", checkpointing, arm_workers))
            ratio = ""
            note = f"data wait {data_wait:.4f} s/step; first step {log[0]['seconds']:.2f} s"
            if loss == "lavender" and ar:
                ratio = f"{seconds / ar[0]:.3f} of ar"
                aligned = log[-1]["aligned_words"]
                note += f"; memory {peak / ar[1]:.3f} of ar; {aligned} words aligned"
            elif arm_workers != workers:
                # the arm without workers against the one with
                with_workers = step_of[loss, checkpointing, workers][0]
                ratio = f"{seconds / with_workers:.3f} of {workers} workers'"
            on_off = "on" if checkpointing else "off"
            arm = f"{loss}, checkpointing {on_off}, {arm_workers} workers"
            rows.append(row(part, arm, seconds, "s/step", peak, ratio, note))
    return rows


# ---- torchrun and FSDP2 ----

def part_fsdp(smoke):
    """torchrun --nproc_per_node 1 train.py --model tiny: NCCL (gloo on a CPU) and FSDP2, Lavender
    loss."""
    import resource
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        items = write_items(tmp)
        run = Path(tmp) / "run"
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
        max_steps = "2" if smoke else "5"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "1", script, "--model", "tiny", "--data", str(items),
               "--out", str(run), "--max-steps", max_steps, "--batch-size", "2", "--no-progress"]
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            output = (done.stderr or done.stdout).strip()
            raise RuntimeError(f"torchrun exited {done.returncode}: {output[-400:]}")
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        saved = sorted(p.name for p in run.iterdir())
    # kB -> GiB: the largest process
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    # as distributed.setup_distributed picks
    backend = "nccl" if torch.cuda.is_available() and not smoke else "gloo"
    steps = sorted(entry["seconds"] for entry in log)
    median = steps[len(steps) // 2]
    base = row("torchrun, 1 rank, FSDP2, tiny preset, lavender", f"{backend}", median,
               "s/step", rss)
    wrote = ", ".join(saved)
    note = (f"{len(log)} steps, loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}, "
            f"{log[-1]['aligned_words']} words aligned, {wall:.0f} s in all; wrote {wrote}")
    return [dict(base, memory=f"{rss:.2f} GiB host RSS", note=note)]


# ---- the parts, one process each, and the table ----

def run_part(name, smoke, timeout):
    """One part in a fresh process (its own session: a timeout kills it and what it started)."""
    smoke_flag = ["--smoke"] if smoke else []
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name] + smoke_flag
    # on the CPU, freed tensors go back to the system at once (mmap): RSS tracks live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if smoke else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        note = f"no result within {timeout} s (GPU_PARTS in bench_gpu.py)"
        return [dict(part=name, arm="TIMEOUT", note=note)]
    if proc.returncode != 0:
        lines = [line for line in err.splitlines() if line.strip()] or ["(no output)"]
        return [dict(part=name, arm="FAILED", note=f"exit {proc.returncode}: {lines[-1][-300:]}")]
    return json.loads(out.splitlines()[-1])


def device_description(smoke):
    """The table's device: the CPU's model name under --smoke, else the GPU's name and CUDA."""
    if smoke:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), "")
        return f"CPU {cpu} (--smoke: tiny sizes; the figures check the code, they measure nothing)"
    return f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"


def table_text(rows, smoke, device, seconds):
    """The markdown table of the rows, under a heading and a line naming the device."""
    flag = " --smoke" if smoke else ""
    when = time.strftime("%Y-%m-%d %H:%M")
    table = [f"## python bench_gpu.py{flag}",
             "",
             f"Device: {device}. torch {torch.__version__}; {when}; {seconds:.0f} s in all.",
             "",
             "| part | arm | time | peak memory | ratio | note |",
             "|---|---|---|---|---|---|"]
    columns = ("part", "arm", "time", "memory", "ratio", "note")
    for r in rows:
        cells = [r.get(k, "") for k in columns]
        table.append("| " + " | ".join(cells) + " |")
    return "\n".join(table) + "\n"


def bench_gpu(smoke=False, out=None, parts=tuple(GPU_PARTS)):
    """Run the parts one after another; print the table and write it to `out`. Returns the rows."""
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA device here; `python bench_gpu.py --smoke` runs "
                         "the same parts at tiny sizes on the CPU")
    t0 = time.perf_counter()

    def timed(name):
        t1 = time.perf_counter()
        timeout = GPU_PARTS[name] * (SMOKE_TIME_FACTOR if smoke else 1)
        part_rows = run_part(name, smoke, timeout)
        print(f"{name}: {time.perf_counter() - t1:.0f} s", flush=True)
        return part_rows

    # on the GPU one part at a time (each owns the device); --smoke's figures measure nothing, so
    # its one-thread parts share the CPU's cores, two at a time on two
    workers = max(1, min(len(parts), len(os.sched_getaffinity(0)))) if smoke else 1
    with ThreadPoolExecutor(workers) as pool:
        rows = [row for part_rows in pool.map(timed, parts) for row in part_rows]
    device = device_description(smoke)
    text = table_text(rows, smoke, device, time.perf_counter() - t0)
    print(text)
    out = out or ("bench_gpu_smoke.md" if smoke else "bench_gpu.md")
    Path(out).write_text(text)
    print(f"written to {out}")
    return rows


def gpu_part(name, smoke):
    """One part's rows (the JSON line run_part reads)."""
    torch.manual_seed(0)
    if smoke:
        torch.set_num_threads(1)
    if name.startswith("extract-b"):
        return part_extract(int(name.removeprefix("extract-b")), smoke)
    parts = {"train": part_train,
             "aggregate": part_aggregate,
             "fsdp": part_fsdp,
             "loop-1tile": lambda smoke: part_loop(smoke, 1),
             "loop-4tiles": lambda smoke: part_loop(smoke, 4),
             "aggregate-idefics": lambda smoke: part_aggregate(smoke, "idefics"),
             "aggregate-qwen": lambda smoke: part_aggregate(smoke, "qwen2vl")}
    return parts[name](smoke)


def main(argv=None):
    p = argparse.ArgumentParser(description="Every GPU figure, one part per process, one table "
                                            "(under 20 min on an H100).")
    p.add_argument("--smoke", action="store_true",
                   help="the same parts at tiny sizes on the CPU (a check of the code)")
    p.add_argument("--out", default=None,
                   help="where the table goes (default bench_gpu.md, bench_gpu_smoke.md)")
    p.add_argument("--parts", default=",".join(GPU_PARTS),
                   help=f"comma-separated subset of {', '.join(GPU_PARTS)}")
    p.add_argument("--part", choices=GPU_PARTS,
                   help="internal: run one part here, its rows as a JSON line")
    args = p.parse_args(argv)
    if args.part:
        return print(json.dumps(gpu_part(args.part, args.smoke)))
    unknown = set(args.parts.split(",")) - set(GPU_PARTS)
    if unknown:
        raise SystemExit(f"--parts {args.parts}: unknown {sorted(unknown)}; "
                         f"choose from {', '.join(GPU_PARTS)}")
    return bench_gpu(args.smoke, args.out, args.parts.split(","))


if __name__ == "__main__":
    main()
