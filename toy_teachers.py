"""The miniature world's diffusion teachers, trained here because none can be downloaded: toy-sd
(SD's diffusers parts at models.py's toy-sd size), the stand-in for Stable Diffusion v1.4, and
toy counterparts of the other teachers, SD 2.x- and SDXL-style UNets and an SD3-style DiT,
trained by toy-sd's recipe, so that "does another teacher's architecture give better targets?"
can be asked on a CPU (teachers.py and mmdit.py hold the real presets). The weights they write
are the shipped toy_models/.

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
    layers. On world 0's test-id answers it points 0.92 with entropy 5.08, below the base VLM's
    own 5.46, and its denoising MSE rises from 0.034 to 0.057: a worse image model, a far better
    pointer. So the paper's premise that the teacher points holds here by construction; the
    world tests whether alignment transmits it.


Each stand-in keeps what makes its family differ from SD v1.4 and shrinks the rest:
  - toy-sd21 (SD 2.x, teachers.py): toy-sd's UNet and attention places (32x32, 16x16, 8x8)
    with SD 2's block features (linear projections, upcast attention, head counts growing with
    depth at one head width: 1, 2, 4 heads of 16 channels, as SD 2's 5, 10, 20 of 64), a gelu
    text encoder (OpenCLIP's activation) whose tokenizer pads with "!", and v-prediction: the
    UNet regresses v = alpha_t noise - sigma_t x_0, not the noise.
  - toy-sdxl (SDXL, teachers.py): two CLIP text encoders of different widths whose penultimate
    states are concatenated into the context (32 + 48 = 80 channels), "text_time" added
    conditioning (encoder 2's pooled projection and the 6 size ids), linear projections in the
    transformer blocks, more transformer layers deeper (1, 2), and cross-attention at the inner
    two levels only (16x16 and 8x8 of the 32x32 latent, as SDXL has it at 64x64 and 32x32 of
    128x128, none at the outermost); DDPM epsilon prediction.
  - toy-sd3 (SD3, mmdit.py): SD3Transformer2DModel, one joint attention over [image tokens; text
    tokens] per block, 2x2 patches (16x16 tokens of the 32x32 latent), one CLIP encoder with
    projection standing in for SD3's three (its penultimate states the context, its text_embeds
    the pooled vector, as mmdit.encode_text reads them); a rectified flow trained by flow
    matching, the velocity noise - x_0 at sigma drawn logit-normal as in SD3's training.
All three share toy-sd's VAE (4 latent channels, frozen; SD3's has 16), so what differs between
the four teachers is the denoiser and its text conditioning, not the latent space. All are taught
where their colour words are by the same localisation loss beside their denoising loss
(localisation_loss, weight LOCALISE unless --localise says otherwise, on
every text-to-image attention layer), since no CPU can give them what their real counterparts
learned from captions.

    python toy.py train-sd --seed 0                   # -> toy_models/toy-sd (12 min, 1 core)
    python toy.py train-sd --dm toy-sd21 --seed 0     # -> toy_models/toy-sd21
    python toy.py train-sd --dm toy-sdxl --seed 0     # -> toy_models/toy-sdxl
    python toy.py train-sd --dm toy-sd3 --seed 0      # -> toy_models/toy-sd3
    python toy.py measure-sd --dm toy-sdxl            # pointing on held-out images
"""
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

import data
import extract
import mmdit
import models
import teachers
import world

# toy-sd's text length (SD: 77), the columns of every toy teacher's maps
TEXT_POSITIONS = models.SD_SIZES["toy-sd"]["text_encoder"]["max_position_embeddings"]

# ---------------------------------------------------------------------------------------------
# toy-sd's tokenizer, the world's images and their latents (the VAE)
# ---------------------------------------------------------------------------------------------

