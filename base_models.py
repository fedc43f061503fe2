"""The miniature world's base VLM, pre-trained here because none can be downloaded: the toy VLM
(the llama32 classes at the toy size), the stand-in for Llama-3.2-Vision, and the probes that
measure it and the toy teachers (toy_teachers.py trains toy-sd and the others). The weights
they write are the shipped toy_models/; toy.py's demo fine-tunes from them.

  - toy VLM: every weight pre-trained on the pretrain split with the next-token loss, each batch
    drawn a kind then an item: it perceives every asked attribute on one-object images (1.00 on
    test-one for both kinds) but has never had to select one object among several, the skill
    fine-tuning can teach. Probes: VQA accuracy per kind (kind_accuracy), and the attention
    ceiling (attention_ceiling): its answers when the cross-attention of the row that predicts the
    answer is steered to the asked object, which says whether an attention target can help at all.

    python toy.py train-vlm --seed 0  # retrain toy_models/toy-vlm
    python toy.py measure-sd          # toy-sd pointing, held-out images (colour, cell words apart)
"""
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import aggregate
import data
import evaluate
import extract
import models
import nulltext
import teachers
import toy_teachers
import world
from aligner import min_max
from capture import answer_rows
from metrics import score_prediction


def dm_pointing(items, attn_dir):
    """Pointing accuracy of extracted DM maps: the share of (item, word) with a mask whose map's
    argmax falls inside the word's object (evaluate.pointing_hit). Returns dict(accuracy, hits, n,
    colour, cell, entropy): colour and cell are the accuracies over colour words and over cell
    words ("top", "left", ...) alone (they can differ a lot: models.SD_SIZES), entropy the mean
    of the maps' entropies (evaluate.attention_entropy, App. B eq. 23)."""
    # (hit, the word, entropy of its map)
    hits = []
    for it in items:
        if not it.get("masks"):
            continue
        maps, words = data.read_maps(attn_dir, it["id"])                  # (n_words, 32, 32)
        if maps is None:
            continue
        root = Path(it["image_path"]).parent.parent
        regions = data.item_regions(it, root, lambda w: w)
        for word, region in regions.items():
            if word in words:
                m = maps[words.index(word)]
                hit = evaluate.pointing_hit(m, region)
                entropy = float(evaluate.attention_entropy(m))
                hits.append((hit, word, entropy))

    def share(values):
        return round(float(np.mean(values)), 4) if values else float("nan")
    cell_words = {x for c in world.CELLS for x in c.split()}
    return {"accuracy": share([h for h, _, _ in hits]), "hits": int(sum(h for h, _, _ in hits)),
            "n": len(hits), "colour": share([h for h, w, _ in hits if w in world.COLOURS]),
            "cell": share([h for h, w, _ in hits if w in cell_words]),
            "entropy": share([e for _, _, e in hits])}


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
    scenes, images = toy_teachers.pretrain_scenes(world_dir, seed, n)
    dm = models.load_dm("toy-sd", path=dm_path)
    latents = teachers.encode_image(dm, images)
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
    # per map
    differences = [(a - b).abs().mean(dim=(1, 2)) for a, b in zip(*maps.values())]
    mad = torch.cat(differences)
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
    x0 = teachers.encode_image(dm, images)                                   # z*_0
    answers = [it["answer"] for it in items]
    ids = teachers.token_ids(dm["tokenizer"], dm["text_encoder"], answers, "cpu")
    unet, context = dm["unet"], dm["text_encoder"](ids)[0]                   # (B, T, D)
    null = nulltext.empty_prompt(dm, len(items))                             # ∅ untuned (B, T, D)
    inverse, forward = extract.ddim_grids(dm["scheduler"], steps, steps)
    pivot = nulltext.ddim_pivot(unet, x0, context, inverse)                  # z*_0 ... z*_T

    def guided(scale):
        """From z*_T, the empty prompt's embedding at every step."""
        return nulltext.guided_denoise(unet, pivot[-1], context, [null] * steps, forward, scale)
    ddim_end = guided(1.0)
    empty_end = guided(w)
    null_text_end = nulltext.null_text_inversion(unet, pivot, context, null, forward, w)[1]
    ends = {"ddim, guidance 1": ddim_end, f"empty prompt, guidance {w}": empty_end,
            f"null-text, guidance {w}": null_text_end}
    return {name: round((z - x0).pow(2).mean().item(), 5) for name, z in ends.items()}


