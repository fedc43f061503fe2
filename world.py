"""The miniature world: 32x32 images of 1-4 coloured, textured objects, one per quadrant, their
captions, VQA pairs about them, and the mask of the object every answer word names (not in the
paper: base_models.py trains the toy models on it, toy.py runs the method on it).

build_world() draws every split, deterministic by seed, in the DESIGN.md JSONL format, so every
script reads it unchanged: captions such as "red at top left, blue at bottom right and green at top
right", questions that name one object among 3-4 by its cell and ask its colour ("what colour is
the object at the top left?"); shapes and textures are drawn, never named.
Splits: pretrain (the base models' training; questions about one object only on one-object images,
its colour and its cell, so every attribute is seen but selecting an object never is; counts and
captions on crowded ones),
finetune (3 objects: selection needed), test-id (3 objects), test-ood (4 objects, more distractors,
questions about colour-cell pairs never seen in fine-tuning), test-one (held-out one-object
images: can the base model perceive what it is asked?), plus test-captions (a caption per test-id
image, every colour word with its mask). oracle_store writes the masks as an
attention store: the targets of toy.py's oracle arm.

    python toy.py build --world toy_out/world      # draw the world alone
"""
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------
# the world: colours x textures x cells, shapes and sizes drawn
# ---------------------------------------------------------------------------------------------

SIZE = 32                                              # image side in pixels
BACKGROUND = (16, 16, 16)
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (60, 90, 235),
           "yellow": (235, 215, 40), "purple": (160, 60, 200)}
# Objects are named by colour and cell only. Shape and texture (which pixels are lit in the colour,
# the others in DIM of it) are drawn, never named: the toy VLM answered shape (v1, v2) and texture
# (v3) questions at chance on one-object images, so a question about them could not tell a failure
# to select the object from a failure to see it (toy_report.md, world versions).
TEXTURES = ("solid", "striped", "checked", "dotted")
DIM = 0.35
SHAPES = ("circle", "square", "triangle", "cross")
# The four quadrants, each a 16x16 cell holding at most one object: "the object at the top left"
# names exactly one object, and an object never spills into another's cell.
CELLS = {"top left": (0, 0), "top right": (16, 0), "bottom left": (0, 16), "bottom right": (16, 16)}
CELL = 16
RADII = (4.5, 6.5)                                     # half-extent range: 9-13 px objects
# Colour-cell pairs never shown in fine-tuning; test-ood asks about exactly these (pre-training
# shows every pair, so the concepts are known, only their binding in multi-object scenes is new).
HELD_OUT = (("red", "top left"), ("green", "top right"), ("blue", "bottom left"),
            ("yellow", "bottom right"), ("purple", "top left"))
COUNT_WORDS = ("zero", "one", "two", "three", "four")
# The questions of fine-tuning and test: each names one object among 3-4 by its cell and asks its
# colour, so answering needs that object found; the answer is a colour word, the one kind of word
# toy-sd localises (toy_report.md, world v5). Pre-training and test-one also ask the position of a
# named colour, so that the base model is seen to perceive both attributes of an object.
KINDS = ("colour-at",)
PERCEPTION_KINDS = ("colour-at", "position")
# split: (images, objects per image (min, max), question kinds, seed offset); test-ood has every
# cell filled (more distractors) and asks about held-out pairs. Fine-tuning has 100 items: with
# 200 or 400, AR learns to select the object by itself and perfect attention targets add a few
# points at most; with 100, AR still learns (+0.18 over the base model) and they add more
# (toy_report.md, world v7)
SPLITS = {
    "pretrain": (4000, (1, 4), None, 0),
    "finetune": (100, (3, 3), KINDS, 1),
    "test-id": (300, (3, 3), KINDS, 2),
    "test-ood": (300, (4, 4), KINDS, 3),
    # perception alone: one object, held out
    "test-one": (200, (1, 1), PERCEPTION_KINDS, 4),
}
CAPTION_PROMPT = "describe the image."


