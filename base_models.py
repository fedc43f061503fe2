"""The miniature world's base models, pre-trained here because none can be downloaded: toy-sd
(SD's diffusers parts at models.py's toy-sd size) and the toy VLM (the llama32 classes at the toy
size), the stand-ins for Stable Diffusion and Llama-3.2-Vision, and the probes that measure them.
The weights they write are the shipped toy_models/; toy.py's demo fine-tunes from them.

  - toy-sd: a VAE fitted briefly, then the UNet and a CLIP text encoder trained together on
    prompts about the pretrain split's scenes (sd_prompt: whole captions, one object's phrase, one
    colour, one cell), with LOCALISE x a localisation loss on the colour words' cross-attention
    beside the denoising MSE (localisation_loss); saved in the diffusers component layout, so that
    extract.py runs the sd14 path. Probe: pointing of its extracted maps (measure_sd).
    Why it was flat without that loss (measured on world v5; toy_report.md): the text barely
    entered its denoising (the MSE with a scene's own caption, another's, or none differed by at
    most 1.3% at t = 200-950), so nothing asked its cross-attention to choose pixels: a word's
    share of each pixel's attention was the same everywhere to about 0.01 (raw map 6.9312 nats,
    uniform 6.9315), pointing 0.35, entropy 6.82 after min-max against the base VLM's own 5.46.
    v-prediction, one-word prompts, masking the padding tokens and longer training moved that
    share by a few hundredths, of either sign from run to run. SD v1.4 learned where its words
    are from billions of captioned images, which two CPU cores cannot give a 1M-parameter UNet.
    What it has instead: (1) the masks teach it, as FastComposer (Xiao et al. 2023) teaches a
    diffusion model to localise its prompted subjects: the loss asks each colour word's map to be
    high on its object and low elsewhere, lowest on the scene's other objects; (2) the UNet has SD
    v1.4's layout, cross-attention at every level, the finest included (32x32 and 16x16 blocks,
    the 8x8 middle block), since with 16x16 and 8x8 layers alone a third of a word's map lay in a
    2-pixel ring around its object (the resampling of 2-pixel cells); extraction reads the 32x32
    layers. On world 0's
    test-id answers it points 0.92 with entropy 5.08, below the base VLM's own 5.46, and its
    denoising MSE rises from 0.034 to 0.057: a worse image model, a far better pointer. So the
    paper's premise that the teacher points holds here by construction; the world tests whether
    alignment transmits it.
  - toy VLM: every weight pre-trained on the pretrain split with the next-token loss, each batch
    drawn a kind then an item: it perceives every asked attribute on one-object images (1.00 on
    test-one for both kinds) but has never had to select one object among several, the skill
    fine-tuning can teach. Probes: VQA accuracy per kind (kind_accuracy), and the attention
    ceiling (attention_ceiling): its answers when the cross-attention of the row that predicts the
    answer is steered to the asked object, which says whether an attention target can help at all.

    python toy.py train-sd --seed 0   # retrain toy_models/toy-sd (1500 steps of 16, 12 min, 1 core)
    python toy.py train-vlm --seed 0  # retrain toy_models/toy-vlm
    python toy.py measure-sd          # toy-sd pointing on held-out images (colour and cell words apart)
"""
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import aggregate
import data
import evaluate
import extract
import models
import nulltext
import teachers
import world
from aligner import min_max
from capture import answer_rows
from metrics import score_prediction

# ---------------------------------------------------------------------------------------------
# toy-sd: SD's diffusers parts at models.py's toy-sd size, trained on the world's captions
# ---------------------------------------------------------------------------------------------

