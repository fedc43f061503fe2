"""Stable Diffusion per-word attention targets (paper §4.1, eq. 13-14; §5(1); §10(3)).

Lavender aligns a VLM's text-to-image attention with the cross-attention of Stable Diffusion
(the target p_DM(a | x, y) of eq. 7-9). This file makes that target, offline, once per
(image, answer) pair: encode the image with the VAE, run a short DDIM inversion conditioned on
the answer (5 steps, guidance 1), denoise back from the inverted latent (10 steps), and while
the UNet runs, capture M = softmax(QK^T / sqrt(d)) (eq. 13-14) in every cross-attention (`attn2`)
module; average over heads, layers and steps (Hertz et al. 2022); merge CLIP's BPE pieces into
words; resize each word's map to 32x32, min-max normalise, and save one safetensors file per item
in the DESIGN.md format (attn/<id>.safetensors). The authors never released this part.
`--inversion null-text` replaces the guidance-1 denoising by Mokady et al.'s null-text inversion
(nulltext.py): guided denoising (w = 7.5) with the null embedding tuned at each step.
`--export-jpeg` and `--import-jpeg` convert the store to and from the authors' JPEG layout
(jpeg_maps.py).

    python extract.py --dm sd14 --data data.jsonl --out attn/              # one process
    torchrun --nproc_per_node 8 extract.py --dm sd14 --data data.jsonl --out attn/
    python extract.py --dm tiny-sd --data data.jsonl --out /tmp/attn        # random tiny SD (tests)
    python extract.py --dm sd14 --data data.jsonl --out attn/ --inversion null-text  # 5 + 5, w 7.5
    OMP_NUM_THREADS=1 python bench.py extract                                # capture overhead, CPU
"""
import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import jpeg_maps
import mmdit
import nulltext
import teachers
# the one map size and normalisation of DM and VLM maps
from aligner import MAP_SIZE, min_max
from data import (ID_PATTERN, is_complete, library_bars, load_image, maps_path, progress_bar,
                  read_items_or_exit, save_maps, split_words)
from models import DM_PRESETS, PRESETS, load_dm, resolve_dtype, scheduler_config

# --inversion: guidance 1 both ways; Mokady et al. (nulltext.py)
INVERSIONS = ("ddim", "null-text")


# ---- 1. DDIM inversion, then denoising (§5(1): 5 + 10 steps) ----

def ddim_grids(scheduler, inversion_steps, denoise_steps):
    """(inverse, forward) DDIM schedulers whose grids meet: inversion ends where denoising starts.

    Both use "trailing" timestep spacing (Lin et al. 2024, Table 2), whose grids end at t = T-1 =
    999 whatever the step count: inversion in 5 steps visits 199, 399, ..., 999 and leaves the
    latent at noise level 999; denoising in 10 steps starts from it at 999, 899, ..., 99 and ends
    at level 0. (SD's own "leading" spacing would give inversion 1, 201, ..., 801 and denoising
    901, ..., 1: grids that do not meet.) clip_sample=False: inversion must not clamp the predicted
    clean latent. Guidance 1 (the answer only, no unconditional branch) keeps DDIM inversion
    near-exact.
    """
    from diffusers import DDIMInverseScheduler, DDIMScheduler
    config = dict(scheduler.config, clip_sample=False, timestep_spacing="trailing")
    inverse = DDIMInverseScheduler.from_config(scheduler_config(config, DDIMInverseScheduler))
    forward = DDIMScheduler.from_config(scheduler_config(config, DDIMScheduler))
    inverse.set_timesteps(inversion_steps)
    forward.set_timesteps(denoise_steps)
    return inverse, forward


def invert_and_denoise(unet, latents, context, inverse, forward, store=None,
                       capture_steps="denoise", added=None):
    """Run the inversion then the denoising (§5 (1)); with a store, capture attention at the
    chosen steps.
    added: SDXL's added conditioning (teachers.encode_text), None for SD 1.x and 2.x."""
    dtype = unet.dtype
    for phase, scheduler in (("inversion", inverse), ("denoise", forward)):
        if store is not None:
            if capture_steps == "inversion" and phase == "denoise":
                # nothing more to capture: the denoising would change no map
                break
            store["on"] = capture_steps in ("all", phase)
        for t in scheduler.timesteps:
            # ε, or v (sd21, toy-sd21): the schedulers read it by their config's prediction_type
            eps = unet(latents.to(dtype), t, encoder_hidden_states=context,
                       added_cond_kwargs=added).sample
            latents = scheduler.step(eps.float(), t, latents).prev_sample    # fp32 latent path
    return latents


