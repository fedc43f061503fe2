"""The miniature world: 32x32 images of 1-3 coloured shapes, their captions, VQA pairs about them,
and the mask of the object every answer word names (not in the paper: base_models.py trains the
toy models on it, toy.py runs the method on it).

build_world() draws every split, deterministic by seed, in the DESIGN.md JSONL format, so every
script reads it unchanged: captions such as "a red circle left of a blue square", questions about
the colour of a shape, the shape of a colour, a position, a count, yes/no. Splits: pretrain (the
base models' training; one object per image for VQA, so the VLM never needs to localise), finetune
(small, 2-3 objects, where it must: "what colour is the circle?"), test-id, and test-ood
(colour-shape pairs never seen in fine-tuning), plus test-captions (a caption per test-id image,
every colour and shape word with its mask).

    python toy.py build --world toy_out/world      # draw the world alone
"""
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

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
    there, so fine-tuning is where selecting the named object is learnt; multi-object scenes get
    counting only."""
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
# the world's words: the toy models' tokenizers make each of them one token
# ---------------------------------------------------------------------------------------------

PUNCTUATION = (",", ".", "?")


def world_words():
    """Every word the world's texts use (captions, questions, answers), sorted."""
    words = set(COLOURS) | set(SHAPES) | set(COUNT_WORDS)
    words |= set("a and left right of above below top bottom yes no what colour shape is the object where "
                 "how many objects are there describe image".split())
    return sorted(words)


def world_corpus():
    """Texts the toy VLM's tokenizer is trained on: every world word alone and after a space, so
    each is one byte-level BPE token in both forms ("red" after the header's newlines, " red" inside)."""
    words = world_words()
    return words + [" ".join(words)] * 4 + [f"x {w} x" for w in words] * 4 + list(PUNCTUATION)