def toy_sd_tokenizer(extra=""):
    """toy-sd's CLIPTokenizer (teachers.clip_tokenizer): the world's words one token each, any other
    word in letters (and the characters of `extra`); texts padded with the end token, like SD
    1.x, to its 24 positions (SD: 77)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz" + "".join(world.PUNCTUATION) + extra
    return teachers.clip_tokenizer(world.world_words(), alphabet, max_length=TEXT_POSITIONS)


def load_images(items, root):
    """((N, 3, 32, 32) float in [-1, 1], their paths) for the distinct images of items (order of
    first appearance)."""
    paths = list(dict.fromkeys(str(Path(root) / it["image"]) for it in items))
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])  # (N, 32, 32, 3)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1   # (N, 3, 32, 32)
    return images, paths


@torch.no_grad()
def vae_latents(vae, images):
    """(latent means (N, 4, 32, 32), the L1 error of their reconstruction) of a VAE on the
    images."""
    # in chunks of 256 images
    means = [vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)]
    latents = torch.cat(means)
    decoded = [vae.decode(latents[i:i + 256]).sample for i in range(0, len(latents), 256)]
    recon = torch.cat(decoded)
    return latents, float(F.l1_loss(recon, images))


def train_vae(vae, images, steps=300, batch=32, lr=2e-3, seed=0, show=True):
    """Fit the VAE briefly: L1 reconstruction + a small KL term (as SD's VAE, without the GAN);
    then frozen, with the scaling factor that gives unit-variance latents (as SD's 0.18215)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    bar = data.progress_bar(range(steps), show=show, desc="toy-sd vae")
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


# ---------------------------------------------------------------------------------------------
# the prompts and the localisation loss every toy teacher learns from
# ---------------------------------------------------------------------------------------------

# toy-sd's prompts: caption, one object's phrase, colour, cell
PROMPT_MIX = (0.4, 0.2, 0.2, 0.2)


def sd_prompt(objects, rng):
    """One training prompt for a scene, drawn with PROMPT_MIX: its whole caption, one object's
    phrase ("red at top left"), one object's colour ("red") or cell ("top left"), the answers'
    forms. Extraction conditions toy-sd on an item's answer: a model trained on whole captions
    alone never saw such a prompt (world v1: one-word answers pointed 0.62, the caption 0.86)."""
    kind = rng.choice(len(PROMPT_MIX), p=PROMPT_MIX)
    o = objects[rng.integers(len(objects))]
    forms = (world.caption(objects), f"{o['colour']} at {o['cell']}", o["colour"], o["cell"])
    return forms[kind]


# weight of toy-sd's localisation loss (localisation_loss) beside the denoising MSE
LOCALISE = 0.3


def colour_masks(scenes):
    """(N, n_colours, 32, 32) float: each scene's object masks by colour (world.COLOURS order;
    zero where the scene has no object of that colour), the localisation loss's targets."""
    masks = torch.zeros(len(scenes), len(world.COLOURS), world.SIZE, world.SIZE)
    for i, objects in enumerate(scenes):
        for o, m in zip(objects, world.render(objects)[1]):
            c = list(world.COLOURS).index(o["colour"])
            masks[i, c] = torch.from_numpy(m).float()
    return masks


def region_mean(maps, region):
    """(K,) the mean of each map over its region (0 where the region is empty); both
    (K, 32, 32)."""
    total = (maps * region).flatten(1).sum(1)                             # (K,)
    area = region.flatten(1).sum(1).clamp_min(1)                          # (K,)
    return total / area


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
    outside = region_mean(m, 1 - mask)
    on_others = region_mean(m, others)
    inside = region_mean(m, mask)
    loss = outside + on_others - inside
    return loss.mean()


# ---------------------------------------------------------------------------------------------
# one training loop for every toy teacher (toy-sd and the three stand-ins)
# ---------------------------------------------------------------------------------------------

def fit_base(params, loss_of_step, steps, lr, desc, after_step=None, show=True):
    """The base models' plain loop: AdamW (weight decay 0.01), a linear warm-up over 100 steps
    then a cosine to 0 at `steps`, gradients clipped at norm 1. loss_of_step(step) -> the step's
    loss; after_step(step) runs after each step (checkpoints); show: the progress bar (no --quiet).
    Returns the per-step losses."""

    def warmup_cosine(s):
        warmup = min(1.0, (s + 1) / 100)
        return warmup * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    bar = data.progress_bar(range(steps), show=show, desc=desc)
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


def conditioning(dm, prompts):
    """(context, extra kwargs of the denoiser): each family's text conditioning as its
    extraction builds it (teachers.encode_text, mmdit.encode_text), with gradients."""
    if "transformer" in dm:
        context, pooled = mmdit.encode_text(dm, prompts)
        return context, {"pooled_projections": pooled}
    context, added = teachers.encode_text(dm, prompts)
    return context, {"added_cond_kwargs": added}


def denoising_loss(dm, x0, context, extra, g, schedule=None):
    """The family's denoising loss at a random noise level: for the UNet, the MSE of its
    prediction of epsilon, or of v = alpha_t noise - sigma_t x_0 where its schedule predicts v
    (`schedule`: the DDPMScheduler of its noise levels and prediction type); for the DiT, flow
    matching, x_s = (1 - s) x_0 + s noise, the velocity noise - x_0 regressed, s logit-normal
    (SD3's training default), timestep s * 1000 as its pipeline passes it."""
    noise = torch.randn(x0.shape, generator=g)
    if "transformer" in dm:
        sigma = torch.sigmoid(torch.randn(len(x0), generator=g))            # (B,)
        s = sigma[:, None, None, None]
        noisy = (1 - s) * x0 + s * noise
        v = dm["transformer"](hidden_states=noisy, timestep=sigma * 1000,
                              encoder_hidden_states=context, **extra).sample
        return F.mse_loss(v, noise - x0)
    t = torch.randint(0, schedule.config.num_train_timesteps, (len(x0),), generator=g)
    noisy = schedule.add_noise(x0, noise, t)
    predicted = dm["unet"](noisy, t, encoder_hidden_states=context, **extra).sample
    if schedule.config.prediction_type == "v_prediction":
        return F.mse_loss(predicted, schedule.get_velocity(x0, noise, t))
    return F.mse_loss(predicted, noise)


def captured(dm, store):
    """The capture of the family's text-to-image attention (every layer) into `store`."""
    if "transformer" in dm:
        return mmdit.capturing(dm["transformer"], store)
    return extract.capturing(dm["unet"], store)


def store_grid(dm, latents):
    """The grid of the family's maps: the latent's for the UNet (extract.py resamples every layer
    to it), the token grid (latent / patch) for the DiT."""
    if "transformer" in dm:
        patch = dm["transformer"].config.patch_size
        return latents.shape[-2] // patch, latents.shape[-1] // patch
    return tuple(latents.shape[-2:])


def fit(dm, latents, scenes, steps, batch, lr, seed, localise=LOCALISE, desc=None,
        after_step=None, show=True):
    """The denoiser and the text encoders trained together on prompts about the scenes
    (sd_prompt): the denoising loss plus `localise` x the localisation loss on the
    colour words' maps, each map resized to the 32x32 masks (0: the denoising loss alone).
    desc: the progress bar's (default: the teacher's name); after_step(step): runs after each
    step (toy-sd's checkpoints); show: the progress bar (no --quiet). Returns (losses, denoising
    losses)."""
    encoders = [dm[p] for p in ("text_encoder", "text_encoder_2") if p in dm]
    denoiser = dm.get("transformer", dm.get("unet"))
    params = [p for m in [denoiser, *encoders] for p in m.parameters() if p.requires_grad]
    for m in [denoiser, *encoders]:
        m.train()
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    masks = colour_masks(scenes)                           # (N, n_colours, 32, 32)
    tok = dm["tokenizer"]
    # each colour is one word-end token
    colour_tokens = [c + "</w>" for c in world.COLOURS]
    colour_ids = torch.tensor(tok.convert_tokens_to_ids(colour_tokens))
    # the UNet's noise levels and prediction type (the DiT's flow needs none)
    schedule = None
    if "transformer" not in dm:
        schedule = DDPMScheduler.from_config(dm["scheduler"].config)
    denoise_log = []

    def loss_of_step(step):
        idx = torch.randint(len(latents), (batch,), generator=g)
        prompts = [sd_prompt(scenes[i], rng) for i in idx.tolist()]
        ids = teachers.token_ids(tok, encoders[0], prompts, "cpu")     # (B, T)
        context, extra = conditioning(dm, prompts)
        store = teachers.new_store(store_grid(dm, latents), TEXT_POSITIONS)
        with captured(dm, store):
            denoise = denoising_loss(dm, latents[idx], context, extra, g, schedule)
        denoise_log.append(denoise.item())
        maps = store["sum"] / store["count"]                           # (B, T, h, w)
        maps = F.interpolate(maps, size=masks.shape[-2:], mode="bilinear")   # (B, T, 32, 32)
        local = localisation_loss(maps, ids, masks[idx], colour_ids)
        return denoise + localise * local

    desc = desc or f"{dm['name']} denoiser"
    log = fit_base(params, loss_of_step, steps, lr, desc, after_step, show)
    return log, denoise_log


# ---------------------------------------------------------------------------------------------
# toy-sd
# ---------------------------------------------------------------------------------------------

def train_sd(out_dir, world_dir, seed=0, steps=1500, batch=16, lr=1e-3, vae_steps=300,
             save_every=300, init_from=None, localise=None, show=True):
    """Train toy-sd on the pretrain split's captions; save it in diffusers layout under out_dir.

    Prompts in the forms extraction conditions on (sd_prompt), the denoising MSE plus `localise`
    (default LOCALISE) x the localisation loss (fit; the module docstring says why).
    init_from: a toy-sd folder to continue from (its unet/, vae/, text_encoder/). Its VAE is kept
    frozen with its scaling factor, as the original schedule freezes the VAE after its own phase,
    so no VAE step runs; the UNet and text encoder get a fresh AdamW and warm-up + cosine over
    `steps`."""
    localise = LOCALISE if localise is None else localise
    torch.manual_seed(seed)
    scenes, images = pretrain_scenes(world_dir, seed)
    dm = models.stable_diffusion("toy-sd", toy_sd_tokenizer(), seed)
    t0 = time.time()
    # continue a shipped or earlier toy-sd
    if init_from:
        loaded = models.load_dm_folder(init_from)
        vae = loaded["vae"].eval().requires_grad_(False)
        dm.update(unet=loaded["unet"], text_encoder=loaded["text_encoder"], vae=vae)
        latents, vae_l1 = vae_latents(dm["vae"], images)
        # the saved factor; no VAE step runs
        latents = latents * dm["vae"].config.scaling_factor            # (N, 4, 32, 32)
        vae_steps = 0
    else:
        # (N, 4, 32, 32)
        latents, vae_l1 = train_vae(dm["vae"], images, steps=vae_steps, seed=seed, show=show)

    def save(step):
        """A step<N>/ folder every save_every steps."""
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            models.save_dm(dm, Path(out_dir) / f"step{step + 1}")
    objects = [s["objects"] for s in scenes]
    log, denoise_log = fit(dm, latents, objects, steps, batch, lr, seed, localise, "toy-sd unet",
                           save, show)
    models.save_dm(dm, out_dir)
    summary = {"seed": seed, "steps": steps, "batch": batch, "lr": lr,
               "init_from": str(init_from) if init_from else None,
               "vae_steps": vae_steps, "vae_l1": round(vae_l1, 4), "localise": localise,
               **training_end(log, denoise_log, t0),
               "unet_params": sum(p.numel() for p in dm["unet"].parameters()),
               "text_params": sum(p.numel() for p in dm["text_encoder"].parameters())}
    return write_summary(out_dir, "toy-sd", summary)


def pretrain_scenes(world_dir, seed, n=None):
    """(scenes, images): one pretrain item per image of world `seed` (its objects are the scene),
    the first n (None: all), and their images (N, 3, 32, 32) in [-1, 1]."""
    paths = world.build_world(world_dir, seed)
    by_image = {it["image"]: it for it in map(json.loads, open(paths["pretrain"]))}
    scenes = list(by_image.values())[:n]
    images, _ = load_images(scenes, world_dir)
    return scenes, images


def training_end(log, denoise_log, t0):
    """training.json's closing numbers: the mean losses of the last 100 steps, and the minutes
    since t0."""
    return {"final_loss": round(float(np.mean(log[-100:])), 4),
            "final_denoise_mse": round(float(np.mean(denoise_log[-100:])), 4),
            "minutes": round((time.time() - t0) / 60, 1)}


def write_summary(out_dir, label, summary):
    """Write summary to <out_dir>/training.json, print it after `label`; returns out_dir."""
    (Path(out_dir) / "training.json").write_text(json.dumps(summary, indent=2))
    print(f"{label}: {summary}")
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------
# the stand-ins of SD 2.x, SDXL and SD3
# ---------------------------------------------------------------------------------------------

TINY_SDXL = teachers.TINY_SIZES["tiny-sdxl"]
TOY_SD = models.SD_SIZES["toy-sd"]
SIZES = {
    "toy-sd21": {
        "text_encoder": dict(TOY_SD["text_encoder"], hidden_act="gelu"),
        "unet": dict(TOY_SD["unet"], attention_head_dim=(1, 2, 4), use_linear_projection=True,
                     upcast_attention=True)},
    # tiny-sdxl's layout (teachers.py) on toy-sd's 32x32 latent, with toy-sd's text length and
    # toy-sd's head widths (1, 4, 4; tiny-sdxl's 1, 2, 4)
    "toy-sdxl": {
        "text_encoder": dict(TINY_SDXL["text_encoder"], max_position_embeddings=TEXT_POSITIONS),
        "text_encoder_2": dict(TINY_SDXL["text_encoder_2"], max_position_embeddings=TEXT_POSITIONS),
        "unet": dict(TINY_SDXL["unet"], sample_size=32, attention_head_dim=(1, 4, 4))},
    "toy-sd3": {
        "text_encoder": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=TEXT_POSITIONS,
                             projection_dim=64),
        "transformer": dict(sample_size=32, patch_size=2, in_channels=4, out_channels=4,
                            num_layers=4, attention_head_dim=32, num_attention_heads=2,
                            joint_attention_dim=64, caption_projection_dim=64,
                            pooled_projection_dim=64, pos_embed_max_size=16)},
}


# SD3 shifts its sigmas toward noise by 3.0 for 1024 px images (more pixels keep more signal at a
# given noise level); a 32 px image needs no shift
SHIFT = 1.0


def tokenizer():
    """The toy teachers' CLIP tokenizer: toy-sd's, and "!" (SD 2's and SDXL's second pad with
    it)."""
    return toy_sd_tokenizer(extra="!")


def build(name, vae, seed=0):
    """dict of a toy teacher's parts, random weights (deterministic by seed), around `vae`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    sizes = SIZES[name]
    if name == "toy-sd21":
        # SD 2's tokenizer padding and v-prediction schedule (teachers.sd2_style)
        tok, scheduler = teachers.sd2_style(tokenizer(), models.sd_scheduler())
        dm = teachers.tiny_parts(sizes, tok, scheduler, seed)
    elif name == "toy-sdxl":
        # SDXL's parts from these sizes: two encoders, the second padding with "!"
        dm = teachers.tiny_parts(sizes, tokenizer(), models.sd_scheduler(), seed)
    else:
        tok = tokenizer()
        ids = teachers.clip_ids(tok)
        torch.manual_seed(seed)
        config = CLIPTextConfig(**ids, **sizes["text_encoder"])
        dm = dict(text_encoder=CLIPTextModelWithProjection(config), tokenizer=tok,
                  transformer=SD3Transformer2DModel(**sizes["transformer"]),
                  scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT))
    return dict(dm, vae=vae, res=world.SIZE)


def train(name, out_dir, world_dir, seed=0, steps=1500, lr=1e-3, init_from=None, batch=16,
          vae_path=models.ROOT / "toy_models" / "toy-sd", localise=LOCALISE, show=True):
    """Train a toy teacher (SIZES) from scratch on the pretrain split's scenes with toy-sd's
    frozen VAE from vae_path; save it under out_dir with training.json (init_from: refused;
    localise: the localisation loss's weight, 0 for a teacher taught by denoising alone)."""
    if init_from:
        raise SystemExit(f"--init-from {init_from}: only toy-sd continues a training; {name} "
                         f"trains from scratch")
    t0 = time.time()
    scenes, images = pretrain_scenes(world_dir, seed)
    vae = models.load_dm_folder(vae_path)["vae"].eval().requires_grad_(False)
    latents, vae_l1 = vae_latents(vae, images)
    latents = latents * vae.config.scaling_factor                       # (N, 4, 32, 32)
    dm = dict(build(name, vae, seed), name=name)
    objects = [s["objects"] for s in scenes]
    log, denoise_log = fit(dm, latents, objects, steps, batch, lr, seed, localise, show=show)
    models.save_dm(dm, out_dir)
    denoiser = dm.get("transformer", dm.get("unet"))
    summary = {"name": name, "seed": seed, "steps": steps, "batch": batch, "lr": lr,
               "vae_from": Path(vae_path).name, "vae_l1": round(vae_l1, 4), "localise": localise,
               **training_end(log, denoise_log, t0),
               "denoiser_params": sum(p.numel() for p in denoiser.parameters())}
    return write_summary(out_dir, name, summary)
