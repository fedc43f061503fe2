"""(not in the paper) The extraction benchmarks: what extract.py's capture (§4.1, §5(1)) costs.

Three arms time DDIM inversion + denoising on the same UNet and inputs (SD-v1.4's UNet geometry,
random weights, CPU): plain SDPA with no capture, extract.py's capture (a processor on `attn2`
only) and the peer, Prompt-to-Prompt's attention store (every attention module explicit, every
map of at most 32x32 queries kept). A second benchmark times extract.py --inversion null-text
against DDIM inversion. Both print ratios measured in one run; bench.py is their command line.
Also here: the peak-memory helpers of every CPU benchmark (peak_rss in this process,
child_peak_rss in a fresh `python bench.py` process per arm). Results: BENCHMARKS.md.

    OMP_NUM_THREADS=1 python bench.py extract                        # 256 px, three arms
    OMP_NUM_THREADS=1 python bench.py extract --res 512 --repeats 1  # SD-v1.4's own 512 px
    OMP_NUM_THREADS=1 python bench.py null-text                      # null-text over ddim, 64 px
"""
import json
import os
import subprocess
import sys
import time

import torch

import data
import extract
import models
import nulltext
import teachers

# every child process runs this command line (bench.py's internal --memory-arm flags)
BENCH_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")


# ---- peak memory, one arm at a time ----

def status_kb(key):
    """One field of /proc/self/status in kB, e.g. "VmRSS:" (resident) or "VmHWM:" (its peak)."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))


def peak_rss(step, warm_up=True):
    """Run step() twice in this process (once if warm_up=False: a caller that has warmed it up);
    return the peak resident memory of the last run (kB), the resident memory before it and before
    the first. The first run is a warm-up (allocator, lazy inits, AdamW state, a store's first
    maps)."""
    loaded = status_kb("VmRSS:")
    if warm_up:
        step()
    # Linux: reset the peak RSS to the current RSS
    open("/proc/self/clear_refs", "w").write("5")
    base = status_kb("VmRSS:")
    step()
    return {"loaded_kb": loaded, "base_kb": base, "peak_kb": status_kb("VmHWM:")}


def child_peak_rss(args):
    """peak_rss of one arm in a fresh process: `python bench.py <args>` prints it as its last line.

    glibc keeps freed heap memory in the RSS, and how much depends on its history (the train arms'
    peaks moved by up to 4% between identical runs); a fixed 64 KiB mmap threshold hands every
    tensor's memory back on free, so the peak RSS tracks the live tensors (as a GPU's
    max_memory_allocated does) and repeats to within 0.5%."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, BENCH_PY, *args]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.splitlines()[-1])


# ---- the peer: Prompt-to-Prompt's attention store (DAAM is close to ours) ----
# Prompt-to-Prompt (Hertz et al. 2022; https://github.com/google/prompt-to-prompt, ptp_utils.py
# register_attention_control and AttentionStore in prompt-to-prompt_stable.ipynb) replaces the
# forward of EVERY attention module of the UNet, self-attention (attn1) and cross-attention
# (attn2), with explicit attention: Q, K, V split into heads, softmax(QK^T * scale) materialised
# (diffusers' get_attention_scores), handed to a controller, then multiplied by V. Its
# AttentionStore keeps a map only if it has at most 32x32 queries ("avoid memory overhead"), all
# heads and both kinds, in a per-step list; when the last layer of a step has run, the step's
# maps are added into running sums (the first step's tensors become the sums), and the average
# is the sums over the step count. So every attention layer pays for an explicit softmax, and
# the maps are kept per head, per layer.
# DAAM (https://github.com/castorini/daam, trace.py) hooks attn2 only, as extract.py does, but
# keeps per-head running sums of every cross-attention map. This is our own code written after
# that description; with guidance 1 (no unconditional half) both arms run the same UNet calls.

class StoreAttention:
    """A diffusers attention processor for every attention module: the same output as SDPA,
    computed with an explicit softmax whose probabilities (B * heads, queries, keys) go to the
    store."""

    def __init__(self, store, name):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        residual = hidden_states
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B * H, N, d)
        k = attn.head_to_batch_dim(attn.to_k(context))        # (B * H, T, d)
        v = attn.head_to_batch_dim(attn.to_v(context))        # (B * H, T, d)
        # explicit: the softmax materialised
        probs = attn.get_attention_scores(q, k, attention_mask)  # (B * H, N, T)
        p2p_keep(self.store, self.name, probs)
        out = torch.bmm(probs, v)                             # (B * H, N, d)
        out = attn.batch_to_head_dim(out)                     # (B, N, H * d)
        out = attn.to_out[0](out)                             # linear
        out = attn.to_out[1](out)                             # dropout
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def p2p_store(n_layers):
    """The attention store: this step's kept maps, the sums over finished steps, the step count."""
    return {"layers": n_layers, "calls": 0, "steps": 0, "step": {}, "sum": {}}