def null_text(dm, latents, context, inverse, forward, store, capture_steps, guidance, iters):
    """--inversion null-text (nulltext.py): the pivot by DDIM inversion at guidance 1, then
    Algorithm 1 from its end, capturing at capture_steps (the conditional branch only)."""
    if list(forward.timesteps) != list(inverse.timesteps)[::-1]:
        raise ValueError(f"null-text inversion denoises on the inversion's own grid: got "
                         f"{len(inverse.timesteps)} inversion and {len(forward.timesteps)} "
                         f"denoising steps; give equal counts")
    pivot = nulltext.ddim_pivot(dm["unet"], latents, context, inverse, store, capture_steps)
    # else the denoising would change no map
    if capture_steps != "inversion":
        null = nulltext.empty_prompt(dm, len(latents))                      # (B, 77, D)
        nulltext.null_text_inversion(dm["unet"], pivot, context, null, forward, guidance, iters,
                                     store, capture_steps)


# ---- 2. cross-attention capture: a diffusers attention processor on attn2 (eq. 13-14) ----

class CrossAttentionCapture:
    """Attention processor for attn2 modules: SDPA's output, plus M = softmax(QK^T/sqrt(d)).

    SDPA returns no weights, so this computes the probabilities itself (eq. 13-14), averages them
    over heads, brings the layer's grid to the latent grid (bilinear) and adds them into the shared
    running fp32 sum store["sum"] (B, T, h, w): no per-step or per-layer map is ever kept.
    Self-attention (attn1) keeps diffusers' SDPA processor: its maps are large and not needed.
    """

    def __init__(self, store):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        residual = hidden_states
        B, N, _ = hidden_states.shape                          # N = layer grid h_l * w_l
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        if cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        H, d = attn.heads, k.shape[-1] // attn.heads
        q = q.view(B, N, H, d).transpose(1, 2)                 # (B, H, N, d)
        k = k.view(B, -1, H, d).transpose(1, 2)                # (B, H, T, d)
        v = v.view(B, -1, H, d).transpose(1, 2)                # (B, H, T, d)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        # SD 2.x: its float16 scores overflow, diffusers' upcast them
        if attn.upcast_attention:
            q, k = q.float(), k.float()
        scores = (q * attn.scale) @ k.transpose(-1, -2)        # (B, H, N, T)  QK^T/sqrt(d)
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], B)
            scores = scores + mask.view(B, H, -1, k.shape[2])
        probs = scores.float().softmax(dim=-1)                 # (B, H, N, T)  eq. 13, fp32
        out = probs.to(v.dtype) @ v                            # (B, H, N, d)
        if self.store["on"]:
            self.accumulate(probs, N)
        out = out.transpose(1, 2).reshape(B, N, H * d)         # (B, N, H d)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def accumulate(self, probs, N):
        store = self.store
        h, w = store["grid"]                                   # latent grid
        factor = round(math.sqrt(h * w / N))                   # the layer's downsampling
        if store["factors"] is not None and factor not in store["factors"]:
            return
        B, T = probs.shape[0], store["columns"]
        m = probs[..., :T].mean(dim=1)                         # (B, N, T) heads averaged
        m = m.transpose(1, 2).reshape(B, T, h // factor, w // factor)    # (B, T, h_l, w_l)
        if factor != 1:
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)  # (B, T, h, w)
        if store["sum"] is None:
            store["sum"] = torch.zeros(B, T, h, w, device=m.device)     # fp32 accumulator
        store["sum"] += m
        store["count"] += 1


def capturing(unet, store):
    """A CrossAttentionCapture into `store` on every attn2 module for the block, then the UNet's
    own processors again (teachers.capturing)."""
    return teachers.capturing(unet, store, CrossAttentionCapture(store))