def toy_sd_tokenizer(extra=""):
    """toy-sd's CLIPTokenizer (models.clip_tokenizer): the world's words one token each, any other
    word in letters (and the characters of `extra`); texts padded with the end token, like SD
    1.x, to its 24 positions (SD: 77)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz" + "".join(world.PUNCTUATION) + extra
    positions = models.SD_SIZES["toy-sd"]["text_encoder"]["max_position_embeddings"]
    return models.clip_tokenizer(world.world_words(), alphabet, max_length=positions)


def fit_base(params, loss_of_step, steps, lr, desc, after_step=None):
    """The base models' plain loop: AdamW (weight decay 0.01), a linear warm-up over 100 steps then a
    cosine to 0 at `steps`, gradients clipped at norm 1. loss_of_step(step) -> the step's loss;
    after_step(step) runs after each step (checkpoints). Returns the per-step losses."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    bar = tqdm(range(steps), desc=desc)
    log = []
    for step in bar:
        loss = loss_of_step(step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(log[-50:]):.4f}")
        if after_step:
            after_step(step)
    return log


def load_images(items, root):
    """(N, 3, 32, 32) float in [-1, 1] for the distinct images of items (order of first appearance)."""
    paths = list(dict.fromkeys(str(Path(root) / it["image"]) for it in items))
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])   # (N, 32, 32, 3)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1, paths


@torch.no_grad()
def vae_latents(vae, images):
    """(latent means (N, 4, 32, 32), the L1 error of their reconstruction) of a VAE on the images."""
    latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    recon = torch.cat([vae.decode(latents[i:i + 256]).sample for i in range(0, len(latents), 256)])
    return latents, float(F.l1_loss(recon, images))


def train_vae(vae, images, steps=300, batch=32, lr=2e-3, seed=0):
    """Fit the VAE briefly: L1 reconstruction + a small KL term (as SD's VAE, without the GAN); then
    frozen, with the scaling factor that gives unit-variance latents (as SD's 0.18215)."""
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
    latents, l1 = vae_latents(vae, images)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return latents * vae.config.scaling_factor, l1


def train_sd(out_dir, world_dir, seed=0, steps=1500, batch=16, lr=1e-3, vae_steps=300, save_every=300,
             init_from=None, localise=None):
    """Train toy-sd on the pretrain split's captions; save it in diffusers layout under out_dir.

    Prompts in the forms extraction conditions on (sd_prompt), the denoising MSE plus `localise`
    (default LOCALISE) x the localisation loss (fit_unet; the module docstring says why).
    init_from: a toy-sd folder to continue from (its unet/, vae/, text_encoder/). Its VAE is kept
    frozen with its scaling factor, as the original schedule freezes the VAE after its own phase,
    so no VAE step runs; the UNet and text encoder get a fresh AdamW and warm-up + cosine over
    `steps`."""
    localise = LOCALISE if localise is None else localise
    torch.manual_seed(seed)
    paths = world.build_world(world_dir, seed)
    scenes = list({it["image"]: it for it in map(json.loads, open(paths["pretrain"]))}.values())  # one per image
    images, _ = load_images(scenes, world_dir)
    dm = models.stable_diffusion("toy-sd", toy_sd_tokenizer(), seed)
    t0 = time.time()
    if init_from:  # continue a shipped or earlier toy-sd
        loaded = models.load_dm_folder(init_from)
        dm.update(unet=loaded["unet"], text_encoder=loaded["text_encoder"], vae=loaded["vae"].eval().requires_grad_(False))
        latents, vae_l1 = vae_latents(dm["vae"], images)
        latents, vae_steps = latents * dm["vae"].config.scaling_factor, 0  # (N, 4, 32, 32), the saved factor
    else:
        latents, vae_l1 = train_vae(dm["vae"], images, steps=vae_steps, seed=seed)  # (N, 4, 32, 32)
    log, denoise_log = fit_unet(dm, latents, [s["objects"] for s in scenes], steps, batch, lr, seed,
                                save_every, out_dir, localise)
    models.save_dm(dm, out_dir)
    summary = {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "init_from": str(init_from) if init_from else None,
               "vae_steps": vae_steps, "vae_l1": round(vae_l1, 4),
               "localise": localise, "final_loss": round(float(np.mean(log[-100:])), 4),
               "final_denoise_mse": round(float(np.mean(denoise_log[-100:])), 4),
               "minutes": round((time.time() - t0) / 60, 1),
               "unet_params": sum(p.numel() for p in dm["unet"].parameters()),
               "text_params": sum(p.numel() for p in dm["text_encoder"].parameters())}
    (Path(out_dir) / "training.json").write_text(json.dumps(summary, indent=2))
    print(f"toy-sd: {summary}")
    return Path(out_dir)


