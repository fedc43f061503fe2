"""The miniature world: drawn shapes, a tiny Stable Diffusion and a tiny Mllama trained here on a CPU,
and the one-command demo of the whole method (not in the paper; it runs §4-§8 end to end in minutes).

No weights can be downloaded here, so the project builds a world small enough to train its own
"pretrained" models in minutes, and then runs every step of the paper on it for real:

  1. build_world(): 32x32 images of 1-3 coloured shapes, captions ("a red circle left of a blue
     square"), VQA pairs (colour of a shape, shape of a colour, position, count, yes/no) and the
     binary mask of the object every answer word names. Splits: pretrain (base models; one object
     per image for VQA, so the VLM never needs to localise), finetune (small, 2-3 objects, where it
     must: "what colour is the circle?"), test-id, and test-ood (colour-shape pairs never seen in
     fine-tuning). Written in the DESIGN.md JSONL format, so every script reads it unchanged.
  2. toy-sd (`python toy.py train-sd`): a diffusion model from SD's diffusers parts (AutoencoderKL,
     UNet2DConditionModel with cross-attention, CLIPTextModel + an in-memory CLIPTokenizer, a DDIM
     scheduler config), saved in the diffusers component layout so extract.py runs the sd14 path.
  3. toy (`python toy.py train-vlm`): a tiny MllamaForConditionalGeneration, pre-trained on the
     pretrain split: competent but imperfect, the starting point of fine-tuning as Llama-3.2 is.
  4. `python toy.py`: extract DM maps (extract.py), fine-tune AR and Lavender with the same budget
     and seeds (train.py), evaluate (evaluate.py), print one table, write toy_report.md.

    python toy.py                     # the demo (shipped weights in toy_models/, world cached in toy_out/)
    python toy.py train-sd --seed 0   # retrain toy_models/toy-sd (2400 steps, about 20 min on 2 cores)
    python toy.py train-vlm --seed 0  # retrain toy_models/toy-vlm
    python toy.py measure-sd          # toy-sd pointing on held-out images (colour and shape words apart)
"""
import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
TOY_MODELS = ROOT / "toy_models"

# ---------------------------------------------------------------------------------------------
# the world: shapes x colours x positions x sizes
# ---------------------------------------------------------------------------------------------

SIZE = 32                                              # image side in pixels
BACKGROUND = (16, 16, 16)
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (60, 90, 235),
           "yellow": (235, 215, 40), "purple": (160, 60, 200)}