@torch.no_grad()
def dm_attention(dm, images, texts, columns, inversion_steps=5, denoise_steps=10,
                 capture_steps="denoise", layers=None, inversion="ddim",
                 guidance=nulltext.GUIDANCE, null_text_iters=nulltext.ITERATIONS,
                 dit_map="joint"):
    """Mean cross-attention (B, columns, h, w) over heads, the chosen layers and steps.

    images (B, 3, res, res) in [-1, 1]; texts: the answers the DM is conditioned on (eq. 7: y).
    inversion "ddim": invert and denoise at guidance 1; "null-text": nulltext.py, guidance
    `guidance`, null_text_iters Adam iterations per step, on one grid (denoise_steps must equal
    inversion_steps: inversion_settings). dit_map: SD3's map, "joint" or "output" (mmdit.py).
    """
    # SD3's joint attention and flow inversion (mmdit.py)
    if "transformer" in dm:
        return mmdit.dm_attention(dm, images, texts, columns, inversion_steps, denoise_steps,
                                  capture_steps, layers, dit_map)
    unet = dm["unet"]
    latents = teachers.encode_image(dm, images)                        # (B, 4, h, w)
    # (B, 77, D); SDXL's extras or None
    context, added = teachers.encode_text(dm, texts)
    inverse, forward = ddim_grids(dm["scheduler"], inversion_steps, denoise_steps)
    store = teachers.new_store(latents.shape[-2:], columns, layers)
    with capturing(unet, store):
        if inversion == "null-text":
            null_text(dm, latents, context, inverse, forward, store, capture_steps, guidance,
                      null_text_iters)
        else:
            invert_and_denoise(unet, latents, context, inverse, forward, store, capture_steps,
                               added)
    if store["count"] == 0:
        raise ValueError(f"no cross-attention was captured: --layers {layers} matches no attn2 "
                         f"layer of this UNet")
    return store["sum"] / store["count"]                               # (B, columns, h, w)


# ---- 3. words: data.split_words (the rule of both sides) located among CLIP's tokens ----

def text_words(tokenizer, text, max_tokens=75, item_id=None):
    """(words, positions): the distinct words of text (split_words) and, per word, the CLIP token
    positions of each of its occurrences.

    Positions index the UNet's 77-token context (position 0 is CLIP's start token); a token
    belongs to the word whose characters it covers. A repeated word gets one entry, its
    occurrences averaged later. Beyond max_tokens content tokens (CLIP: 77 - start - end = 75)
    the text is truncated with a warning naming the item, and a word cut in two by the limit is
    dropped.

        "A red circle?"          -> ["a", "red", "circle"],  [[[1]], [[2]], [[3]]]
                                    ("?" at 4 dropped)
        "an elephant" (tiny-sd)  -> ["an", "elephant"],      [[[1, 2]], [[3, 4, 5, 6, 7, 8, 9]]]
        "red dog, red"           -> ["red", "dog"],          [[[1], [4]], [[2]]]
        "25 dogs"                -> ["25", "dogs"],          [[[1, 2]], [[3, ...]]]
    """
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    if len(offsets) > max_tokens:
        warnings.warn(f"item {item_id!r}: answer has {len(offsets)} CLIP tokens; keeping the "
                      f"first {max_tokens} (CLIP's limit), words after that get no map")
    words, positions = [], []
    for word, start, end in split_words(text):
        # +1: the start token
        tokens = [1 + j for j, (a, b) in enumerate(offsets) if a < end and b > start]
        if not tokens or tokens[-1] > max_tokens:
            # beyond the limit, or cut in two by it
            continue
        if word not in words:
            words.append(word)
            positions.append([])
        positions[words.index(word)].append(tokens)
    return words, positions


def word_weights(positions, n_columns):
    """(n_words, n_columns) W, word_map = W @ token_maps: mean over occurrences of the mean over
    pieces."""
    W = torch.zeros(len(positions), n_columns)
    for w, occurrences in enumerate(positions):
        for occ in occurrences:
            W[w, occ] += 1.0 / (len(occ) * len(occurrences))
    return W


def context_columns(positions):
    """How many context columns a batch needs: up to its last word piece (text_words' positions of
    each item), not CLIP's end and padding tokens."""
    return 1 + max(occ[-1] for item in positions for word in item for occ in word)


# ---- 4. maps: a word's attention, resized to 32x32 and min-max normalised ----

def word_maps(attention, W, normalise=True):
    """(n_words, 32, 32) maps in [0, 1] from one item's attention (T, h, w) and weights W (§4.1)
    (n_words, T); normalise=False: the mean attention probabilities themselves, before min-max."""
    maps = torch.einsum("nt,thw->nhw", W.to(attention), attention)          # (n_words, h, w)
    maps = F.interpolate(maps[None], size=(MAP_SIZE, MAP_SIZE), mode="bilinear", antialias=True,
                         align_corners=False)[0]                              # (n_words, 32, 32)
    return min_max(maps) if normalise else maps