PROMPT_MIX = (0.4, 0.2, 0.2, 0.2)  # toy-sd's prompts: caption, one object's phrase, colour, cell


def sd_prompt(objects, rng):
    """One training prompt for a scene, drawn with PROMPT_MIX: its whole caption, one object's
    phrase ("red at top left"), one object's colour ("red") or cell ("top left"), the answers'
    forms. Extraction conditions toy-sd on an item's answer: a model trained on whole captions
    alone never saw such a prompt (world v1: one-word answers pointed 0.62, the caption 0.86)."""
    kind = rng.choice(len(PROMPT_MIX), p=PROMPT_MIX)
    o = objects[rng.integers(len(objects))]
    return (world.caption(objects), f"{o['colour']} at {o['cell']}", o["colour"], o["cell"])[kind]


# weight of toy-sd's localisation loss (localisation_loss) beside the denoising MSE
LOCALISE = 0.3


def colour_masks(scenes):
    """(N, n_colours, 32, 32) float: each scene's object masks by colour (world.COLOURS order; zero
    where the scene has no object of that colour), the localisation loss's targets."""
    masks = torch.zeros(len(scenes), len(world.COLOURS), world.SIZE, world.SIZE)
    for i, objects in enumerate(scenes):
        for o, m in zip(objects, world.render(objects)[1]):
            masks[i, list(world.COLOURS).index(o["colour"])] = torch.from_numpy(m).float()
    return masks


def region_mean(maps, region):
    """(K,) the mean of each map over its region (0 where the region is empty); both (K, 32, 32)."""
    return (maps * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1)


def localisation_loss(maps, ids, masks, colour_ids):
    """FastComposer's balanced localisation loss (Xiao et al. 2023) on the colour words, with a
    term for the distractors: for each colour token of a prompt whose object is drawn, the mean of
    its map outside its object, plus its mean on the scene's other objects, minus its mean inside,
    so that the named object's pixels attend to its word and no other pixel does, least of all
    another object's. A map that is 1 on its object and 0 elsewhere gives -1.
    maps: (B, T, 32, 32) each pixel's attention share on each text position, the mean over the
    cross-attention layers (extract.py's capture); ids: (B, T);
    masks: (B, n_colours, 32, 32) colour_masks; colour_ids: (n_colours,) the colour words' ids."""
    is_colour = ids[:, :, None] == colour_ids[None, None]                 # (B, T, n_colours)
    # one row per colour token
    b, t, c = is_colour.nonzero(as_tuple=True)
    mask = masks[b, c]                                                    # (K, 32, 32)
    # the scene's other objects
    others = (masks[b].sum(1) - mask).clamp(0, 1)
    present = mask.flatten(1).sum(1) > 0
    if not present.any():
        return maps.sum() * 0
    m, mask, others = maps[b, t][present], mask[present], others[present]
    loss = region_mean(m, 1 - mask) + region_mean(m, others) - region_mean(m, mask)
    return loss.mean()