def p2p_keep(store, name, probs):
    """AttentionStore.forward and between_steps: keep maps of at most 32x32 queries; fold the
    step's maps into the sums after the step's last attention layer."""
    if probs.shape[1] <= 32 ** 2:
        store["step"][name] = probs  # (B * H, N, T) all heads
    store["calls"] += 1
    # one UNet call done
    if store["calls"] % store["layers"] == 0:
        for key, m in store["step"].items():
            if key in store["sum"]:
                store["sum"][key] = store["sum"][key].add_(m)
            else:
                store["sum"][key] = m
        store["step"] = {}
        store["steps"] = store["steps"] + 1


def p2p_processors(processors, store):
    """processors (name -> processor) with EVERY attention module replaced by a StoreAttention."""
    return {name: StoreAttention(store, name) for name in processors}


def p2p_average(store):
    """AttentionStore.get_average_attention: each kept map's sum over the step count."""
    return {key: m / store["steps"] for key, m in store["sum"].items()}


# ---- extract.py: SD cross-attention capture at SD-v1.4 geometry, three arms ----

# SDPA, no capture; extract.py's capture; Prompt-to-Prompt's store
EXTRACT_ARMS = ("plain", "ours", "p2p")


def sd14_unet(device="cpu", dtype=torch.float32):
    """SD-v1.4's UNet geometry (models.SD_SIZES["sd14"]: 320/640/1280/1280, 768-d context, 8
    heads, 860M parameters), random weights, built on `device`."""
    parts = models.stable_diffusion("sd14", device=device, dtype=dtype, parts=("unet",))
    return parts["unet"].eval().requires_grad_(False)


def arm_processors(arm, plain, grid, columns=77):
    """(processors, store) of an extract arm; plain: the UNet's own (SDPA) processors."""
    if arm == "plain":
        return dict(plain), None
    if arm == "ours":
        store = teachers.new_store(grid, columns)
        capture = extract.CrossAttentionCapture(store)
        return teachers.capture_processors(plain, capture), store
    store = p2p_store(len(plain))
    return p2p_processors(plain, store), store


def finish(arm, store):
    """What each arm hands on after its last step: its mean map(s) (part of its cost)."""
    if arm == "ours":
        return store["sum"] / store["count"]
    return p2p_average(store) if arm == "p2p" else None