# ---- 5. the store: items -> attn/<id>.safetensors, sharded by rank, resumable ----

def extract(items, dm, out_dir, inversion_steps=5, denoise_steps=None, capture_steps="denoise",
            layers=None, batch_size=1, rank=0, world_size=1, progress=None, inversion="ddim",
            guidance=None, null_text_iters=None, dit_map="joint"):
    """Write <out_dir>/<id>.safetensors for this rank's share of items; returns a summary dict.

    Rank r of world_size takes items r, r + world_size, ... (no collectives: a rank's crash stops
    only that rank). A complete file is skipped (resume). An item that cannot be done (bad id,
    empty answer, no mappable word, missing or corrupt image) goes to <out_dir>/failures.jsonl
    with the reason, and the run goes on (failure_log). A repeated id is a failure for every
    occurrence but the first in `items`, whichever rank each occurrence falls to.
    layers: None, the default here, averages EVERY attn2 layer; the command line's default
    (--layers preset) is the --dm preset's layers instead (models.PRESETS[name]["layers"], e.g.
    sd14's 16x16 ones), so pass those to get its maps. Else a set of downsampling factors of the
    latent grid (sd14 at 512 px: 1 = 64², 2 = 32², 4 = 16², 8 = 8²).
    capture_steps: "all", "inversion", "denoise". inversion ("ddim", "null-text"), guidance,
    null_text_iters, denoise_steps None: inversion_settings. dit_map: SD3's map
    (mmdit.DIT_MAPS), in the metadata unless "joint". Returns dict(done, skipped, failed,
    seconds, rank, world_size)."""
    t0, out_dir = time.time(), Path(out_dir)
    # the flags resolved and checked before any work
    settings = inversion_settings(inversion, inversion_steps, denoise_steps, guidance,
                                  null_text_iters)
    denoise_steps, guidance, null_text_iters, inversion_meta = settings
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = store_meta(dm, inversion_steps, denoise_steps, capture_steps, layers, inversion_meta,
                      dit_map)
    # fail now, not per batch
    check_dm(dm, inversion, inversion_steps, denoise_steps, dit_map)
    summary = {"done": 0, "skipped": 0, "failed": 0}
    fail = failure_log(out_dir, rank, t0, summary)
    # cheap checks: no UNet yet
    todo = items_to_do(items, dm, out_dir, rank, world_size, fail, summary)
    # ---- the UNet work, batch_size items per call; a bar on rank 0 only ----
    show = progress if progress is not None else rank == 0
    bar = progress_bar(show=show, total=len(todo), desc=f"extract {dm['name']}", unit="item")
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        batch, images = load_batch(chunk, dm["res"], fail)
        if batch:
            columns = context_columns([positions for _, _, positions in batch])
            answers = [item["answer"] for item, _, _ in batch]
            attention = dm_attention(dm, torch.stack(images), answers, columns,
                                     inversion_steps, denoise_steps, capture_steps, layers,
                                     inversion, guidance, null_text_iters, dit_map)  # (B, T, h, w)
            for b, (item, words, positions) in enumerate(batch):
                weights = word_weights(positions, columns)
                maps = word_maps(attention[b], weights)                 # (n_words, 32, 32)
                path = maps_path(out_dir, item["id"])
                save_maps(path, maps, words, dict(meta, text=item["answer"]))
                summary["done"] += 1
        bar.update(len(chunk))
    bar.close()
    summary.update(seconds=round(time.time() - t0, 2), rank=rank, world_size=world_size)
    return summary


def store_meta(dm, inversion_steps, denoise_steps, capture_steps, layers, inversion_meta,
               dit_map):
    """The settings each map file of a run records (DESIGN.md): the DM, steps and layers, then the
    inversion's keys (inversion_settings: none for ddim) and dit_map unless "joint"."""
    layer_names = ",".join(map(str, sorted(layers))) if layers else "all"
    meta = {"dm": dm["name"], "inversion_steps": inversion_steps, "denoise_steps": denoise_steps,
            "res": dm["res"], "capture_steps": capture_steps, "layers": layer_names}
    dit = {"dit_map": dit_map} if dit_map != "joint" else {}
    meta.update(inversion_meta, **dit)
    return meta