def fit_unet(dm, latents, scenes, steps, batch, lr, seed, save_every, out_dir, localise=LOCALISE):
    """The UNet and the text encoder trained together (there is no pretrained CLIP here) on the
    latents and prompts about their scenes (sd_prompt): DDPM noise, epsilon prediction, MSE, plus
    `localise` x the localisation loss on the colour words' cross-attention maps (why: the module
    docstring). Every `save_every` steps a step<N>/ folder is saved under out_dir. Returns the
    per-step losses, the total and the denoising MSE alone."""
    from diffusers import DDPMScheduler
    unet, text_encoder, tokenizer = dm["unet"], dm["text_encoder"], dm["tokenizer"]
    noise_scheduler = DDPMScheduler.from_config(dm["scheduler"].config)
    params = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    masks = colour_masks(scenes)                                          # (N, n_colours, 32, 32)
    colour_ids = torch.tensor(tokenizer.convert_tokens_to_ids([c + "</w>" for c in world.COLOURS]))
    denoise_log = []
    unet.train()
    text_encoder.train()

    def loss_of_step(step):
        idx = torch.randint(len(latents), (batch,), generator=g)
        prompts = [sd_prompt(scenes[i], rng) for i in idx.tolist()]
        ids = teachers.token_ids(tokenizer, text_encoder, prompts, "cpu")  # (B, T)
        x0 = latents[idx]  # (B, 4, 32, 32)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=g)
        context = text_encoder(ids).last_hidden_state
        # every cross-attention layer (32x32, 16x16, the 8x8 middle block) learns to localise;
        # extraction reads the 32x32 ones (models.PRESETS)
        store = extract.new_store(latents.shape[-2:], tokenizer.model_max_length, None)
        with extract.capturing(unet, store):
            noisy = noise_scheduler.add_noise(x0, noise, t)
            predicted = unet(noisy, t, encoder_hidden_states=context).sample
        denoise = F.mse_loss(predicted, noise)  # epsilon prediction (DDPM)
        denoise_log.append(denoise.item())
        maps = store["sum"] / store["count"]                              # (B, T, 32, 32)
        return denoise + localise * localisation_loss(maps, ids, masks[idx], colour_ids)

    def save(step):
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            models.save_dm(dm, Path(out_dir) / f"step{step + 1}")
    return fit_base(params, loss_of_step, steps, lr, "toy-sd unet", save), denoise_log


def dm_pointing(items, attn_dir):
    """Pointing accuracy of extracted DM maps: the share of (item, word) with a mask whose map's
    argmax falls inside the word's object (evaluate.pointing_hit). Returns dict(accuracy, hits, n,
    colour, shape, entropy): colour and shape are the accuracies over colour words and over shape
    words alone (they can differ a lot: models.SD_SIZES), entropy the mean of the maps' entropies
    (evaluate.attention_entropy, App. B eq. 23)."""
    hits = []  # (hit, the word, entropy of its map)
    for it in items:
        maps, words = data.read_maps(attn_dir, it["id"]) if it.get("masks") else (None, None)  # (n_words, 32, 32)
        if maps is None:
            continue
        regions = data.item_regions(it, Path(it["image_path"]).parent.parent, lambda w: w)
        for word, region in regions.items():
            if word in words:
                m = maps[words.index(word)]
                hits.append((evaluate.pointing_hit(m, region), word, float(evaluate.attention_entropy(m))))
    share = lambda hs: round(float(np.mean(hs)), 4) if hs else float("nan")  # noqa: E731
    return {"accuracy": share([h for h, _, _ in hits]), "hits": int(sum(h for h, _, _ in hits)), "n": len(hits),
            "colour": share([h for h, w, _ in hits if w in world.COLOURS]),
            "cell": share([h for h, w, _ in hits if w in {x for c in world.CELLS for x in c.split()}]), "entropy": share([e for _, _, e in hits])}