# ---------------------------------------------------------------------------------------------
# the attention ceiling: the toy VLM's answers when its cross-attention looks at the right object
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

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                 **kwargs):
        from transformers.models.mllama import modeling_mllama as mllama
        # (B, T, H, d), (B, H, T, N)
        out, weights = mllama.eager_attention_forward(module, query, key, value, attention_mask,
                                                      scaling=scaling)
        cross = isinstance(module, mllama.MllamaTextCrossAttention)
        steered = self.rows is not None and self.alpha != 0 and cross
        if not steered or (self.layers is not None and module.layer_idx not in self.layers):
            return out, weights
        b, a = torch.arange(weights.shape[0]), self.alpha
        weights = weights.clone()
        # the steered rows, (B, H, N): (1 - alpha) p + alpha m
        target = self.targets[:, None].to(weights)
        weights[b, :, self.rows] = (1 - a) * weights[b, :, self.rows] + a * target
        values = mllama.repeat_kv(value, module.num_key_value_groups)      # (B, H, N, d)
        out = torch.matmul(weights, values).transpose(1, 2).contiguous()    # (B, T, H, d)
        return out, weights


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
    (its CLS token first, weight 0), from the item's mask: where an ideal look at the object
    goes."""
    targets = []
    for it in items:
        root = Path(it["image_path"]).parent.parent
        (mask,) = data.item_regions(it, root, lambda w: w).values()        # (32, 32)
        mask = torch.from_numpy(mask).float()[None, None]                  # (1, 1, 32, 32)
        share = F.avg_pool2d(mask, patch).flatten()                        # (P²,) reading order
        targets.append(torch.cat([torch.zeros(1), share / share.sum()]))
    return torch.stack(targets)


@torch.no_grad()
def attention_ceiling(model, processor, items, alphas=(0.0, 1.0), layers=None, batch_size=50):
    """{alpha: accuracy}: the answer's first token, teacher-forced, when the cross-attention
    layers (`layers`, text layer indices; None: all) read the answer's prediction row steered to
    the asked object (SteeredAttention; alpha 0 = the model as it is). Near 1 at alpha 1 while
    low at 0: the answers fail at selecting the object, which an attention target can teach;
    near alpha 0's: the model does not read the object through cross-attention and no attention
    target can help."""
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
            # (B,) the rows that predict the answer's first token
            rows = answer_rows(batch["labels"])[:, 0]
            gold = batch["input_ids"][torch.arange(len(chunk)), rows + 1]
            STEERED.rows, STEERED.targets = rows, mask_targets(chunk)
            for a in alphas:
                STEERED.alpha = a
                logits = model(**data.model_inputs(batch)).logits
                predicted = logits[torch.arange(len(chunk)), rows].argmax(-1)   # (B,)
                hits[a] += int((predicted == gold).sum())
    finally:
        config._attn_implementation = before
        STEERED.rows, STEERED.alpha, STEERED.layers = None, 0.0, None
    return {a: round(hits[a] / max(len(items), 1), 4) for a in alphas}


@torch.no_grad()
def raw_entropies(model, processor, dm, items, batch_size=16, inversion_steps=5, denoise_steps=5):
    """{"dm": {"raw", "min-max"}, "vlm": {"raw", "min-max"}}: the mean entropy (nats,
    evaluate.py's attention_entropy) of the answer word's map before and after min-max
    normalisation, on both sides. The floor min-max sets to 0 is what makes a flat map look
    peaked: a map of near-equal values spans [0, 1] after it. DM: extract.py's word map without
    the normalisation; VLM: its own attention at the row that predicts the answer's first token,
    mean over heads and every cross-attention layer (aggregate.token_maps, evaluate.py's ruler).
    Items of one-word answers."""
    # (raw, min-max) per item
    entropies = {"dm": [], "vlm": []}
    capture = aggregate.AttentionCapture(model, aggregate.aligned_layers(model))
    # the maps extraction stores
    layers = models.PRESETS["toy-sd"]["layers"]
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
                weights = extract.word_weights(p, columns)
                raw = extract.word_maps(attention[b], weights, normalise=False)[0]
                entropies["dm"].append((raw, min_max(raw)))
            batch = data.collate(processor, chunk)
            capture.set_rows(answer_rows(batch["labels"])[:, :1])  # (B, 1)
            model(**data.model_inputs(batch))
            geometry = aggregate.vision_geometry(model)
            maps = aggregate.token_maps(capture.probs, batch, geometry, "mean-mean")
            entropies["vlm"] += [(m, min_max(m)) for m in maps[:, 0]]     # (32, 32) each
    finally:
        capture.remove()

    def mean(maps):
        return round(float(evaluate.attention_entropy(torch.stack(maps)).mean()), 4)
    return {side: {"raw": mean([r for r, _ in pairs]), "min-max": mean([m for _, m in pairs])}
            for side, pairs in entropies.items()}


# ---------------------------------------------------------------------------------------------
# toy: the llama32 classes at mllama.py's toy size, pre-trained on the world
# ---------------------------------------------------------------------------------------------

def toy_vlm_tokenizer():
    """Byte-level BPE (as Llama 3's) with Llama-3.2-Vision's special tokens, over the world's
    words."""
    tokenizer = models.bpe_tokenizer(world.world_corpus(), vocab_size=1000)
    for word in world.world_words():
        for form in (word, " " + word):
            assert len(tokenizer.tokenize(form)) == 1, f"world word {form!r} is not one VLM token"
    return tokenizer


def toy_vlm(seed=0):
    """(model, processor) at mllama.MLLAMA_SIZES["toy"] with the world's tokenizer, random
    weights."""
    return models.small_vlm("toy", toy_vlm_tokenizer(), seed)


def kind_accuracy(model, processor, items, batch_size=64):
    """{"all": accuracy, kind: accuracy, ...}: exact match of greedy answers, scored as evaluate.py
    scores them, over every item and per item category."""
    answers = evaluate.generate_answers(model, processor, items, batch_size=batch_size,
                                        max_new_tokens=6, show=False)
    correct = {}
    for a, it in zip(answers, items):
        hit = score_prediction(a, it["answer"], it["question"])["correct"]
        correct.setdefault("all", []).append(hit)
        correct.setdefault(it["category"], []).append(hit)
    return {k: round(float(np.mean(v)), 4) for k, v in correct.items()}


def train_vlm(out_dir, world_dir, seed=0, steps=1000, batch=32, lr=1e-3, init_from=None,
              show=True):
    """Pre-train the toy Mllama on the pretrain split: every weight, next-token loss on the
    answers (eq. 6), batches from data.collate (the fine-tuning data path), a plain loop
    (world-building).

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
        # a kind per row, then an item of that kind
        drawn = [by_kind[kinds[k]] for k in rng.integers(len(kinds), size=batch)]
        picked = [pool[rng.integers(len(pool))] for pool in drawn]
        collated = data.collate(processor, picked)
        inputs = data.model_inputs(collated)
        return model(**inputs, labels=collated["labels"]).loss
    log = toy_teachers.fit_base(list(model.parameters()), loss_of_step, steps, lr, "toy vlm",
                                show=show)
    model.eval()
    out_dir = Path(out_dir)
    # saved first: the probe below is extra
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    summary = {"seed": seed, "steps": steps, "batch": batch,
               "final_loss": round(float(np.mean(log[-100:])), 4),
               "params": sum(p.numel() for p in model.parameters()),
               "minutes": round((time.time() - t0) / 60, 1),
               **{f"acc_{s}": kind_accuracy(model, processor, v) for s, v in tests.items()}}
    return toy_teachers.write_summary(out_dir, "toy vlm", summary)