def failure_log(out_dir, rank, t0, summary):
    """fail(item_id, reason): counts the failure in summary["failed"] and appends a line to
    <out_dir>/failures.jsonl. The file is appended to, run after run; each line names its rank
    and run (torchrun's run id, shared by the ranks, or the start time t0), so the latest run's
    failures can be told from older ones."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))
    run = os.environ.get("TORCHELASTIC_RUN_ID") or started

    def fail(item_id, reason):
        # one short append per line: safe with several ranks writing
        summary["failed"] += 1
        line = json.dumps({"id": item_id, "reason": reason, "rank": rank, "run": run})
        with open(out_dir / "failures.jsonl", "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return fail


def items_to_do(items, dm, out_dir, rank, world_size, fail, summary):
    """[(item, words, positions)] of this rank's items that need the UNet; the others are skipped
    as complete (counted in summary["skipped"]) or failed with their reason (fail)."""
    max_tokens = dm["text_encoder"].config.max_position_embeddings - 2      # 75 for CLIP
    # every rank sees all items, so a repeated id is caught even when its twin went to another
    # rank (two ranks writing <id>.safetensors for two different items would leave one silently
    # wrong map)
    first, todo = {}, []
    for i, item in enumerate(items):
        first.setdefault(item["id"], i)
    for i in range(rank, len(items), world_size):
        item_id, answer = items[i]["id"], items[i]["answer"]
        if not ID_PATTERN.match(item_id):
            fail(item_id, f"bad id {item_id!r}: ids become file names, use only A-Z a-z 0-9 . _ -")
        elif first[item_id] != i:
            fail(item_id, f"duplicate id {item_id!r}: item {i} repeats the id of item "
                          f"{first[item_id]} (0-based, in file order), whose maps are kept; each "
                          f"item needs its own id")
        elif is_complete(maps_path(out_dir, item_id)):
            summary["skipped"] += 1
        elif not answer.strip():
            fail(item_id, "empty answer: the DM is conditioned on the answer, nothing to map")
        else:
            words, positions = text_words(dm["tokenizer"], answer, max_tokens, item_id)
            if words:
                todo.append((items[i], words, positions))
            else:
                fail(item_id, f"no mappable word in answer {answer!r} (only punctuation or "
                              f"symbols)")
    return todo


def load_batch(todo, res, fail):
    """(batch, images): the (item, words, positions) of `todo` whose image loads, and their images
    (3, res, res); a missing or unreadable image is a failure (fail), and the others go on."""
    batch, images = [], []
    for item, words, positions in todo:
        try:
            images.append(load_image(item["image_path"], res))
            batch.append((item, words, positions))
        except FileNotFoundError:
            fail(item["id"], f"missing image: {item['image_path']}")
        except Exception as e:  # PIL raises several types
            fail(item["id"], f"corrupt image: {item['image_path']} ({type(e).__name__}: {e})")
    return batch, images


# ---- the settings, checked before any work ----

def inversion_settings(inversion, inversion_steps, denoise_steps=None, guidance=None, iters=None):
    """(denoise_steps, guidance, iters, meta): the inversion flags resolved and checked (ValueError
    naming the flag and value), and the store metadata they add.

    ddim: denoise_steps 10 by default; guidance and iters do not apply (guidance 1) and no key is
    added: a store without "inversion" is a ddim store. null-text: one trailing grid of
    inversion_steps both ways. Each guided step must land on a point of the pivot, which exists
    only at the inversion's timesteps; the inversion's count because the paper's shortened
    inversion is 5 steps and each denoising step costs N + 2 UNet calls and N backwards.
    denoise_steps defaults to it and must equal it if given.
    """
    if inversion not in INVERSIONS:
        raise ValueError(f"--inversion {inversion!r}: give one of {', '.join(INVERSIONS)}")
    if inversion == "ddim":
        for flag, value in (("--guidance", guidance), ("--null-text-iters", iters)):
            if value is not None:
                raise ValueError(f"{flag} {value}: only --inversion null-text uses it "
                                 f"(--inversion ddim inverts and denoises at guidance 1)")
        return (10 if denoise_steps is None else denoise_steps), None, None, {}
    if denoise_steps is not None and denoise_steps != inversion_steps:
        raise ValueError(f"--denoise-steps {denoise_steps} with --inversion null-text: its "
                         f"denoising revisits the inversion's own {inversion_steps} timesteps "
                         f"(each step lands on the inverted trajectory); leave --denoise-steps out "
                         f"or give --inversion-steps' value, {inversion_steps}")
    guidance = nulltext.GUIDANCE if guidance is None else float(guidance)
    iters = nulltext.ITERATIONS if iters is None else iters
    if not 1 < guidance < math.inf:
        raise ValueError(f"--guidance {guidance}: null-text inversion tunes the unconditional "
                         f"branch of a guided step, which guidance 1 ignores and below 1 inverts; "
                         f"give a value above 1 (the paper: 7.5) or use --inversion ddim")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"--null-text-iters {iters}: give a whole number >= 0 (the paper: 10; 0 "
                         f"denoises with the empty prompt's embedding untuned)")
    meta = {"inversion": inversion, "guidance": guidance, "null_text_iters": iters}
    return inversion_steps, guidance, iters, meta


def check_dit_map(dit_map, dm_name, is_dit):
    """ValueError unless dit_map is the joint map or the DM is a DiT: a UNet's cross-attention
    gives its text no outputs to compare with."""
    if dit_map != "joint" and not is_dit:
        raise ValueError(f"--dit-map {dit_map} with --dm {dm_name}: a UNet's cross-attention has "
                         f"no text outputs to compare with; only SD3's joint attention (mmdit.py) "
                         f"has them")


def check_dm(dm, inversion, inversion_steps, denoise_steps, dit_map="joint"):
    """ValueError before any work: step counts the DM's DDIM grids refuse, --inversion
    null-text with SDXL, whose added conditioning (teachers.encode_text) nulltext.py does not
    tune, or --dit-map output with a UNet (check_dit_map)."""
    check_dit_map(dit_map, dm["name"], "transformer" in dm)
    # SD3 (mmdit.py): its own Euler inversion
    if "transformer" in dm and inversion != "ddim":
        raise ValueError(f"--inversion {inversion} with --dm {dm['name']}: SD3 inverts its flow "
                         f"by Euler steps (mmdit.py); use --inversion ddim")
    if "transformer" not in dm:
        ddim_grids(dm["scheduler"], inversion_steps, denoise_steps)
    if inversion == "null-text" and "text_encoder_2" in dm:
        raise ValueError(f"--inversion null-text with --dm {dm['name']}: nulltext.py tunes the "
                         f"null context only, not SDXL's pooled text embedding; use --inversion "
                         f"ddim")


# ---- command line ----

def parse_layers(text, preset=None):
    """"all" -> None; "2,4" -> {2, 4} (downsampling factors of the latent grid); "preset" -> the
    --dm preset's default (models.PRESETS)."""
    if text == "preset":
        return PRESETS[preset]["layers"]
    if text == "all":
        return None
    factors = {int(f) for f in text.split(",") if f.strip().isdigit()}
    powers_of_two = not any(f < 1 or f & (f - 1) for f in factors)
    if len(factors) != len(text.split(",")) or not powers_of_two:
        raise SystemExit(f"--layers {text!r}: give 'all' or comma-separated powers of two such "
                         f"as '2,4' (1, 2, 4, 8)")
    return factors