def measure_sd(dm_path, world_dir, out_dir, n=None, seed=0, name="toy-sd", **extract_kwargs):
    """Extract the maps of toy-sd (or another toy teacher `name`, toy_teachers.py) for held-out
    captions and for the test-id answers of the world drawn with `seed`, and return their
    pointing accuracy: {"captions": {...}, "answers": {...}}."""
    paths = world.build_world(world_dir, seed)
    dm = models.load_dm(name, path=dm_path)
    extract_kwargs = {"layers": models.PRESETS[name]["layers"], **extract_kwargs}
    result = {}
    for key, split in (("captions", "test-captions"), ("answers", "test-id")):
        items = [it for it in data.read_items(paths[split]) if it.get("masks")][:n]
        extract.extract(items, dm, Path(out_dir) / split, batch_size=32, **extract_kwargs)
        result[key] = dm_pointing(items, Path(out_dir) / split)
    return result


@torch.no_grad()
def prompt_effect(dm_path="toy_models/toy-sd", world_dir="toy_out/world", n=256, seed=0,
                  timesteps=(200, 500, 800, 950)):
    """{t: {"caption", "another", "empty"}}: toy-sd's denoising MSE (epsilon) on the first n
    pretrain scenes of world `seed` at each timestep, conditioned on each scene's own caption,
    on another scene's, and on the empty prompt (the same noise for the three): how much the text
    enters its denoising at all.

        python -c "import base_models; print(base_models.prompt_effect())"   # ~1 CPU min
    """
    from diffusers import DDPMScheduler
    paths = world.build_world(world_dir, seed)
    scenes = list({it["image"]: it for it in data.read_items(paths["pretrain"])}.values())[:n]
    dm = models.load_dm("toy-sd", path=dm_path)
    images, _ = load_images(scenes, world_dir)
    latents = dm["vae"].encode(images).latent_dist.mean * dm["vae"].config.scaling_factor
    scheduler = DDPMScheduler.from_config(dm["scheduler"].config)
    captions = [world.caption(s["objects"]) for s in scenes]
    prompts = {"caption": captions, "another": captions[1:] + captions[:1], "empty": [""] * n}
    result = {}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(t))
        noisy = scheduler.add_noise(latents, noise, torch.tensor([t]))
        result[t] = {}
        for name, texts in prompts.items():
            ids = teachers.token_ids(dm["tokenizer"], dm["text_encoder"], texts, "cpu")
            context = dm["text_encoder"](ids)[0]
            predicted = dm["unet"](noisy, t, encoder_hidden_states=context).sample
            result[t][name] = round(F.mse_loss(predicted, noise).item(), 5)
    return result


def measure_null_text(dm_path="toy_models/toy-sd", world_dir="toy_out/world", n=96, seed=0):
    """extract.py's --inversion ddim against null-text on toy-sd, world `seed`'s first n held-out
    captions with masks: CPU seconds and pointing of each (dm_pointing, the words with a mask),
    the mean absolute difference of each answer word's two maps, and reconstruction_errors on the
    first 32 images.

        python -c "import base_models; print(base_models.measure_null_text())"   # ~2 CPU min
    """
    items = [it for it in data.read_items(world.build_world(world_dir, seed)["test-captions"])
             if it.get("masks")][:n]
    dm, result = models.load_dm("toy-sd", path=dm_path), {}
    with tempfile.TemporaryDirectory() as out:
        for inversion in extract.INVERSIONS:
            t0 = time.process_time()
            extract.extract(items, dm, Path(out) / inversion, batch_size=32, progress=False,
                            inversion=inversion, layers=models.PRESETS["toy-sd"]["layers"])
            result[inversion] = dict(dm_pointing(items, Path(out) / inversion),
                                     cpu_s=round(time.process_time() - t0, 1))
        maps = {inv: [data.read_maps(Path(out) / inv, it["id"])[0] for it in items]
                for inv in extract.INVERSIONS}
    mad = torch.cat([(a - b).abs().mean(dim=(1, 2)) for a, b in zip(*maps.values())])  # per map
    result["maps"] = {"mean_abs_difference": round(mad.mean().item(), 4), "n": len(mad),
                      "max": round(mad.max().item(), 4)}
    result["reconstruction"] = reconstruction_errors(dm, items[:32])
    return result