def shape_mask(shape, cx, cy, r, size=SIZE):
    """Boolean (size, size) mask of one shape centred at pixel (cx, cy) with half-extent r."""
    y, x = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        # about the circle's area
        s = 0.85 * r
        return (np.abs(x - cx) <= s) & (np.abs(y - cy) <= s)
    if shape == "triangle":
        # apex up, base at cy + r; t is 0 at the apex, 1 at the base
        t = (y - (cy - r)) / (2 * r)
        return (t >= 0) & (t <= 1) & (np.abs(x - cx) <= t * r * 1.1)
    if shape == "cross":
        # a plus sign, arms r/3 thick
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
        arms = (np.abs(x - cx) <= r / 3 + 0.5) | (np.abs(y - cy) <= r / 3 + 0.5)
        return inside & arms
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def texture_lit(texture, size=SIZE):
    """Boolean (size, size): the pixels a texture lights (the rest of the object is dim)."""
    y, x = np.mgrid[0:size, 0:size]
    lit = {"solid": np.ones((size, size), bool),
           "striped": y % 2 == 0,
           "checked": (x + y) % 2 == 0,
           "dotted": (x % 2 == 0) & (y % 2 == 0)}
    if texture not in lit:
        raise ValueError(f"unknown texture {texture!r}; choose one of {TEXTURES}")
    return lit[texture]


def draw_scene(rng, n_objects, allowed=None):
    """One scene: list of objects {colour, cell, shape, texture, cx, cy, r}, distinct colours and
    distinct cells (so "the red object" and "the object at the top left" each name exactly one
    object), each object inside its cell.

    allowed: optional set of (colour, cell) pairs to draw from (fine-tuning excludes HELD_OUT).
    """
    # rejection sampling
    for _ in range(1000):
        colours = rng.choice(list(COLOURS), size=n_objects, replace=False)
        cells = rng.choice(list(CELLS), size=n_objects, replace=False)
        pairs = list(zip(colours.tolist(), cells.tolist()))
        if allowed is None or all(p in allowed for p in pairs):
            break
    else:
        raise RuntimeError(f"no {n_objects} colour-cell pairs among {sorted(allowed)}")
    objects = []
    for colour, cell in pairs:
        shape = str(rng.choice(SHAPES))
        texture = str(rng.choice(TEXTURES))
        r = float(rng.uniform(*RADII))
        x0, y0 = CELLS[cell]
        cx, cy = rng.uniform(r + 0.5, CELL - r - 0.5, size=2) + (x0, y0)
        objects.append({"colour": colour, "texture": texture, "shape": shape, "cell": cell,
                        "cx": float(cx), "cy": float(cy), "r": r})
    return objects


def render(objects):
    """(image uint8 (32, 32, 3), masks: list of bool (32, 32), one per object, exactly its drawn
    pixels: lit ones in its colour, the others of its texture in DIM of it)."""
    image = np.zeros((SIZE, SIZE, 3), np.uint8) + np.array(BACKGROUND, np.uint8)
    masks = [shape_mask(o["shape"], o["cx"], o["cy"], o["r"]) for o in objects]
    for o, m in zip(objects, masks):
        colour = np.array(COLOURS[o["colour"]])
        lit = texture_lit(o["texture"])
        image[m & lit] = colour
        image[m & ~lit] = np.round(colour * DIM).astype(np.uint8)
    return image, masks


def caption(objects):
    """'red at top left' / 'red at top left and blue at bottom right' / 'red at top left, blue at
    top right and green at bottom left', the objects in reading order of the cells."""
    order = sorted(objects, key=lambda o: list(CELLS).index(o["cell"]))
    names = [f"{o['colour']} at {o['cell']}" for o in order]
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def question(o, kind):
    """(question, answer) of a kind about object o: the object is named by one attribute and the
    answer is another."""
    if kind == "colour-at":
        return f"what colour is the object at the {o['cell']}?", o["colour"]
    if kind == "position":
        return f"where is the {o['colour']} object?", o["cell"]
    raise ValueError(f"unknown question kind {kind!r}")


def questions(rng, objects, kind, o_index=None):
    """One (question, answer, index of the object the answer names or None) of a given kind about
    objects[o_index] (drawn when None)."""
    if o_index is None:
        o_index = int(rng.integers(len(objects)))
    if kind in PERCEPTION_KINDS:
        q, a = question(objects[o_index], kind)
        # the answer's words name the object: it has a mask
        return q, a, o_index
    if kind == "count":
        return "how many objects are there?", COUNT_WORDS[len(objects)], None
    if kind == "caption":
        return CAPTION_PROMPT, caption(objects), None
    raise ValueError(f"unknown question kind {kind!r}")


def pretrain_kinds(n_objects):
    """Pre-training asks about one object only in one-object scenes: every attribute is seen there
    (colour, cell) but selecting one object among others never is; multi-object scenes get counting
    and captions."""
    if n_objects == 1:
        return (*PERCEPTION_KINDS, "count", "caption")
    return ("count", "caption")


def pair_of(o):
    """An object's (colour, cell) pair, as HELD_OUT lists them."""
    return (o["colour"], o["cell"])