def build_parser():
    p = argparse.ArgumentParser(
        description="Per-word Stable Diffusion cross-attention maps (Lavender §4.1).")
    # ---- data and model ----
    p.add_argument("--dm", default="sd14", choices=DM_PRESETS,
                   help="diffusion model preset (models.py)")
    p.add_argument("--dm-path", default=None, help="local folder in diffusers layout (unet/, "
                   "vae/, text_encoder/, tokenizer/, scheduler/; sdxl: text_encoder_2/ and "
                   "tokenizer_2/ too)")
    p.add_argument("--data", help="dataset JSONL (id, image, question, answer); the DM is "
                   "conditioned on the answer")
    p.add_argument("--out", default="attn", help="attention store folder: "
                   "<out>/<id>.safetensors, <out>/failures.jsonl")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N items (a quick look)")
    # ---- method (paper §5(1): 5 inversion + 10 denoising steps) ----
    p.add_argument("--inversion-steps", type=int, default=5, help="DDIM inversion steps (>= 1), "
                   "guidance 1, conditioned on the answer")
    p.add_argument("--denoise-steps", type=int, default=None, help="DDIM denoising steps (>= 1) "
                   "from the inverted latent; default 10 (ddim) or --inversion-steps (null-text, "
                   "which denoises on the inversion's grid)")
    p.add_argument("--inversion", default="ddim", choices=INVERSIONS, help="ddim: guidance 1 both "
                   "ways; null-text: Mokady et al. 2022, the null embedding tuned at each step for "
                   "--guidance (nulltext.py)")
    p.add_argument("--guidance", type=float, default=None, help="null-text only: the guidance "
                   f"scale w (> 1) the null text is tuned for (default {nulltext.GUIDANCE})")
    p.add_argument("--null-text-iters", type=int, default=None, help="null-text only: Adam "
                   f"iterations per denoising step (>= 0; default {nulltext.ITERATIONS})")
    p.add_argument("--dit-map", default="joint", choices=mmdit.DIT_MAPS, help="SD3 only: "
                   "joint (the image -> text block of its joint attention) or output (the "
                   "attention output space's image-text similarity, ConceptAttention's; mmdit.py)")
    p.add_argument("--capture-steps", default="denoise", choices=["denoise", "inversion", "all"],
                   help="which steps' attention is averaged: denoise (§5(1): 'attention maps are "
                   "collected at each denoising step'), inversion, or all")
    p.add_argument("--layers", default="preset", help="attn2 layers averaged: 'preset' (sd14: "
                   "16x16, as Prompt-to-Prompt; sd21, sdxl: factor 4, teachers.py; toy-sd: "
                   "32x32), 'all', or downsampling factors of the latent grid, e.g. '2,4' "
                   "(sd14 at 512 px: 1 = 64x64, 2 = 32x32, 4 = 16x16, 8 = 8x8)")
    # ---- performance ----
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per UNet call (raise it on a GPU)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when available, else "
                   "cpu), cpu, cuda:0, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="DM weights; auto: float16 on GPU, float32 on CPU (attention is "
                   "accumulated in float32 either way)")
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress bar (none either when stderr is not a terminal)")
    # ---- the authors' layout (jpeg_maps.py) ----
    p.add_argument("--export-jpeg", default=None, metavar="DIR", help="write --out's maps in the "
                   "authors' layout, <DIR>/<image file name>/lpm_attention/<image "
                   "stem>/attention_<word>.jpg, then stop")
    p.add_argument("--import-jpeg", default=None, metavar="DIR", help="read maps in the authors' "
                   "layout (<DIR>/<image file name>/lpm_attention/*/attention_<word>.jpg) into "
                   "--out, then stop")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    library_bars(not args.quiet)
    if not args.data:
        raise SystemExit("--data is required: a JSONL of {id, image, question, answer} lines")
    items = read_items_or_exit(args.data)[:args.limit]
    if args.export_jpeg or args.import_jpeg:
        return jpeg_maps.convert(items, args.out, args.export_jpeg, args.import_jpeg)
    # a bad inversion or map flag stops the run before the DM loads
    try:
        inversion_settings(args.inversion, args.inversion_steps, args.denoise_steps, args.guidance,
                           args.null_text_iters)
        is_dit = PRESETS[args.dm].get("family") == "mmdit"
        check_dit_map(args.dit_map, args.dm, is_dit)
    except ValueError as e:
        raise SystemExit(str(e))
    # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python is rank 0 of 1. No process group:
    # ranks share nothing but the output folder.
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    device = cuda if args.device == "auto" else args.device
    dtype = resolve_dtype(args.dtype, device, "float16")
    dm = load_dm(args.dm, args.dm_path, device, dtype)
    s = extract(items, dm, args.out, args.inversion_steps, args.denoise_steps, args.capture_steps,
                parse_layers(args.layers, args.dm), args.batch_size, rank, world_size,
                progress=rank == 0 and not args.quiet, inversion=args.inversion,
                guidance=args.guidance, null_text_iters=args.null_text_iters, dit_map=args.dit_map)
    # one line per rank (no collectives to merge them); items of other ranks are not counted here
    failures = Path(args.out) / "failures.jsonl"
    print(f"extract rank {rank}/{world_size}: {s['done']} done, {s['skipped']} skipped as "
          f"complete, {s['failed']} failed (reasons in {failures}), {s['seconds']:.1f} s")


if __name__ == "__main__":
    main()