@torch.no_grad()
def reconstruction_errors(dm, items, steps=5, w=nulltext.GUIDANCE):
    """MSE to the images' latents z*_0 of the latent that denoising from their DDIM inversion
    reaches (one grid of `steps` both ways): at guidance 1 (--inversion ddim's own step), at w
    with the empty prompt, at w with null-text's tuned embeddings."""
    images = torch.stack([data.load_image(it["image_path"], dm["res"]) for it in items])
    x0 = dm["vae"].encode(images).latent_dist.mean * dm["vae"].config.scaling_factor  # z*_0
    ids = dm["tokenizer"]([it["answer"] for it in items], padding="max_length", truncation=True,
                          max_length=dm["text_encoder"].config.max_position_embeddings,
                          return_tensors="pt").input_ids
    unet, context = dm["unet"], dm["text_encoder"](ids)[0]                   # (B, T, D)
    null = nulltext.empty_prompt(dm, len(items))                             # ∅ untuned (B, T, D)
    inverse, forward = extract.ddim_grids(dm["scheduler"], steps, steps)
    pivot = nulltext.ddim_pivot(unet, x0, context, inverse)                  # z*_0 ... z*_T

    def guided(scale):  # from z*_T, the empty prompt's embedding at every step
        return nulltext.guided_denoise(unet, pivot[-1], context, [null] * steps, forward, scale)
    ends = {"ddim, guidance 1": guided(1.0), f"empty prompt, guidance {w}": guided(w),
            f"null-text, guidance {w}": nulltext.null_text_inversion(unet, pivot, context, null,
                                                                     forward, w)[1]}
    return {name: round((z - x0).pow(2).mean().item(), 5) for name, z in ends.items()}


# ---------------------------------------------------------------------------------------------
# the attention ceiling: what the toy VLM answers when its cross-attention looks at the right object
# ---------------------------------------------------------------------------------------------

class SteeredAttention:
    """transformers' attention interface (registered as NAME): eager attention everywhere, except
    in the cross-attention layers at the rows set in `rows` (B,), one text position per sample,
    where the probabilities become (1 - alpha) p + alpha m, m = `targets` (B, n_image_tokens), a
    distribution over the image tokens; `layers`: the text layers steered (None: every
    cross-attention layer). The layer's values, output projection and gate are its own: only where
    it looks changes."""
    NAME = "lavender-steered"

    def __init__(self):
        self.rows, self.targets, self.alpha, self.layers = None, None, 0.0, None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from transformers.models.mllama import modeling_mllama as mllama
        out, weights = mllama.eager_attention_forward(module, query, key, value, attention_mask,
                                                      scaling=scaling)  # (B, T, H, d), (B, H, T, N)
        if (self.rows is None or self.alpha == 0 or not isinstance(module, mllama.MllamaTextCrossAttention)
                or (self.layers is not None and module.layer_idx not in self.layers)):
            return out, weights
        b, a = torch.arange(weights.shape[0]), self.alpha
        weights = weights.clone()  # the steered rows, (B, H, N):
        weights[b, :, self.rows] = (1 - a) * weights[b, :, self.rows] + a * self.targets[:, None].to(weights)
        values = mllama.repeat_kv(value, module.num_key_value_groups)  # (B, H, N, d)
        return torch.matmul(weights, values).transpose(1, 2).contiguous(), weights


STEERED = SteeredAttention()


def register_steered():
    """SteeredAttention under its name in transformers' attention interface, with eager attention's
    masks (an implementation name without a mask function gets no causal mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(SteeredAttention.NAME, STEERED)
    AttentionMaskInterface.register(SteeredAttention.NAME, eager_mask)


def mask_targets(items, patch=4):
    """(B, 1 + P²) the share of each item's answer object in each patch of the toy VLM's one tile
    (its CLS token first, weight 0), from the item's mask: where an ideal look at the object goes."""
    targets = []
    for it in items:
        (mask,) = data.item_regions(it, Path(it["image_path"]).parent.parent, lambda w: w).values()  # (32, 32)
        share = F.avg_pool2d(torch.from_numpy(mask).float()[None, None], patch).flatten()  # (P², ) reading order
        targets.append(torch.cat([torch.zeros(1), share / share.sum()]))
    return torch.stack(targets)