def save_mask(mask, path):
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def answer_masks(image_id, objects, kind, answer, o_index):
    """{word: mask file}: the object each answer word names (every word of a question's answer:
    "red", or "top" and "left"; the colour words of a caption); words naming no object get none."""
    masks_of = {}
    if o_index is not None:
        masks_of = {word: f"masks/{image_id}-{o_index}.png" for word in answer.split()}
    if kind == "caption":
        for k, o in enumerate(objects):
            masks_of[o["colour"]] = f"masks/{image_id}-{k}.png"
    return masks_of


def build_split(out_dir, split, seed, spec=None):
    """Draw one split (spec: its SPLITS entry); write images/, masks/ and <split>.jsonl under
    out_dir. Returns the items. A split's draws are one random stream, so a larger split begins
    with the items of a smaller one."""
    n_images, (lo, hi), kinds, offset = spec or SPLITS[split]
    # one stream per split: the splits are independent
    rng = np.random.default_rng([seed, offset])
    allowed = None
    every_pair = {(c, cell) for c in COLOURS for cell in CELLS}
    if split == "finetune":
        allowed = every_pair - set(HELD_OUT)
    items = []
    for i in range(n_images):
        n_objects = int(rng.integers(lo, hi + 1))
        objects = draw_scene(rng, n_objects, allowed)
        # test-ood: every scene has a held-out pair
        while split == "test-ood" and not any(pair_of(o) in HELD_OUT for o in objects):
            objects = draw_scene(rng, n_objects, allowed)
        image, masks = render(objects)
        image_id = f"{split}-{i:05d}"
        Image.fromarray(image).save(out_dir / "images" / f"{image_id}.png")
        for k, m in enumerate(masks):
            save_mask(m, out_dir / "masks" / f"{image_id}-{k}.png")
        # pre-training: every kind its scene allows; the small splits: one question per image
        if kinds is None:
            picked = pretrain_kinds(n_objects)
        else:
            picked = [kinds[int(rng.integers(len(kinds)))]]
        for kind in picked:
            # test-ood asks about a held-out object: that is what the split tests
            held = [k for k, o in enumerate(objects) if pair_of(o) in HELD_OUT]
            asked = held[0] if split == "test-ood" else None
            q, a, o_index = questions(rng, objects, kind, asked)
            item = {"id": f"{image_id}-{kind}", "image": f"images/{image_id}.png", "question": q,
                    "answer": a, "category": kind, "caption": caption(objects), "objects": objects}
            masks_of = answer_masks(image_id, objects, kind, a, o_index)
            if masks_of:
                item["masks"] = masks_of
            items.append(item)
    with open(out_dir / f"{split}.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return items


def oracle_store(items, root, out_dir, dm_name="oracle-masks"):
    """The attention store of the ground truth: for each item, one map per answer word that has a
    mask (the object it names), that mask area-resized to 32x32 and min-max normalised, written by
    data.save_maps in the format extract.py writes (words as data.split_words cuts the answer,
    metadata text = the answer), so train.py and evaluate.py read it as they read DM maps. Items
    without such a word get no file (they train with L_VLM alone). Returns the number of files.

    A mask filed under a word that is not in the answer, an empty mask, or a mask of another size
    than its image is refused (ValueError naming the item and word): a silently wrong target would
    train the model toward the wrong place.
    """
    import torch
    from data import MAP_SIZE, item_regions, maps_path, save_maps, split_words
    written = 0
    for it in items:
        regions = item_regions(it, root, lambda w: w.lower())  # {word: (H, W) bool}
        words = list(dict.fromkeys(w for w, _, _ in split_words(it["answer"])))
        stray = sorted(set(regions) - set(words))
        if stray:
            raise ValueError(f"item {it['id']!r}: masks for {stray}, which are not words of its "
                             f"answer {it['answer']!r}")
        maps, kept = [], []
        for word in words:
            if word not in regions:
                continue
            if not regions[word].any():
                raise ValueError(f"item {it['id']!r}: the mask of {word!r} is empty")
            mask = Image.fromarray(regions[word].astype(np.float32))
            # each cell's coverage by the mask
            m = np.asarray(mask.resize((MAP_SIZE, MAP_SIZE), Image.BOX), np.float32)  # (32, 32)
            maps.append((m - m.min()) / max(m.max() - m.min(), 1e-8))
            kept.append(word)
        if kept:
            save_maps(maps_path(out_dir, it["id"]), torch.from_numpy(np.stack(maps)), kept,
                      {"text": it["answer"], "dm": dm_name, "res": SIZE})
            written += 1
    return written


def other_object_items(items):
    """Control targets: each item with its answer's mask replaced by the mask of another object of
    the same image (the next in drawing order; build_split files object k's mask as
    masks/<image id>-<k>.png), so that oracle_store writes a store of wrong places in the right
    format. A gain these targets also give is regularisation, not grounding. Items with one object
    or no mask are left out."""
    controls = []
    for it in items:
        rels = set((it.get("masks") or {}).values())
        if len(it.get("objects") or []) < 2 or not rels:
            continue
        if len(rels) != 1:
            raise ValueError(f"item {it['id']!r}: its answer words name more than one object: "
                             f"{it['masks']}")
        stem, k = rels.pop().removesuffix(".png").rsplit("-", 1)
        other = f"{stem}-{(int(k) + 1) % len(it['objects'])}.png"
        controls.append({**it, "masks": {word: other for word in it["masks"]}})
    return controls


def other_item_store(items, attn_dir, out_dir, seed=0):
    """Control targets: each item gets the maps of another item with the same answer (so another
    image) from the store attn_dir, saved under its own id in the store's format: maps of the right
    words in the wrong images. Items without maps, or whose answer no other item with maps shares,
    get no file. Returns the number of files."""
    from data import maps_path, read_maps, save_maps
    rng = np.random.default_rng(seed)
    donors = {}  # answer -> ids of the items with maps
    for it in items:
        if maps_path(attn_dir, it["id"]).exists():
            donors.setdefault(it["answer"], []).append(it["id"])
    written = 0
    for it in items:
        others = [i for i in donors.get(it["answer"], []) if i != it["id"]]
        if not others or it["id"] not in donors[it["answer"]]:
            continue
        maps, words = read_maps(attn_dir, others[int(rng.integers(len(others)))])
        meta = {"text": it["answer"], "dm": "other-item", "res": SIZE}
        save_maps(maps_path(out_dir, it["id"]), maps, words, meta)
        written += 1
    return written


def write_captions(out_dir, items):
    """test-captions.jsonl: one captioning item per test-id image (never seen by toy-sd in
    training), masks for every colour word: the toy-sd pointing check runs on these."""
    lines = {}
    for it in items:
        image_id = Path(it["image"]).stem
        masks = {}
        for k, o in enumerate(it["objects"]):
            masks[o["colour"]] = f"masks/{image_id}-{k}.png"
        lines[image_id] = {"id": f"{image_id}-caption", "image": it["image"],
                           "question": CAPTION_PROMPT, "answer": it["caption"],
                           "category": "caption", "caption": it["caption"],
                           "objects": it["objects"], "masks": masks}
    with open(Path(out_dir) / "test-captions.jsonl", "w") as f:
        for line in lines.values():
            f.write(json.dumps(line) + "\n")


def build_world(out_dir, seed=0, finetune_items=None):
    """Draw every split of the world into out_dir (deterministic by seed); returns {split: jsonl
    path}.

    finetune_items: the finetune split's size (default SPLITS', 100). A cached world (world.json
    with the same seed and splits) is reused as it is.
    """
    out_dir = Path(out_dir)
    splits = dict(SPLITS)
    if finetune_items is not None:
        splits["finetune"] = (finetune_items, *SPLITS["finetune"][1:])
    stamp = {"seed": seed, "splits": {k: list(map(str, v)) for k, v in splits.items()},
             "held_out": HELD_OUT, "version": 5}
    paths = {split: out_dir / f"{split}.jsonl" for split in (*SPLITS, "test-captions")}
    info = out_dir / "world.json"
    # a cached world: the same stamp (compared as JSON reads it) and every split's file
    cached = info.exists() and json.loads(info.read_text()) == json.loads(json.dumps(stamp))
    if cached and all(p.exists() for p in paths.values()):
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
# the world's words: the toy models' tokenizers make each of them one token
# ---------------------------------------------------------------------------------------------

PUNCTUATION = (",", ".", "?")


def world_words():
    """Every word the world's texts use (captions, questions, answers), sorted."""
    words = set(COLOURS) | set(TEXTURES) | set(COUNT_WORDS)
    words |= set("and left right top bottom at what colour is the object where "
                 "how many objects are there describe image".split())
    return sorted(words)


def world_corpus():
    """Texts the toy VLM's tokenizer is trained on: every world word alone and after a space, so
    each is one byte-level BPE token in both forms ("red" after the header's newlines, " red"
    inside)."""
    words = world_words()
    return words + [" ".join(words)] * 4 + [f"x {w} x" for w in words] * 4 + list(PUNCTUATION)

