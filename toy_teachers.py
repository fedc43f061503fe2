"""Toy counterparts of the other teachers: SD 2.x- and SDXL-style UNets and an SD3-style DiT,
trained on the miniature world by toy-sd's recipe, so that "does another teacher's architecture
give better targets?" can be asked on a CPU (teachers.py and mmdit.py hold the real presets).

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
(base_models.localisation_loss, weight base_models.LOCALISE unless --localise says otherwise, on
every text-to-image attention layer), since no CPU can give them what their real counterparts
learned from captions.

    python toy.py train-sd --dm toy-sd21 --seed 0     # -> toy_models/toy-sd21
    python toy.py train-sd --dm toy-sdxl --seed 0     # -> toy_models/toy-sdxl
    python toy.py train-sd --dm toy-sd3 --seed 0      # -> toy_models/toy-sd3
    python toy.py measure-sd --dm toy-sdxl            # pointing on held-out images
"""
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

import base_models
import extract
import models
import teachers
import world

TEXT_POSITIONS = models.SD_SIZES["toy-sd"]["text_encoder"]["max_position_embeddings"]
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
    return base_models.toy_sd_tokenizer(extra="!")


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
        ids = dict(vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=1)
        torch.manual_seed(seed)
        config = CLIPTextConfig(**ids, **sizes["text_encoder"])
        dm = dict(text_encoder=CLIPTextModelWithProjection(config), tokenizer=tok,
                  transformer=SD3Transformer2DModel(**sizes["transformer"]),
                  scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT))
    return dict(dm, vae=vae, res=world.SIZE)


def conditioning(dm, prompts):
    """(context, extra kwargs of the denoiser): each family's text conditioning as its
    extraction builds it (teachers.encode_text, mmdit.encode_text), with gradients."""
    import mmdit
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
    import mmdit
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


def fit(dm, latents, scenes, steps, batch, lr, seed, localise=base_models.LOCALISE):
    """The denoiser and the text encoders trained together on prompts about the scenes
    (base_models.sd_prompt): the denoising loss plus `localise` x the localisation loss on the
    colour words' maps, each map resized to the 32x32 masks (0: the denoising loss alone).
    Returns (losses, denoising losses)."""
    encoders = [dm[p] for p in ("text_encoder", "text_encoder_2") if p in dm]
    denoiser = dm.get("transformer", dm.get("unet"))
    params = [p for m in [denoiser, *encoders] for p in m.parameters() if p.requires_grad]
    for m in [denoiser, *encoders]:
        m.train()
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    masks = base_models.colour_masks(scenes)                           # (N, n_colours, 32, 32)
    tok = dm["tokenizer"]
    colour_ids = torch.tensor(tok.convert_tokens_to_ids([c + "</w>" for c in world.COLOURS]))
    schedule = None if "transformer" in dm else DDPMScheduler.from_config(dm["scheduler"].config)
    denoise_log = []

    def loss_of_step(step):
        idx = torch.randint(len(latents), (batch,), generator=g)
        prompts = [base_models.sd_prompt(scenes[i], rng) for i in idx.tolist()]
        ids = teachers.token_ids(tok, encoders[0], prompts, "cpu")     # (B, T)
        context, extra = conditioning(dm, prompts)
        store = teachers.new_store(store_grid(dm, latents), TEXT_POSITIONS)
        with captured(dm, store):
            denoise = denoising_loss(dm, latents[idx], context, extra, g, schedule)
        denoise_log.append(denoise.item())
        maps = store["sum"] / store["count"]                           # (B, T, h, w)
        maps = F.interpolate(maps, size=masks.shape[-2:], mode="bilinear")  # (B, T, 32, 32)
        local = base_models.localisation_loss(maps, ids, masks[idx], colour_ids)
        return denoise + localise * local

    log = base_models.fit_base(params, loss_of_step, steps, lr, f"{dm['name']} denoiser")
    return log, denoise_log


def train(name, out_dir, world_dir, seed=0, steps=1500, lr=1e-3, init_from=None, batch=16,
          vae_path=models.ROOT / "toy_models" / "toy-sd", localise=base_models.LOCALISE):
    """Train a toy teacher (SIZES) from scratch on the pretrain split's scenes with toy-sd's frozen
    VAE from vae_path; save it under out_dir with training.json (init_from: refused; localise:
    the localisation loss's weight, 0 for a teacher taught by denoising alone)."""
    if init_from:
        raise SystemExit(f"--init-from {init_from}: only toy-sd continues a training; {name} "
                         f"trains from scratch")
    t0 = time.time()
    paths = world.build_world(world_dir, seed)
    by_image = {it["image"]: it for it in map(json.loads, open(paths["pretrain"]))}
    scenes = list(by_image.values())                                    # one per image
    images, _ = base_models.load_images(scenes, world_dir)
    vae = models.load_dm_folder(vae_path)["vae"].eval().requires_grad_(False)
    latents, vae_l1 = base_models.vae_latents(vae, images)
    latents = latents * vae.config.scaling_factor                       # (N, 4, 32, 32)
    dm = dict(build(name, vae, seed), name=name)
    objects = [s["objects"] for s in scenes]
    log, denoise_log = fit(dm, latents, objects, steps, batch, lr, seed, localise)
    models.save_dm(dm, out_dir)
    denoiser = dm.get("transformer", dm.get("unet"))
    summary = {"name": name, "seed": seed, "steps": steps, "batch": batch, "lr": lr,
               "vae_from": Path(vae_path).name, "vae_l1": round(vae_l1, 4),
               "localise": localise,
               "final_loss": round(float(np.mean(log[-100:])), 4),
               "final_denoise_mse": round(float(np.mean(denoise_log[-100:])), 4),
               "minutes": round((time.time() - t0) / 60, 1),
               "denoiser_params": sum(p.numel() for p in denoiser.parameters())}
    (Path(out_dir) / "training.json").write_text(json.dumps(summary, indent=2))
    print(f"{name}: {summary}")
    return Path(out_dir)