@torch.no_grad()
def attention_ceiling(model, processor, items, alphas=(0.0, 1.0), layers=None, batch_size=50):
    """{alpha: accuracy}: the answer's first token, teacher-forced, when the cross-attention layers
    (`layers`, text layer indices; None: all) read the answer's prediction row steered to the asked
    object (SteeredAttention; alpha 0 = the model as it is). Near 1 at alpha 1 while low at 0: the
    answers fail at selecting the object, which an attention target can teach; near alpha 0's: the
    model does not read the object through cross-attention and no attention target can help."""
    register_steered()
    items = [it for it in items if len(it.get("masks") or {}) == 1]
    config = model.config.get_text_config()
    before, config._attn_implementation = config._attn_implementation, SteeredAttention.NAME
    STEERED.layers = layers
    hits = {a: 0 for a in alphas}
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = data.collate(processor, chunk)
            rows = answer_rows(batch["labels"])[:, 0]  # (B,) predicts the answer's first token
            gold = batch["input_ids"][torch.arange(len(chunk)), rows + 1]
            STEERED.rows, STEERED.targets = rows, mask_targets(chunk)
            for a in alphas:
                STEERED.alpha = a
                logits = model(**data.model_inputs(batch)).logits
                hits[a] += int((logits[torch.arange(len(chunk)), rows].argmax(-1) == gold).sum())
    finally:
        config._attn_implementation, STEERED.rows, STEERED.alpha, STEERED.layers = before, None, 0.0, None
    return {a: round(hits[a] / max(len(items), 1), 4) for a in alphas}


@torch.no_grad()
def raw_entropies(model, processor, dm, items, batch_size=16, inversion_steps=5, denoise_steps=5):
    """{"dm": {"raw", "min-max"}, "vlm": {"raw", "min-max"}}: the mean entropy (nats, evaluate.py's
    attention_entropy) of the answer word's map before and after min-max normalisation, on both
    sides. The floor min-max sets to 0 is what makes a flat map look peaked: a map of near-equal
    values spans [0, 1] after it. DM: extract.py's word map without the normalisation; VLM: its own
    attention at the row that predicts the answer's first token, mean over heads and every
    cross-attention layer (aggregate.token_maps, evaluate.py's ruler). Items of one-word answers."""
    entropies = {"dm": [], "vlm": []}  # (raw, min-max) per item
    capture = aggregate.AttentionCapture(model, aggregate.aligned_layers(model))
    layers = models.PRESETS["toy-sd"]["layers"]  # the maps extraction stores
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            answers = [it["answer"] for it in chunk]
            positions = [extract.text_words(dm["tokenizer"], a)[1] for a in answers]
            columns = extract.context_columns(positions)
            images = torch.stack([data.load_image(it["image_path"], dm["res"]) for it in chunk])
            attention = extract.dm_attention(dm, images, answers, columns, inversion_steps,
                                             denoise_steps, layers=layers)
            for b, p in enumerate(positions):
                raw = extract.word_maps(attention[b], extract.word_weights(p, columns), normalise=False)[0]
                entropies["dm"].append((raw, min_max(raw)))
            batch = data.collate(processor, chunk)
            capture.set_rows(answer_rows(batch["labels"])[:, :1])  # (B, 1)
            model(**data.model_inputs(batch))
            maps = aggregate.token_maps(capture.probs, batch, aggregate.vision_geometry(model), "mean-mean")
            entropies["vlm"] += [(m, min_max(m)) for m in maps[:, 0]]  # (32, 32) each
    finally:
        capture.remove()
    mean = lambda maps: round(float(evaluate.attention_entropy(torch.stack(maps)).mean()), 4)  # noqa: E731
    return {side: {"raw": mean([r for r, _ in pairs]), "min-max": mean([m for _, m in pairs])}
            for side, pairs in entropies.items()}