def bench_extract(res=256, inversion_steps=5, denoise_steps=10, repeats=3, columns=77):
    """Time inversion + denoising in three arms on the same UNet and inputs; returns the ratios.

    Only UNet calls are timed (VAE and text encoder would only dilute the ratios). SD-v1.4's UNet
    geometry, random weights; columns=77 captures every context position (the worst case). Each
    step runs the UNet three times on the same input, once per arm (plain, ours, p2p), in an order
    that rotates from step to step; each arm keeps its own store over the steps of a pass.
    """
    unet = sd14_unet()
    scheduler = models.sd_scheduler()
    inverse, forward = extract.ddim_grids(scheduler, inversion_steps, denoise_steps)
    context = torch.randn(1, 77, 768)  # a CLIP text embedding's shape
    plain = dict(unet.attn_processors)
    n = inversion_steps + denoise_steps
    # CPU seconds of each UNet call, per arm
    seconds = {arm: [] for arm in EXTRACT_ARMS}
    with torch.no_grad():
        warm_up = torch.randn(1, 4, res // 8, res // 8)
        unet(warm_up, 1, encoder_hidden_states=context)
        for r in data.progress_bar(range(repeats), desc=f"extract {res} px"):
            seed = torch.Generator().manual_seed(0)
            # (1, 4, 32, 32) at 256 px
            latents = torch.randn(1, 4, res // 8, res // 8, generator=seed)
            grid = latents.shape[-2:]
            arms = {arm: arm_processors(arm, plain, grid, columns) for arm in EXTRACT_ARMS}
            for i, t in enumerate(torch.cat([inverse.timesteps, forward.timesteps])):
                k = (r + i) % len(EXTRACT_ARMS)
                for arm in EXTRACT_ARMS[k:] + EXTRACT_ARMS[:k]:
                    processors, store = arms[arm]
                    # (set_attn_processor pops its argument)
                    unet.set_attn_processor(dict(processors))
                    t0 = time.process_time()
                    eps = unet(latents, t, encoder_hidden_states=context).sample
                    if i == n - 1:
                        finish(arm, store)
                    seconds[arm].append(time.process_time() - t0)
                ddim = inverse if i < inversion_steps else forward
                latents = ddim.step(eps, t, latents).prev_sample
            del arms
    memory_arms = data.progress_bar(EXTRACT_ARMS, desc="peak memory")
    mem = {arm: child_peak_rss(["extract", "--memory-arm", arm, "--res", str(res)])
           for arm in memory_arms}
    print(f"bench: SD-v1.4 geometry UNet (random), {res} px ({res // 8}x{res // 8} latents), "
          f"{inversion_steps} inversion + {denoise_steps} denoise steps, x{repeats}, "
          f"{torch.get_num_threads()} threads")
    return print_extract_ratios(seconds, mem, repeats, n)


def print_extract_ratios(seconds, mem, repeats, n):
    """bench_extract's summary: each arm's time and peak memory, then the ratios (returned)."""
    # two time estimates: total, and per call the best of the repeats (what a call costs when no
    # other process interferes: timeit's rule); the ratios printed last use the second
    total = {arm: sum(s) for arm, s in seconds.items()}
    best = {arm: sum(min(s[i::n]) for i in range(n)) for arm, s in seconds.items()}
    for arm in EXTRACT_ARMS:
        m = mem[arm]
        peak_gib = m["peak_kb"] / 2 ** 20
        over_mib = (m["peak_kb"] - m["loaded_kb"]) / 1024
        print(f"{arm:5s}: {total[arm]:.2f} CPU s in all, best of {repeats} per call "
              f"{best[arm]:.2f} CPU s ({best[arm] / n:.3f} per UNet call); "
              f"peak RSS {peak_gib:.2f} GiB, {over_mib:.0f} MiB over the loaded UNet")
    print(f"ratios, total time: ours/plain {total['ours'] / total['plain']:.3f}, "
          f"p2p/ours {total['p2p'] / total['ours']:.3f}")
    pairs = (("ours/plain", "ours", "plain"), ("p2p/ours", "p2p", "ours"))
    ratio = {key: (best[a] / best[b], mem[a]["peak_kb"] / mem[b]["peak_kb"])
             for key, a, b in pairs}
    shown = "; ".join(f"{k} {t:.3f}, {m:.3f}" for k, (t, m) in ratio.items())
    print("ratios (time best-of, peak memory): " + shown)
    return ratio


def extract_memory(arm, res, columns=77):
    """peak_rss of one UNet call of an arm whose store has already seen one call (the steady
    state: the store's sums and the call's own maps both alive)."""
    torch.set_num_threads(1)
    unet = sd14_unet()
    latents = torch.randn(1, 4, res // 8, res // 8)
    context = torch.randn(1, 77, 768)
    plain = dict(unet.attn_processors)
    processors, store = arm_processors(arm, plain, latents.shape[-2:], columns)
    unet.set_attn_processor(processors)
    with torch.no_grad():
        return peak_rss(lambda: unet(latents, 501, encoder_hidden_states=context))


# ---- extract.py --inversion null-text against ddim ----

def bench_null_text(res=64, steps=5, iters=10, repeats=2):
    """CPU s per image of extract.py --inversion null-text (steps + steps, iters Adam steps each,
    w 7.5) over ddim (steps + 2 steps), capture on, SD-v1.4's UNet geometry (random), arms
    alternating."""
    unet = sd14_unet()
    seconds = {"ddim": [], "null-text": []}
    # random inputs, seeded by the UNet's build
    x0 = torch.randn(1, 4, res // 8, res // 8)
    context, null = torch.randn(2, 1, 77, 768)
    for r in data.progress_bar(range(repeats), desc=f"null-text {res} px"):
        for arm in list(seconds)[r % 2:] + list(seconds)[:r % 2]:
            denoise_steps = steps * (1 + (arm == "ddim"))
            scheduler = models.sd_scheduler()
            inverse, forward = extract.ddim_grids(scheduler, steps, denoise_steps)
            store = teachers.new_store(x0.shape[-2:], 77)
            t0 = time.process_time()
            with extract.capturing(unet, store), torch.no_grad():
                if arm == "ddim":
                    extract.invert_and_denoise(unet, x0, context, inverse, forward, store)
                else:
                    pivot = nulltext.ddim_pivot(unet, x0, context, inverse, store)
                    nulltext.null_text_inversion(unet, pivot, context, null, forward,
                                                 iters=iters, store=store)
            seconds[arm].append(time.process_time() - t0)
    # per image, best of repeats
    best = {arm: min(s) for arm, s in seconds.items()}
    ratio = best["null-text"] / best["ddim"]
    print(f"bench: SD-v1.4 geometry UNet (random), {res} px, best of {repeats}: "
          f"ddim {best['ddim']:.1f}, null-text {best['null-text']:.1f} CPU s per image; "
          f"null-text / ddim {ratio:.2f}")
    return ratio