SHAPES = ("circle", "square", "triangle")
# Colour-shape pairs never shown in fine-tuning; test-ood asks about exactly these (pre-training
# shows every pair, so the concepts are known, only their binding in multi-object scenes is new).
HELD_OUT = (("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "circle"))
COUNT_WORDS = ("zero", "one", "two", "three")
# split: (images, objects per image (min, max), question kinds, seed offset)
SPLITS = {
    "pretrain": (4000, (1, 3), None, 0),
    "finetune": (160, (2, 3), ("colour", "shape", "yesno"), 1),
    "test-id": (150, (2, 3), ("colour", "shape", "yesno"), 2),
    "test-ood": (150, (2, 3), ("colour", "shape", "yesno"), 3),
}
CAPTION_PROMPT = "describe the image."


def shape_mask(shape, cx, cy, r, size=SIZE):
    """Boolean (size, size) mask of one shape centred at pixel (cx, cy) with half-extent r."""
    y, x = np.mgrid[0:size, 0:size] + 0.5                         # pixel centres
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        s = 0.85 * r                                                # same area as the circle, roughly
        return (np.abs(x - cx) <= s) & (np.abs(y - cy) <= s)
    if shape == "triangle":                                         # apex up, base at cy + r
        t = (y - (cy - r)) / (2 * r)                                # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(x - cx) <= t * r * 1.1)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def draw_scene(rng, n_objects, allowed=None):
    """One scene: list of objects {colour, shape, cx, cy, r}, distinct colours and distinct shapes
    (so "the circle" and "the red object" each name exactly one object), boxes not overlapping.

    allowed: optional set of (colour, shape) pairs to draw from (fine-tuning excludes HELD_OUT).
    """
    for _ in range(1000):                                           # rejection sampling
        shapes = rng.choice(SHAPES, size=n_objects, replace=False)
        colours = rng.choice(list(COLOURS), size=n_objects, replace=False)
        pairs = list(zip(colours.tolist(), shapes.tolist()))
        if allowed is not None and not all(p in allowed for p in pairs):
            continue
        objects = []
        for colour, shape in pairs:
            r = float(rng.uniform(3.5, 6.0))                        # sizes: small to large
            for _ in range(100):
                cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
                if all(abs(cx - o["cx"]) > r + o["r"] + 1 or abs(cy - o["cy"]) > r + o["r"] + 1 for o in objects):
                    objects.append({"colour": colour, "shape": shape, "cx": float(cx), "cy": float(cy), "r": r})
                    break
        if len(objects) == n_objects:
            return objects
    raise RuntimeError(f"could not place {n_objects} objects on a {SIZE}x{SIZE} canvas")


def render(objects):
    """(image uint8 (32, 32, 3), masks: list of bool (32, 32), one per object, exactly its drawn pixels)."""
    image = np.zeros((SIZE, SIZE, 3), np.uint8) + np.array(BACKGROUND, np.uint8)
    masks = [shape_mask(o["shape"], o["cx"], o["cy"], o["r"]) for o in objects]
    for o, m in zip(objects, masks):
        image[m] = COLOURS[o["colour"]]
    return image, masks


def relation(a, b):
    """Where object a is relative to b, by the larger offset: 'left of', 'right of', 'above', 'below'."""
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def caption(objects):
    """'a red circle' / 'a red circle left of a blue square' / 'a red circle, a blue square and a green triangle'."""
    names = [f"a {o['colour']} {o['shape']}" for o in objects]
    if len(objects) == 1:
        return names[0]
    if len(objects) == 2:
        return f"{names[0]} {relation(objects[0], objects[1])} {names[1]}"
    return ", ".join(names[:-1]) + " and " + names[-1]


def side(o):
    """Coarse position of one object in the image: left, right, top or bottom (larger offset from centre)."""
    dx, dy = o["cx"] - SIZE / 2, o["cy"] - SIZE / 2
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def questions(rng, objects, kind):
    """One (question, answer, index of the object the answer names or None) of a given kind."""
    o_index = int(rng.integers(len(objects)))
    o = objects[o_index]
    if kind == "colour":                                            # answer names the object: mask
        return f"what colour is the {o['shape']}?", o["colour"], o_index
    if kind == "shape":
        return f"what shape is the {o['colour']} object?", o["shape"], o_index
    if kind == "position":
        return f"where is the {o['colour']} {o['shape']}?", side(o), None
    if kind == "count":
        return "how many objects are there?", COUNT_WORDS[len(objects)], None
    if kind == "yesno":                                             # half true, half a swapped pair
        if rng.random() < 0.5:
            return f"is there a {o['colour']} {o['shape']}?", "yes", None
        present = {(p["colour"], p["shape"]) for p in objects}
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present and
                  (c in {p["colour"] for p in objects} or s in {p["shape"] for p in objects})]
        c, s = absent[int(rng.integers(len(absent)))]
        return f"is there a {c} {s}?", "no", None
    if kind == "caption":
        return CAPTION_PROMPT, caption(objects), None
    raise ValueError(f"unknown question kind {kind!r}")


def pretrain_kinds(n_objects):
    """Pre-training asks binding questions only of one-object scenes: localisation is never needed
    there (REFERENCE.md's design); multi-object scenes get counting only."""
    if n_objects == 1:
        return ("colour", "shape", "position", "count", "yesno", "caption")
    return ("count",)


def save_mask(mask, path):
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def build_split(out_dir, split, seed, spec=None):
    """Draw one split (spec: its SPLITS entry); write images/, masks/ and <split>.jsonl under out_dir.
    Returns the items. A split's draws are one random stream, so a larger split begins with the
    items of a smaller one."""
    n_images, (lo, hi), kinds, offset = spec or SPLITS[split]
    rng = np.random.default_rng([seed, offset])                    # one stream per split: splits independent
    allowed = None
    every_pair = {(c, s) for c in COLOURS for s in SHAPES}
    if split == "finetune":
        allowed = every_pair - set(HELD_OUT)
    items = []
    for i in range(n_images):
        n_objects = int(rng.integers(lo, hi + 1))
        objects = draw_scene(rng, n_objects, allowed)
        while split == "test-ood" and not any((o["colour"], o["shape"]) in HELD_OUT for o in objects):
            objects = draw_scene(rng, n_objects, allowed)           # test-ood: every scene has a held-out pair
        image, masks = render(objects)
        image_id = f"{split}-{i:05d}"
        Image.fromarray(image).save(out_dir / "images" / f"{image_id}.png")
        for k, m in enumerate(masks):
            save_mask(m, out_dir / "masks" / f"{image_id}-{k}.png")
        # pre-training: every kind its scene allows; the small splits: one question per image
        picked = pretrain_kinds(n_objects) if kinds is None else [kinds[int(rng.integers(len(kinds)))]]
        for kind in picked:
            q, a, o_index = questions(rng, objects, kind)
            if split == "test-ood" and kind in ("colour", "shape"):
                # ask about a held-out object: that is what the split tests
                o_index = next(k for k, o in enumerate(objects) if (o["colour"], o["shape"]) in HELD_OUT)
                o = objects[o_index]
                q, a = ((f"what colour is the {o['shape']}?", o["colour"]) if kind == "colour" else
                        (f"what shape is the {o['colour']} object?", o["shape"]))
            item = {"id": f"{image_id}-{kind}", "image": f"images/{image_id}.png", "question": q, "answer": a,
                    "category": kind, "caption": caption(objects), "objects": objects}
            # masks: the object each answer word names (colour and shape words of a caption, or the
            # one-word answer of a colour/shape question); words naming no object get none
            masks_of = {}
            if o_index is not None:
                masks_of[a] = f"masks/{image_id}-{o_index}.png"
            if kind == "caption":
                for k, o in enumerate(objects):
                    masks_of[o["colour"]] = masks_of[o["shape"]] = f"masks/{image_id}-{k}.png"
            if masks_of:
                item["masks"] = masks_of
            items.append(item)
    with open(out_dir / f"{split}.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return items


def write_captions(out_dir, items):
    """test-captions.jsonl: one captioning item per test-id image (never seen by toy-sd in training),
    masks for every colour and shape word: the toy-sd pointing check runs on these."""
    lines = {}
    for it in items:
        image_id = Path(it["image"]).stem
        masks = {}
        for k, o in enumerate(it["objects"]):
            masks[o["colour"]] = masks[o["shape"]] = f"masks/{image_id}-{k}.png"
        lines[image_id] = {"id": f"{image_id}-caption", "image": it["image"], "question": CAPTION_PROMPT,
                           "answer": it["caption"], "category": "caption", "caption": it["caption"],
                           "objects": it["objects"], "masks": masks}
    with open(Path(out_dir) / "test-captions.jsonl", "w") as f:
        for line in lines.values():
            f.write(json.dumps(line) + "\n")


def build_world(out_dir, seed=0, finetune_items=None):
    """Draw every split of the world into out_dir (deterministic by seed); returns {split: jsonl path}.

    finetune_items: the finetune split's size (default SPLITS', 160). A cached world (world.json
    with the same seed and splits) is reused as it is.
    """
    out_dir = Path(out_dir)
    splits = dict(SPLITS)
    if finetune_items is not None:
        splits["finetune"] = (finetune_items, *SPLITS["finetune"][1:])
    stamp = {"seed": seed, "splits": {k: list(map(str, v)) for k, v in splits.items()}, "held_out": HELD_OUT,
             "version": 1}
    paths = {split: out_dir / f"{split}.jsonl" for split in (*SPLITS, "test-captions")}
    info = out_dir / "world.json"
    if info.exists() and json.loads(info.read_text()) == json.loads(json.dumps(stamp)) and all(p.exists() for p in paths.values()):
        return paths
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    for split in tqdm(splits, desc="world", leave=False):
        items = build_split(out_dir, split, seed, splits[split])
        if split == "test-id":
            write_captions(out_dir, items)
    info.write_text(json.dumps(stamp))
    return paths


# ---------------------------------------------------------------------------------------------
# toy-sd: a tiny diffusion model from SD's diffusers parts, trained on the world's captions
# ---------------------------------------------------------------------------------------------

PUNCTUATION = (",", ".", "?")
# Text positions of toy-sd (SD: 77). extract.py pads every text to this many, and with 77 the ~65
# padding columns took ~70% of every pixel's attention (a near-uniform softmax over 77 columns)
# and the words' maps mostly showed where that padding mass was not; the world's longest caption
# is 14 tokens with the start and end tokens, so 16 leaves the words most of the mass.
TEXT_POSITIONS = 16


def world_words():
    """Every word the world's texts use (captions, questions, answers), sorted."""
    words = set(COLOURS) | set(SHAPES) | set(COUNT_WORDS)
    words |= set("a and left right of above below top bottom yes no what colour shape is the object where "
                 "how many objects are there describe image".split())
    return sorted(words)


def clip_tokenizer(max_length=16):
    """A CLIPTokenizer built in memory whose vocabulary is the world's words, one token each.

    CLIP's BPE marks a word's last piece with "</w>"; each world word gets the merges that build
    it letter by letter ("r"+"e" -> "re", "re"+"d</w>" -> "red</w>"), so it becomes one token, and
    any other word falls back to letters, as SD's tokenizer splits rare words. Pads with the end
    token, like SD 1.x, to TEXT_POSITIONS (16, not 77).
    """
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz" + "".join(PUNCTUATION):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for word in world_words():
        # tokenize with the merges so far (lowest rank first, as BPE does), then add merges that
        # join what is left; a new merge ranks after every earlier one, so no earlier word changes
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            ranks = [merges.index(p) if p in merges else len(merges) for p in zip(pieces, pieces[1:])]
            k = int(np.argmin(ranks))
            if ranks[k] == len(merges):
                merges.append((pieces[k], pieces[k + 1]))
            pieces[k:k + 2] = [pieces[k] + pieces[k + 1]]
            vocab.setdefault(pieces[k], len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = max_length
    for word in world_words():
        assert len(tokenizer.tokenize(word)) == 1, f"world word {word!r} is not one CLIP token"
    return tokenizer


def toy_sd_parts(tokenizer, seed=0):
    """(vae, unet, text_encoder, scheduler): diffusers/transformers classes from small configs.

    VAE: a 1-level AutoencoderKL (16 channels, no downsampling): 32 px images -> 4 x 32 x 32 latents,
    pixel space in all but name, kept so that extraction runs SD's encode -> UNet path unchanged.
    Trained briefly (train_vae: a few hundred steps of L1 + a small KL, no GAN), then frozen.
    UNet: blocks 32/32/64 at 32, 16 and 8 px; cross-attention (SD's attn2) at 16 and 8 px and in the
    mid block, none at 32 px; 4-channel heads. Text encoder: CLIPTextModel, hidden 64, two causal
    layers, learned positions, trained jointly with the UNet (there is no pretrained CLIP here).

    Why this recipe (toy-sd pointing on 750 held-out caption words, toy_report.md): a 2-level VAE
    (16x16 latents) with a position-free, layer-free encoder (a bag of word vectors) pointed 46%:
    colour words 89%, shape words 2%. A bag of words cannot tell which shape goes with which colour
    in "a red circle left of a blue square", so the UNet learned to ignore shape words (its
    background pixels used them as an attention sink). This recipe points 84.5% (colour 91%, shape
    78%); with one causal layer it pointed 71% (colour 99%, shape 43%), and of the other combinations
    tried none came close. Our reading: causal layers let "circle" read the "red" before it, as SD's
    CLIP binds attributes; the full-resolution level gives the cross-attention layers shape features
    to query with; whole captions (no one-word prompts) leave the binding as the only way to
    denoise. One-word prompts, as the demo's answers are, are then outside its training texts; their
    maps still point 62%.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, layers_per_block=1,
                        norm_num_groups=8, sample_size=SIZE, mid_block_add_attention=False)
    unet = UNet2DConditionModel(
        sample_size=SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16)
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TEXT_POSITIONS,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoder = CLIPTextModel(text_config)
    # SD 1.x's noise schedule; DDIM as the denoising scheduler (extract.py builds its inverse from it)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    return vae, unet, text_encoder, scheduler


def load_images(items, root):
    """(N, 3, 32, 32) float in [-1, 1] for the distinct images of items (order of first appearance)."""
    paths = list(dict.fromkeys(str(Path(root) / it["image"]) for it in items))
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])   # (N, 32, 32, 3)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1, paths


def train_vae(vae, images, steps=300, batch=32, lr=2e-3, seed=0):
    """Fit the VAE briefly: L1 reconstruction + a small KL term (as SD's VAE, without the GAN)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    bar = tqdm(range(steps), desc="toy-sd vae")
    for _ in bar:
        x = images[torch.randint(len(images), (batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        recon = torch.cat([vae.decode(latents[i:i + 256]).sample for i in range(0, len(latents), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))   # unit-variance latents, as SD's 0.18215
    return latents * vae.config.scaling_factor, float(F.l1_loss(recon, images))


def train_sd(out_dir, world_dir, seed=0, steps=2400, batch=32, lr=1e-3, vae_steps=300, save_every=400,
             init_from=None):
    """Train toy-sd on the pretrain split's captions; save it in diffusers layout under out_dir.

    init_from: a toy-sd folder to continue from (its unet/, vae/, text_encoder/). Its VAE is kept
    frozen with its scaling factor, as the original schedule freezes the VAE after its own phase,
    so no VAE step runs; the UNet and text encoder get a fresh AdamW and warm-up + cosine over `steps`."""
    from diffusers import DDPMScheduler
    torch.manual_seed(seed)
    paths = build_world(world_dir, seed)
    items = [json.loads(line) for line in open(paths["pretrain"])]
    scenes = {it["image"]: it for it in items}                      # one entry per image
    images, image_paths = load_images(list(scenes.values()), world_dir)
    scenes = list(scenes.values())
    tokenizer = clip_tokenizer()
    vae, unet, text_encoder, scheduler = toy_sd_parts(tokenizer, seed)
    t0 = time.time()
    if init_from:                                                   # continue a shipped/earlier toy-sd
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel
        vae = AutoencoderKL.from_pretrained(Path(init_from) / "vae").eval().requires_grad_(False)
        unet = UNet2DConditionModel.from_pretrained(Path(init_from) / "unet")
        text_encoder = CLIPTextModel.from_pretrained(Path(init_from) / "text_encoder")
        with torch.no_grad():
            latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
            vae_l1 = float(F.l1_loss(torch.cat([vae.decode(latents[i:i + 256]).sample
                                                for i in range(0, len(latents), 256)]), images))
        latents = latents * vae.config.scaling_factor               # (N, 4, 32, 32), the saved factor
        vae_steps = 0
    else:
        latents, vae_l1 = train_vae(vae, images, steps=vae_steps, seed=seed)   # (N, 4, 32, 32)
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    params = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    unet.train()
    text_encoder.train()
    bar = tqdm(range(steps), desc="toy-sd unet")
    log = []
    for step in bar:
        idx = torch.randint(len(latents), (batch,), generator=g)
        texts = [scenes[i]["caption"] for i in idx.tolist()]       # whole captions (see toy_sd_parts)
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids   # (B, TEXT_POSITIONS)
        x0 = latents[idx]                                           # (B, 4, 32, 32)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=g)
        xt = noise_scheduler.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=text_encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, noise)                              # epsilon prediction (DDPM)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(log[-50:]):.4f}")
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save_sd(Path(out_dir) / f"step{step + 1}", unet, vae, text_encoder, tokenizer, scheduler)
    out_dir = Path(out_dir)
    save_sd(out_dir, unet, vae, text_encoder, tokenizer, scheduler)
    summary = {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "init_from": str(init_from) if init_from else None,
               "vae_steps": vae_steps, "vae_l1": round(vae_l1, 4),
               "final_loss": round(float(np.mean(log[-100:])), 4), "minutes": round((time.time() - t0) / 60, 1),
               "unet_params": sum(p.numel() for p in unet.parameters()),
               "text_params": sum(p.numel() for p in text_encoder.parameters())}
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2))
    print(f"toy-sd: {summary}")
    return out_dir


def save_sd(out_dir, unet, vae, text_encoder, tokenizer, scheduler):
    """The diffusers component layout that extract.load_dm reads (unet/, vae/, text_encoder/, ...)."""
    out_dir = Path(out_dir)
    unet.eval()
    text_encoder.eval()
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder), ("tokenizer", tokenizer),
                       ("scheduler", scheduler)):
        part.save_pretrained(out_dir / name)
    unet.train()
    text_encoder.train()


def dm_pointing(items, attn_dir):
    """Pointing accuracy of extracted DM maps: the share of (item, word) with a mask whose map's
    argmax falls inside the word's object (evaluate.pointing_hit). Returns dict(accuracy, hits, n,
    colour, shape, entropy): colour and shape are the accuracies over colour words and over shape
    words alone (they can differ a lot; toy_report.md has the history), entropy the mean of the
    maps' entropies (evaluate.attention_entropy, App. B eq. 23)."""
    import evaluate
    import extract
    hits = []                                                       # (hit, the word, entropy of its map)
    for it in items:
        path = extract.maps_path(attn_dir, it["id"])
        if not it.get("masks") or not path.exists():
            continue
        maps, words, _ = extract.load_maps(path)                    # (n_words, 32, 32)
        regions = evaluate.item_regions(it, Path(it["image_path"]).parent.parent, lambda w: w)
        for word, region in regions.items():
            if word in words:
                m = maps[words.index(word)]
                hits.append((evaluate.pointing_hit(m, region), word, float(evaluate.attention_entropy(m))))
    share = lambda hs: round(float(np.mean(hs)), 4) if hs else float("nan")             # noqa: E731
    return {"accuracy": share([h for h, _, _ in hits]), "hits": int(sum(h for h, _, _ in hits)), "n": len(hits),
            "colour": share([h for h, w, _ in hits if w in COLOURS]),
            "shape": share([h for h, w, _ in hits if w in SHAPES]), "entropy": share([e for _, _, e in hits])}


def measure_sd(dm_path, world_dir, out_dir, n=None, seed=0, **extract_kwargs):
    """Extract toy-sd maps (extract.extract, the sd14 code path) for held-out captions and for the
    test-id answers of the world drawn with `seed`, and return their pointing accuracy:
    {"captions": {...}, "answers": {...}}."""
    import extract
    paths = build_world(world_dir, seed)
    dm = extract.load_dm("toy-sd", path=dm_path)
    result = {}
    for name, split in (("captions", "test-captions"), ("answers", "test-id")):
        items = [it for it in extract.read_items(paths[split]) if it.get("masks")][:n]
        extract.extract(items, dm, Path(out_dir) / split, batch_size=32, **extract_kwargs)
        result[name] = dm_pointing(items, Path(out_dir) / split)
    return result


# ---------------------------------------------------------------------------------------------
# toy: a tiny Mllama (the llama32 classes) pre-trained on the world
# ---------------------------------------------------------------------------------------------

def world_corpus():
    """Texts the toy VLM's tokenizer is trained on: every world word alone and after a space, so
    each is one byte-level BPE token in both forms ("red" after the header's newlines, " red" inside)."""
    words = world_words()
    return words + [" ".join(words)] * 4 + [f"x {w} x" for w in words] * 4 + list(PUNCTUATION)


def toy_vlm_tokenizer():
    """Byte-level BPE (as Llama 3's) with Llama-3.2-Vision's special tokens, over the world's words."""
    from train import tiny_tokenizer
    tokenizer = tiny_tokenizer(world_corpus(), vocab_size=1000)
    for word in world_words():
        for form in (word, " " + word):
            assert len(tokenizer.tokenize(form)) == 1, f"world word {form!r} is not one VLM token"
    return tokenizer


def toy_vlm(seed=0):
    """(model, processor): MllamaForConditionalGeneration from a tiny config, random weights.

    Text: hidden 128, 5 layers (cross-attention at 1 and 3), 4 heads (2 KV heads). Vision: hidden
    64, 4 + 1 layers, one 32 px tile of 4 px patches (8x8 patches + CLS = 65 tokens): max_num_tiles 1
    with the one aspect ratio 1x1 (id 1), so no padding tiles are encoded (4x less vision work).
    """
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil, MllamaProcessor
    from train import TINY_CHAT_TEMPLATE
    tokenizer = toy_vlm_tokenizer()
    processor = MllamaProcessor(image_processor=MllamaImageProcessorPil(size={"height": SIZE, "width": SIZE},
                                                                        max_image_tiles=1),
                                tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE)
    config = MllamaConfig(
        vision_config=dict(hidden_size=64, num_hidden_layers=4, num_global_layers=1, attention_heads=4,
                           intermediate_size=128, vision_output_dim=64 * 3, image_size=SIZE, patch_size=4,
                           max_num_tiles=1, supported_aspect_ratios=[[1, 1]],
                           intermediate_layers_indices=[1, 3]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=5, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=256, cross_attention_layers=[1, 3],
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, max_position_embeddings=256),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"))
    torch.manual_seed(seed)
    return MllamaForConditionalGeneration(config), processor


def vqa_accuracy(model, processor, items, batch_size=64):
    """Exact-match accuracy of greedy answers, scored as evaluate.py scores them."""
    import evaluate
    answers = evaluate.generate_answers(model, processor, items, batch_size=batch_size, max_new_tokens=12, show=False)
    return float(np.mean([evaluate.score_prediction(a, it["answer"], it["question"])["correct"]
                          for a, it in zip(answers, items)]))


def train_vlm(out_dir, world_dir, seed=0, steps=1200, batch=32, lr=1e-3):
    """Pre-train the toy Mllama on the pretrain split: every weight, next-token loss on the answers
    (eq. 6), batches from train.collate (the fine-tuning data path), a plain loop (world-building)."""
    import extract
    import train
    paths = build_world(world_dir, seed)
    items = extract.read_items(paths["pretrain"])
    tests = {s: extract.read_items(paths[s]) for s in ("test-id", "test-ood")}
    model, processor = toy_vlm(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(seed)
    t0 = time.time()
    model.train()
    bar = tqdm(range(steps), desc="toy vlm")
    log = []
    for step in bar:
        picked = train.collate(processor, [items[i] for i in rng.integers(len(items), size=batch)])
        loss = model(**train.model_inputs(picked), labels=picked["labels"]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        log.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(log[-50:]):.3f}")
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)                                  # saved first: the probe below is extra
    processor.save_pretrained(out_dir)
    single = [it for it in items[-1000:] if it["category"] in ("colour", "shape")]   # seen scenes: a sanity check
    summary = {"seed": seed, "steps": steps, "batch": batch, "final_loss": round(float(np.mean(log[-100:])), 4),
               "params": sum(p.numel() for p in model.parameters()), "minutes": round((time.time() - t0) / 60, 1),
               "acc_pretrain_one_object": vqa_accuracy(model, processor, single),
               **{f"acc_{s}": vqa_accuracy(model, processor, v) for s, v in tests.items()}}
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2))
    print(f"toy vlm: {summary}")
    return out_dir


# ---------------------------------------------------------------------------------------------
# the demo: extract -> fine-tune AR and Lavender -> evaluate, every stage through the real scripts
# ---------------------------------------------------------------------------------------------

def train_args(data, attn, out, loss, seed, args):
    """train.py's command line for one fine-tuning run (AR and Lavender differ only in --loss)."""
    import train
    argv = ["--model", "toy", "--model-path", str(args.vlm_path), "--data", str(data), "--attn", str(attn),
            "--out", str(out), "--loss", loss, "--seed", str(seed), "--max-steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--lam", str(args.lam),
            "--aggregate", args.aggregate, "--aligner", args.aligner, "--aligner-mode", args.aligner_mode,
            "--align-words", args.align_words, "--peft", args.peft,
            "--pretrain-aligner-steps", str(args.pretrain_aligner_steps if loss == "lavender" else 0),
            "--overwrite",  # a run with other settings in the same folder is replaced (finetune() reuses a same one)
            "--no-progress" if args.quiet else "--progress"]
    return train.build_parser().parse_args(argv)


def mean_spread(values):
    """'0.613 ± 0.021': mean ± sample std over seeds (None values dropped)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {spread:.3f}"


def demo_table(reports, seeds):
    """Rows of the demo table from evaluate.py's reports {split: report}: one column per model kind."""
    def runs_of(split, kind):
        return [r for r in reports[split]["runs"] if r["name"] == kind or r["name"].startswith(kind + "-s")]

    def column(kind, pick, split="test-id"):
        return [pick(r) for r in runs_of(split, kind)]
    acc = lambda r: r["accuracy"]["all"]["accuracy"]                                       # noqa: E731
    kinds = ("base", "ar", "lavender")
    rows = []
    for split in ("test-id", "test-ood"):
        rows.append((f"accuracy {split}", *[mean_spread(column(k, acc, split)) for k in ("base", "ar", "lavender")]))
    for split in ("test-id", "test-ood"):
        for k in ("colour", "shape", "yesno"):
            pick = lambda r, k=k: (r["accuracy"].get(k) or {}).get("accuracy")             # noqa: E731
            rows.append((f"  {k} ({split})", *[mean_spread(column(kk, pick, split)) for kk in ("base", "ar", "lavender")]))
    dm = reports["test-id"].get("dm") or {}
    ent = lambda r: (r.get("vlm_entropy") or {}).get("mean")                               # noqa: E731
    point = lambda r: (r.get("pointing") or {}).get("accuracy")                            # noqa: E731
    mse = lambda r: (r.get("alignment_mse") or {}).get("mean")                             # noqa: E731
    head = lambda pick: lambda r: pick({"vlm_entropy": r["head"]["entropy"], "pointing": r["head"]["pointing"],  # noqa: E731
                                        "alignment_mse": r["head"]["alignment_mse"]}) if r.get("head") else None
    rows.append(("VLM's own attention: entropy (nats, test-id)", *[mean_spread(column(k, ent)) for k in kinds]))
    rows.append(("VLM's own attention: pointing (test-id)", *[mean_spread(column(k, point)) for k in kinds]))
    rows.append(("VLM's own attention: MSE to the DM map (test-id)", *[mean_spread(column(k, mse)) for k in kinds]))
    rows.append(("Aligner head: entropy (test-id)", "", "", mean_spread(column("lavender", head(ent)))))
    rows.append(("Aligner head: pointing (test-id)", "", "", mean_spread(column("lavender", head(point)))))
    rows.append(("Aligner head: MSE to the DM map (test-id)", "", "", mean_spread(column("lavender", head(mse)))))
    rows.append(("DM maps of the same words: entropy, pointing (test-id)",
                 f"{dm['entropy']['mean']:.3f}, {dm['pointing']['accuracy']:.3f}" if dm.get("pointing") else "-", "", ""))
    return rows


def markdown_table(rows, header=("measure", "base (toy)", "AR", "Lavender")):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def prepare_world(args, world_seed, world_dir, out, stage):
    """Draw the world of `world_seed` (cached) and extract its DM maps (extract.py, the sd14 code
    path) for every item whose answer names an object; yes/no answers name none: those items train
    with L_VLM alone (train.py counts them). Returns (paths {split: jsonl}, {split: attention dir})."""
    import extract
    stage(f"world {world_seed}: {world_dir}")
    paths = build_world(world_dir, world_seed, args.finetune_items)
    dm = extract.load_dm("toy-sd", path=args.dm_path)
    # extract.py skips complete map files (resume), so key the cache on the DM's weights, the
    # extraction settings and the world (its seed and splits): a retrained toy-sd, other steps or
    # another world's items under the same ids must never reuse stale maps
    key = hashlib.sha256(b"".join(Path(args.dm_path, part).read_bytes() for part in (
        "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"))
        + (Path(world_dir) / "world.json").read_bytes()
        + f"{args.inversion_steps}/{args.denoise_steps}/{args.capture_steps}".encode()).hexdigest()[:10]
    # fine-tuning maps only for the answers of --dm-categories (a folder per choice, so that a cached
    # folder never holds maps of other categories); the test splits always get every map
    attn = {"finetune": out / "attn" / key / f"finetune-{'+'.join(sorted(args.dm_categories))}",
            "test-id": out / "attn" / key / "test-id", "test-ood": out / "attn" / key / "test-ood"}
    for split, folder in attn.items():
        items = [it for it in extract.read_items(paths[split]) if it.get("masks")][:args.limit or None]
        if split == "finetune":
            items = [it for it in items if it["category"] in args.dm_categories]
        stage(f"extract {split}: {len(items)} items")
        extract.extract(items, dm, folder, inversion_steps=args.inversion_steps, denoise_steps=args.denoise_steps,
                        capture_steps=args.capture_steps, batch_size=64, progress=not args.quiet)
    return paths, attn


def finetune(args, data, attn, run_dir, loss, seed, overrides=None):
    """One fine-tuning run (train.train) with the demo's settings and an arm's `overrides` (train.py
    options by their dest name); a finished run of the same settings is reused, not retrained."""
    import train
    config = train_args(data, attn, run_dir, loss, seed, args)
    for name, value in (overrides or {}).items():
        setattr(config, name, value)
    done = Path(run_dir) / "config.json"
    if done.exists() and (Path(run_dir) / ("adapter" if config.peft == "lora" else "model")).is_dir():
        saved = json.loads(done.read_text())
        same = all(saved.get(k) == v for k, v in vars(config).items() if k not in ("overwrite", "progress", "resume"))
        if same and saved.get("data_sha256") == train.file_sha256(data):  # the same world's items too
            return str(run_dir)
    return train.train(config)


def evaluate_runs(args, paths, attn, runs, out, stage):
    """evaluate.py on test-id and test-ood: the base model and every run; {split: report}."""
    import evaluate
    reports = {}
    for split in ("test-id", "test-ood"):
        stage(f"evaluate {split}: base + {len(runs)} runs")
        argv = ["--model", "toy", "--model-path", str(args.vlm_path), "--base", "--data", str(paths[split]),
                "--attn", str(attn[split]), "--out", str(out / f"eval-{split}"), "--batch-size", "50",
                "--figures", "3", "--max-new-tokens", "4"] + [x for r in runs for x in ("--run-dir", r)]
        argv += ["--limit", str(args.limit)] if args.limit else []
        argv += ["--quiet"] if args.quiet else []
        reports[split] = evaluate.evaluate(evaluate.build_parser().parse_args(argv))
    return reports


def demo(args):
    """The README's main command: the whole method on the miniature world; returns the table rows."""
    t0 = time.time()
    out = Path(args.out or ROOT / "toy_out")
    stage = lambda text: print(f"[toy {time.time() - t0:5.0f}s] {text}", flush=True)        # noqa: E731
    paths, attn = prepare_world(args, args.seed, args.world, out, stage)
    # ---- fine-tune: AR and Lavender, the same budget, data and seeds ----
    runs = []
    for seed in args.seeds:
        for loss in ("ar", "lavender"):
            stage(f"fine-tune {loss}, seed {seed}: {args.steps} steps of {args.batch_size}")
            runs.append(finetune(args, paths["finetune"], attn["finetune"], out / "runs" / f"{loss}-s{seed}", loss, seed))
    reports = evaluate_runs(args, paths, attn, runs, out, stage)
    # ---- one table, and toy_report.md ----
    minutes = (time.time() - t0) / 60
    rows = demo_table(reports, args.seeds)
    table = markdown_table(rows)
    print("\n" + table + f"\n\nwall time {minutes:.1f} min; seeds {args.seeds}; {args.steps} steps of batch "
          f"{args.batch_size} per run; reports in {out}/eval-*/report.md")
    if args.report:
        write_report(Path(args.report), table, reports, args, minutes, out)
        stage(f"wrote {args.report}")
    return rows


# ---------------------------------------------------------------------------------------------
# the protocol: several worlds x several seeds, every Lavender arm paired with AR of the same world
# and seed, fixed before looking (README, toy_report.md)
# ---------------------------------------------------------------------------------------------

# Lavender arms, one train.py option each against the defaults (§8's ablations: aggregation Fig.
# 19-20, Aligner pre-training Fig. 21, layers Fig. 22, λ, word sampling §6 (5)); the toy VLM has
# cross-attention at layers 1 and 3, so "first" is [1] and "last" is [3]
ARMS = {"lavender": {}, "mean-mean": {"aggregate": "mean-mean"}, "mean-max": {"aggregate": "mean-max"},
        "max-max": {"aggregate": "max-max"}, "flow-sum": {"aggregate": "flow-sum"},
        "flow-multi": {"aggregate": "flow-multi"}, "pretrain-20": {"pretrain_aligner_steps": 20},
        "layers-first": {"layers": "first"}, "layers-last": {"layers": "last"}, "lam-1": {"lam": 1.0},
        "lam-100": {"lam": 100.0}, "root": {"match": "root"}, "label-words": {"align_words": "label"}}
DATA_SIZES = (40, 80)  # smaller finetune splits (the first N items), AR and Lavender each (§7.4, Fig. 27)
# Chosen after the protocol's first results (toy_report.md), aimed at its failing link (b): the
# model's own attention aligned directly, with no parallel head and no Aligner in between
FOLLOW_UPS = {"own-direct": {"aggregate": "mean-mean", "aligner": "none"}}
MEASURES = {  # name: (split, how a run report gives it)
    "accuracy test-id": ("test-id", lambda r: r["accuracy"]["all"]["accuracy"]),
    "accuracy test-ood": ("test-ood", lambda r: r["accuracy"]["all"]["accuracy"]),
    "own pointing test-id": ("test-id", lambda r: (r.get("pointing") or {}).get("accuracy")),
    "own MSE to DM test-id": ("test-id", lambda r: (r.get("alignment_mse") or {}).get("mean")),
    "own entropy test-id": ("test-id", lambda r: (r.get("vlm_entropy") or {}).get("mean")),
}


def protocol_runs(args, paths, attn, world_out, stage):
    """Every fine-tuning run of one world: {(arm, seed): run dir}; "ar" and the ARMS at the full
    finetune split, "ar-nN" and "lavender-nN" on its first N items (DATA_SIZES)."""
    runs = {}
    for n in DATA_SIZES:  # the first n items: a larger split begins with a smaller one (build_split)
        lines = Path(paths["finetune"]).read_text().splitlines()[:n]
        (Path(paths["finetune"]).parent / f"finetune-{n}.jsonl").write_text("\n".join(lines) + "\n")
    arms = {**ARMS, **(FOLLOW_UPS if args.follow_ups else {})}
    jobs = [("ar", "ar", {}, paths["finetune"])] + [(a, "lavender", o, paths["finetune"]) for a, o in arms.items()]
    jobs += [(f"{loss}-n{n}", loss, {}, Path(paths["finetune"]).parent / f"finetune-{n}.jsonl")
             for n in DATA_SIZES for loss in ("ar", "lavender")]
    for seed in args.seeds:
        for arm, loss, overrides, data in jobs:
            stage(f"fine-tune {arm}, seed {seed}")
            runs[arm, seed] = finetune(args, data, attn["finetune"], world_out / "runs" / f"{arm}-s{seed}", loss,
                                       seed, overrides)
    return runs


def pointing_split(eval_dir):
    """(accuracy on the items whose answer word's own map points at its object, accuracy on the
    items where it misses) from evaluate.py's predictions.jsonl: is a grounded answer a better one?"""
    records = [json.loads(line) for line in (Path(eval_dir) / "predictions.jsonl").read_text().splitlines()]
    hit = [r["correct"] for r in records if r.get("own_pointing") and all(r["own_pointing"])]
    miss = [r["correct"] for r in records if r.get("own_pointing") and not all(r["own_pointing"])]
    return (float(np.mean(hit)) if hit else None, float(np.mean(miss)) if miss else None, len(hit), len(miss))


def as_run(head):
    """A Lavender run's Aligner-head measures (evaluate.py's report["head"]) in a run report's keys."""
    head = head or {}
    return {"accuracy": {"all": {"accuracy": None}}, "pointing": head.get("pointing"),
            "alignment_mse": head.get("alignment_mse"), "vlm_entropy": head.get("entropy")}


def paired(values, arm, base="ar"):
    """Paired differences arm - base over (world, seed): dict(mean, ci95, n, wins) (t interval)."""
    from metrics import t_interval
    diffs = [v[arm] - v[base] for v in values if v.get(arm) is not None and v.get(base) is not None]
    if not diffs:
        return None
    lo, hi = t_interval(diffs, low=-math.inf, high=math.inf)
    return {"mean": float(np.mean(diffs)), "ci95": [lo, hi], "n": len(diffs), "wins": sum(d > 0 for d in diffs)}


def protocol(args):
    """`python toy.py protocol`: every arm in every world and seed; writes <out>/protocol.json and
    prints the paired differences of each measure (arm - AR, same world and seed)."""
    t0 = time.time()
    out = Path(args.out or ROOT / "toy_out" / "protocol")
    stage = lambda text: print(f"[protocol {time.time() - t0:6.0f}s] {text}", flush=True)  # noqa: E731
    rows = []  # one per (world, seed): {"world", "seed", measure: {arm: value}}, plus the DM's
    for world in args.worlds:
        world_out = out / f"world-{world}"
        paths, attn = prepare_world(args, world, world_out / "world", world_out, stage)
        runs = protocol_runs(args, paths, attn, world_out, stage)
        order = list(runs)
        reports = evaluate_runs(args, paths, attn, [runs[k] for k in order], world_out, stage)
        by_run = {split: dict(zip([("base", None)] + order, reports[split]["runs"])) for split in reports}
        dm = reports["test-id"]["dm"]
        for seed in args.seeds:
            row = {"world": world, "seed": seed, "dm pointing test-id": dm["pointing"]["accuracy"],
                   "dm entropy test-id": dm["entropy"]["mean"]}
            for name, (split, pick) in MEASURES.items():
                row[name] = {arm: pick(by_run[split][arm, seed]) for arm, s in order if s == seed}
                row[name]["base"] = pick(by_run[split]["base", None])
                row[name]["lavender head"] = pick(as_run(by_run[split]["lavender", seed].get("head")))
            row["accuracy when own map points / misses (test-id)"] = {
                arm: pointing_split(world_out / "eval-test-id" / Path(runs[arm, seed]).name) for arm, s in order
                if s == seed and arm in ("ar", "lavender")}
            row["accuracy when own map points / misses (test-id)"]["base"] = pointing_split(
                world_out / "eval-test-id" / "base")
            rows.append(row)
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "minutes": (time.time() - t0) / 60,
              "rows": rows, "paired": protocol_table(rows)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps(result, indent=1))
    (out / "protocol.md").write_text(protocol_markdown(result))
    print(protocol_markdown(result))
    stage(f"wrote {out / 'protocol.json'} and protocol.md")
    return result


def protocol_markdown(result):
    """The protocol's tables: per measure, each arm's paired difference against AR (mean [95% t
    interval], arm ahead in k of n pairs), the raw means, and the links of the paper's argument."""
    fmt = lambda d: "-" if not d else f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] {d['wins']}/{d['n']}"  # noqa: E731
    mean = lambda rows, name, arm: np.mean([r[name][arm] for r in rows if r[name].get(arm) is not None])  # noqa: E731
    rows, paired_ = result["rows"], result["paired"]
    names = list(MEASURES)
    lines = [f"{len({r['world'] for r in rows})} worlds x {len({r['seed'] for r in rows})} seeds; cells: mean "
             "difference against AR of the same world and seed [95% t interval], and in how many pairs the "
             "arm's value is the higher", "",
             "| arm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for arm in paired_[names[0]]:
        lines.append(f"| {arm} | " + " | ".join(fmt(paired_[n].get(arm)) for n in names) + " |")
    lines += ["", "Means over every world and seed:", "", "| model | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for arm in ("base", "ar", "lavender", "lavender head", *[f"{k}-n{n}" for n in DATA_SIZES for k in ("ar", "lavender")]):
        lines.append(f"| {arm} | " + " | ".join(f"{mean(rows, n, arm):.3f}" for n in names) + " |")
    lines += ["", f"DM maps (test-id answer words): pointing {np.mean([r['dm pointing test-id'] for r in rows]):.3f}, "
              f"entropy {np.mean([r['dm entropy test-id'] for r in rows]):.3f}", ""]
    lines += [f"- {name}: {fmt(d)}" for name, d in paired_["links"].items()]
    lines += ["", "Is a grounded answer a better one? Test-id accuracy on the items whose answer word's own map "
              "points at its object against the items where it misses (mean over worlds and seeds; the "
              "difference paired by world and seed, base by world):", "",
              "| model | accuracy, map points | accuracy, map misses | items pointing / missing | points - misses |",
              "|---|---|---|---|---|"]
    for model, d in paired_["grounded answers"].items():
        splits = [r["accuracy when own map points / misses (test-id)"][model] for r in rows]
        lines.append(f"| {model} | {np.mean([x[0] for x in splits if x[0] is not None]):.3f} | "
                     f"{np.mean([x[1] for x in splits if x[1] is not None]):.3f} | "
                     f"{np.mean([x[2] for x in splits]):.0f} / {np.mean([x[3] for x in splits]):.0f} | {fmt(d)} |")
    return "\n".join(lines) + "\n"


def protocol_table(rows):
    """{measure: {arm: paired difference vs AR}}, and the links of the paper's argument."""
    table = {}
    for name in MEASURES:
        values = [r[name] for r in rows]
        arms = [a for a in values[0] if a not in ("ar", "base", "lavender head") and not a.startswith(("ar-", "lavender-n"))]
        table[name] = {arm: paired(values, arm) for arm in arms}
        table[name]["base"] = paired(values, "base")
        for n in DATA_SIZES:
            table[name][f"lavender-n{n}"] = paired(values, f"lavender-n{n}", f"ar-n{n}")
    pointing = [dict(r["own pointing test-id"], dm=r["dm pointing test-id"]) for r in rows]
    per_world = list({r["world"]: p for r, p in zip(rows, pointing)}.values())  # base and DM: one value a world
    splits = [r["accuracy when own map points / misses (test-id)"] for r in rows]
    table["grounded answers"] = {}
    for model in ("base", "ar", "lavender"):
        pairs = [{"points": sp[model][0], "misses": sp[model][1]} for sp in
                 (list({r["world"]: sp for r, sp in zip(rows, splits)}.values()) if model == "base" else splits)]
        table["grounded answers"][model] = paired(pairs, "points", "misses")
    table["links"] = {"(a) DM - base own pointing (per world)": paired(per_world, "dm", "base"),
                      "(a) DM - Lavender own pointing": paired(pointing, "dm", "lavender"),
                      "(b) Lavender - base own pointing": paired(pointing, "lavender", "base")}
    return table


def write_report(path, table, reports, args, minutes, out):
    """toy_report.md with the table and the pictures (copied beside it, into toy_report/)."""
    import shutil
    pictures = path.parent / "toy_report"
    pictures.mkdir(exist_ok=True)
    shown = []
    for split in ("test-id", "test-ood"):
        for fig in reports[split]["figures"][:3]:
            name = f"{split}-{Path(fig).name}"
            shutil.copy(out / f"eval-{split}" / fig, pictures / name)
            shown.append(f"![{split} {fig}](toy_report/{name})")
    def relative(v):  # paths inside the repository as the README's commands write them
        if isinstance(v, (str, Path)) and Path(v).is_absolute() and Path(v).resolve().is_relative_to(ROOT):
            return str(Path(v).resolve().relative_to(ROOT))
        return str(v) if isinstance(v, Path) else v
    settings = {k: relative(v) for k, v in vars(args).items()}
    # hand-written notes below the marker (what was tried, by hand) survive a re-run of the demo
    marker = "<!-- notes: kept when the demo rewrites this file -->"
    notes = path.read_text().split(marker, 1)[1] if path.exists() and marker in path.read_text() else "\n"
    path.write_text(
        "# The miniature world: Lavender vs autoregressive fine-tuning\n\n"
        f"Made by `python toy.py` ({minutes:.1f} min on this machine). Mean ± sample std over seeds "
        f"{args.seeds}; accuracy is exact match; entropy App. B eq. 23 (uniform 32x32 = 6.93 nats); pointing: the "
        "argmax of an answer word's map inside the object it names; MSE: VLM map (through the run's Aligner) vs the "
        "DM's. Base = the pre-trained toy VLM before fine-tuning.\n\n" + table + "\n\n"
        "Pictures (evaluate.py): entropy histograms (Fig. 7), and per item the image, the DM map and each model's "
        "map of the answer word (Fig. 8/17).\n\n" + "\n\n".join(shown) + "\n\n"
        f"Settings: `{json.dumps(settings)}`\n\n" + marker + notes)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="demo",
                   choices=("demo", "protocol", "build", "train-sd", "train-vlm", "measure-sd"),
                   help="demo (default): the whole method end to end; build: draw the world only; "
                        "protocol: every arm over --worlds x --seeds, paired against AR; "
                        "train-sd / train-vlm: retrain the shipped base models; measure-sd: toy-sd pointing accuracy")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and of the base models' training")
    p.add_argument("--world", default=str(ROOT / "toy_out" / "world"), help="where the world is drawn (a cache)")
    p.add_argument("--out", default=None, help="output folder (demo: toy_out; train-sd: toy_models/toy-sd; "
                                               "train-vlm: toy_models/toy-vlm; measure-sd: toy_out/measure-sd)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    # ---- base models ----
    p.add_argument("--dm-path", default=str(TOY_MODELS / "toy-sd"), help="toy-sd folder (diffusers layout)")
    p.add_argument("--vlm-path", default=str(TOY_MODELS / "toy-vlm"), help="toy VLM folder (save_pretrained)")
    p.add_argument("--base-steps", type=int, default=None, help="train-sd / train-vlm: training steps (2400 / 1200)")
    p.add_argument("--init-from", default=None, help="train-sd: continue from this toy-sd folder (its VAE stays frozen)")
    p.add_argument("--sd-lr", type=float, default=1e-3, help="train-sd: peak learning rate (warm-up + cosine)")
    p.add_argument("--save-every", type=int, default=400, help="train-sd: save a step<N>/ checkpoint every N steps")
    # ---- extraction (extract.py) ----
    p.add_argument("--inversion-steps", type=int, default=5, help="DDIM inversion steps (extract.py)")
    p.add_argument("--denoise-steps", type=int, default=5, help="denoising steps after the inversion (extract.py)")
    p.add_argument("--capture-steps", default="denoise", choices=("denoise", "inversion", "all"),
                   help="steps whose cross-attention is averaged (extract.py)")
    # ---- fine-tuning (train.py): the same for AR and Lavender ----
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds (each runs AR and Lavender)")
    p.add_argument("--worlds", type=int, nargs="+", default=[0, 1, 2], help="protocol: the world seeds")
    p.add_argument("--follow-ups", action=argparse.BooleanOptionalAction, default=False,
                   help="protocol: also the FOLLOW_UPS arms (chosen after the first results, reported as such)")
    p.add_argument("--finetune-items", type=int, default=None,
                   help="size of the world's finetune split (default 160; another size draws another world: use its own --world)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per fine-tuning run")
    p.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    p.add_argument("--peft", default="lora", choices=("lora", "full"), help="LoRA (paper) or full fine-tuning")
    p.add_argument("--lam", type=float, default=10.0, help="λ of eq. 10")
    p.add_argument("--aggregate", default="learn", help="train.py --aggregate (learn, mean-mean, ...)")
    p.add_argument("--aligner", default="sim", help="train.py --aligner (sim, light, deep, mlp, none)")
    p.add_argument("--aligner-mode", default="auto", help="train.py --aligner-mode (auto, per-layer, after)")
    p.add_argument("--align-words", default="predicted", help="train.py --align-words (predicted, label)")
    p.add_argument("--pretrain-aligner-steps", type=int, default=0, help="Lavender runs: Aligner pre-training steps")
    p.add_argument("--dm-categories", nargs="+", default=["colour", "shape"], choices=("colour", "shape"),
                   help="fine-tuning items whose answer gets a DM map; the others train with L_VLM alone. 'colour' "
                        "alone aligns only the words toy-sd localises (like the release's adjectives-only filter)")
    # ---- demo output ----
    p.add_argument("--limit", type=int, default=0, help="extract and evaluate only the first N items of each split (quick test; 0: all)")
    p.add_argument("--report", default=str(ROOT / "toy_report.md"), help="where the demo writes its report ('' for none)")
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False, help="no progress bars")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "build":
        paths = build_world(args.world, args.seed)
        print(f"world: {', '.join(f'{k}={v}' for k, v in paths.items())}")
    elif args.command == "train-sd":
        train_sd(args.out or TOY_MODELS / "toy-sd", args.world, seed=args.seed, steps=args.base_steps or 2400,
                 lr=args.sd_lr, save_every=args.save_every, init_from=args.init_from)
    elif args.command == "train-vlm":
        train_vlm(args.out or TOY_MODELS / "toy-vlm", args.world, seed=args.seed, steps=args.base_steps or 1200)
    elif args.command == "measure-sd":
        result = measure_sd(args.dm_path, args.world, args.out or ROOT / "toy_out" / "measure-sd", seed=args.seed,
                            inversion_steps=args.inversion_steps, denoise_steps=args.denoise_steps,
                            capture_steps=args.capture_steps)
        print(f"toy-sd pointing: {json.dumps(result)}")
    elif args.command == "protocol":
        return protocol(args)
    else:
        return demo(args)


if __name__ == "__main__":
    main()