# ---------------------------------------------------------------------------------------------
# toy: the llama32 classes at models.py's toy size, pre-trained on the world
# ---------------------------------------------------------------------------------------------

def toy_vlm_tokenizer():
    """Byte-level BPE (as Llama 3's) with Llama-3.2-Vision's special tokens, over the world's words."""
    tokenizer = models.bpe_tokenizer(world.world_corpus(), vocab_size=1000)
    for word in world.world_words():
        for form in (word, " " + word):
            assert len(tokenizer.tokenize(form)) == 1, f"world word {form!r} is not one VLM token"
    return tokenizer


def toy_vlm(seed=0):
    """(model, processor) at models.MLLAMA_SIZES["toy"] with the world's tokenizer, random weights."""
    return models.small_vlm("toy", toy_vlm_tokenizer(), seed)


def kind_accuracy(model, processor, items, batch_size=64):
    """{"all": accuracy, kind: accuracy, ...}: exact match of greedy answers, scored as evaluate.py
    scores them, over every item and per item category."""
    answers = evaluate.generate_answers(model, processor, items, batch_size=batch_size, max_new_tokens=6, show=False)
    correct = {}
    for a, it in zip(answers, items):
        hit = score_prediction(a, it["answer"], it["question"])["correct"]
        correct.setdefault("all", []).append(hit)
        correct.setdefault(it["category"], []).append(hit)
    return {k: round(float(np.mean(v)), 4) for k, v in correct.items()}


def train_vlm(out_dir, world_dir, seed=0, steps=1000, batch=32, lr=1e-3, init_from=None):
    """Pre-train the toy Mllama on the pretrain split: every weight, next-token loss on the answers
    (eq. 6), batches from data.collate (the fine-tuning data path), a plain loop (world-building).

    Each batch draws a question kind uniformly, then an item of that kind: drawn by item, captions
    and counts (every image has them) outweighed the one-object questions, and the model answered
    every texture question "striped" (0.19 on test-one) although a linear probe on its vision
    features read texture at 0.96. init_from: a toy-vlm folder to continue from."""
    paths = world.build_world(world_dir, seed)
    items = data.read_items(paths["pretrain"])
    by_kind = {}
    for it in items:
        by_kind.setdefault(it["category"], []).append(it)
    kinds = sorted(by_kind)
    tests = {s: data.read_items(paths[s]) for s in ("test-one", "test-id", "test-ood")}
    model, processor = toy_vlm(seed)
    if init_from:
        model, processor = models.load_vlm("toy", path=str(init_from))[:2]
    rng = np.random.default_rng(seed)
    t0 = time.time()
    model.train()

    def loss_of_step(step):
        drawn = [by_kind[kinds[k]] for k in rng.integers(len(kinds), size=batch)]
        picked = data.collate(processor, [pool[rng.integers(len(pool))] for pool in drawn])
        return model(**data.model_inputs(picked), labels=picked["labels"]).loss
    log = fit_base(list(model.parameters()), loss_of_step, steps, lr, "toy vlm")
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)  # saved first: the probe below is extra
    processor.save_pretrained(out_dir)
    summary = {"seed": seed, "steps": steps, "batch": batch, "final_loss": round(float(np.mean(log[-100:])), 4),
               "params": sum(p.numel() for p in model.parameters()), "minutes": round((time.time() - t0) / 60, 1),
               **{f"acc_{s}": kind_accuracy(model, processor, v) for s, v in tests.items()}}
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2))
    print(f"toy vlm: {summary}")
    return out_dir
