"""Tests of toy.py: the miniature world, the shipped toy-sd and toy VLM, the demo end to end.

CPU only, nothing downloaded; the shipped weights in toy_models/ are read as they are.
Run: python -m pytest -q tests/test_toy.py
"""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import aggregate
import base_models
import capture
import data
import evaluate
import extract
import models
import toy
import toy_protocol
import toy_teachers
import world

SHIPPED_SD = toy.TOY_MODELS / "toy-sd"
SHIPPED_VLM = toy.TOY_MODELS / "toy-vlm"
# Set below what was measured on many held-out items (toy_report.md), since the tests use a dozen:
# toy-sd's colour words point 0.92 on world 0's 300 test-id answers (chance about 0.1, an object's
# share of the image; a teacher trained without the localisation loss 0.35) with entropy 5.08,
# below the base VLM's own 5.46; 24 caption words of 12 held-out images here: 1.00, 4.92
POINTING_THRESHOLD = 0.8
ENTROPY_BOUND = 5.46          # nats: the base VLM's own attention entropy on world 0's test-id
VQA_THRESHOLD = 0.9           # toy VLM, one-object questions (test-one): 1.00 measured on 200 items


def digest(folder):
    """sha256 over every file of a folder (names and bytes), sorted."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name != "world.json":
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def read(path):
    return [json.loads(line) for line in open(path)]


# ---------------------------------------------------------------------------------------------
# the world
# ---------------------------------------------------------------------------------------------

def test_world_is_deterministic_by_seed(small_world, tmp_path):
    out, _ = small_world
    again = tmp_path / "again"
    other = tmp_path / "other"
    world.build_world(again, seed=3)
    world.build_world(other, seed=4)
    assert digest(again) == digest(out)
    assert digest(other) != digest(out)


def test_a_larger_finetune_split_extends_the_smaller_one(small_world, tmp_path):
    """--finetune-items draws more fine-tuning images from the same stream: the smaller split's
    items come first, unchanged; the other splits and their files are untouched; the stamp tells
    them apart."""
    out, paths = small_world
    bigger = world.build_world(tmp_path / "big", seed=3, finetune_items=12)
    small, big = read(paths["finetune"]), read(bigger["finetune"])
    assert len(small) == 8 and len(big) == 12 and big[:8] == small
    for split in ("pretrain", "test-id", "test-ood", "test-captions"):
        assert read(bigger[split]) == read(paths[split])
    stamp = json.loads((tmp_path / "big" / "world.json").read_text())
    assert stamp["splits"]["finetune"][0] == "12"
    assert (tmp_path / "big" / "world.json").read_text() != (out / "world.json").read_text()


def object_of(item, rel):
    """The object a mask file (masks/<image>-<k>.png) is of."""
    return item["objects"][int(Path(rel).stem.rsplit("-", 1)[1])]


def test_masks_match_drawings(small_world):
    """Every mask is exactly the pixels drawn in its object's colour (lit) or its dim (objects never
    overlap: one per cell), inside the object's cell, and the word a mask is filed under names
    that object's colour or cell."""
    out, paths = small_world
    checked = 0
    for split in ("finetune", "test-id", "test-ood", "test-one", "test-captions"):
        for item in read(paths[split]):
            pixels = np.asarray(Image.open(out / item["image"]).convert("RGB"))  # (32, 32, 3)
            for word, rel in item.get("masks", {}).items():
                mask = np.asarray(Image.open(out / rel)) > 127  # (32, 32)
                obj = object_of(item, rel)
                assert word in (obj["colour"], *obj["cell"].split()), (item["id"], word, obj)
                lit = np.array(world.COLOURS[obj["colour"]])
                dim = np.round(lit * world.DIM)
                drawn = (pixels == lit).all(-1) | (pixels == dim).all(-1)  # (32, 32)
                assert mask.sum() >= 20 and np.array_equal(mask, drawn), (item["id"], word)
                shape = world.shape_mask(obj["shape"], obj["cx"], obj["cy"], obj["r"])
                assert np.array_equal(mask, shape)
                x0, y0 = world.CELLS[obj["cell"]]
                ys, xs = mask.nonzero()
                assert xs.min() >= x0 and xs.max() < x0 + 16
                assert ys.min() >= y0 and ys.max() < y0 + 16
                # the texture: lit pixels exactly where the texture lights them
                texture = world.texture_lit(obj["texture"])
                assert np.array_equal((pixels == lit).all(-1) & mask, texture & mask)
                checked += 1
    assert checked > 30


def test_texture_worked_example():
    """A 4x4 corner of each texture (1 = lit): each shows in any 2x2 pixels."""
    corner = {t: world.texture_lit(t)[:4, :4].astype(int).tolist() for t in world.TEXTURES}
    assert corner["solid"] == [[1] * 4] * 4
    assert corner["striped"] == [[1] * 4, [0] * 4, [1] * 4, [0] * 4]
    assert corner["checked"] == [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]
    assert corner["dotted"] == [[1, 0, 1, 0], [0] * 4, [1, 0, 1, 0], [0] * 4]


def test_answers_are_true_of_the_scene(small_world):
    """Each answer follows from the scene alone, the question names exactly one object, and the
    answer's mask is of that object."""
    out, paths = small_world
    seen = set()
    for split in ("pretrain", "finetune", "test-id", "test-ood", "test-one"):
        for item in read(paths[split]):
            objs, q, a, kind = item["objects"], item["question"], item["answer"], item["category"]
            seen.add(kind)
            assert len({o["colour"] for o in objs}) == len({o["cell"] for o in objs}) == len(objs)
            named = {"colour-at": [o for o in objs if q.endswith(f"at the {o['cell']}?")],
                     "position": [o for o in objs if q == f"where is the {o['colour']} object?"]}
            if kind in named:
                # one object fits the question
                assert len(named[kind]) == 1, (item["id"], q)
                o = named[kind][0]
                expected = {"colour-at": o["colour"], "position": o["cell"]}[kind]
                assert a == expected, (item["id"], q, a)
                # every answer word has the mask of that object ("top left": "top" and "left")
                assert list(item["masks"]) == a.split()
                assert all(object_of(item, rel) == o for rel in item["masks"].values())
            elif kind == "count":
                assert a == world.COUNT_WORDS[len(objs)]
            elif kind == "caption":
                assert a == world.caption(objs)
    assert seen == {*world.PERCEPTION_KINDS, "count", "caption"}


def test_splits_follow_the_design(small_world):
    """pretrain asks about one object only in one-object scenes; fine-tuning never shows a held-out
    colour-cell pair; test-ood fills every cell and asks about a held-out pair."""
    _, paths = small_world
    for item in read(paths["pretrain"]):
        if item["category"] not in ("count", "caption"):
            assert len(item["objects"]) == 1
    held = {tuple(p) for p in world.HELD_OUT}
    for split, n in (("finetune", 3), ("test-id", 3), ("test-ood", 4), ("test-one", 1)):
        for item in read(paths[split]):
            assert len(item["objects"]) == n
            if split == "finetune":
                assert not {(o["colour"], o["cell"]) for o in item["objects"]} & held
            if split == "test-ood":
                o = object_of(item, item["masks"][item["answer"].split()[0]])
                assert (o["colour"], o["cell"]) in held


def test_oracle_store_is_the_masks_in_the_store_format(small_world, tmp_path):
    """world.oracle_store: one file per item with a mask, the answer word's mask as its map, read
    back by data.check_maps as a usable target for that answer (the format train.py reads); a
    two-word answer ("top left", a test-one position question) gets both words, each with the
    object's mask."""
    out, paths = small_world
    items = data.read_items(paths["finetune"]) + data.read_items(paths["test-one"])
    assert world.oracle_store(items, out, tmp_path / "oracle") == len(items)
    assert {len(it["answer"].split()) for it in items} == {1, 2}
    for it in items:
        path = data.maps_path(tmp_path / "oracle", it["id"])
        assert data.check_maps(path, it["answer"]) == (it["answer"].split(), None)
        maps, words, meta = data.load_maps(path)
        assert maps.shape == (len(words), 32, 32) and meta["dm"] == "oracle-masks"
        for word, m in zip(words, maps):
            mask = np.asarray(Image.open(out / it["masks"][word])) > 127
            assert torch.equal(m, torch.from_numpy(mask).float())


def test_raw_entropies_before_and_after_min_max(small_world, tmp_path):
    """base_models.raw_entropies: its min-max entropies are those of the maps the project compares,
    on the DM side the maps extract.py stores for the same items and steps, on the VLM side
    evaluate.py's own maps of the answer word (mean-mean, every layer); raw entropies lie between
    them and a uniform map's."""
    _, paths = small_world
    items = [it for it in data.read_items(paths["test-id"]) if it.get("masks")][:4]
    dm = models.load_dm("toy-sd", path=SHIPPED_SD)
    model, processor = models.load_vlm("toy", str(SHIPPED_VLM))
    result = base_models.raw_entropies(model.eval(), processor, dm, items, inversion_steps=2,
                                       denoise_steps=1)
    extract.extract(items, dm, tmp_path / "attn", inversion_steps=2, denoise_steps=1, batch_size=16,
                    layers=models.PRESETS["toy-sd"]["layers"], progress=False)
    stored = [data.read_maps(tmp_path / "attn", it["id"])[0] for it in items]
    stored = torch.cat(stored)  # (4, 32, 32)
    dm_entropy = float(evaluate.attention_entropy(stored).mean())
    assert result["dm"]["min-max"] == pytest.approx(dm_entropy, abs=1e-2)
    own = {"aggregation": "mean-mean", "layers": aggregate.aligned_layers(model), "match": "exact",
           "aligner": None, "aligner_mode": "auto", "learned": False}
    store = {it["id"]: data.read_maps(tmp_path / "attn", it["id"]) for it in items}
    answers = evaluate.answer_maps(model, processor, items, store, own, show=False)
    maps = torch.cat([m["own"] for m in answers])
    assert maps.shape == (4, 32, 32)
    vlm_entropy = float(evaluate.attention_entropy(maps).mean())
    assert result["vlm"]["min-max"] == pytest.approx(vlm_entropy, abs=1e-3)
    for side in ("dm", "vlm"):
        assert 0.0 < result[side]["min-max"] <= result[side]["raw"] <= math.log(32 * 32) + 1e-4


def test_control_stores_are_wrong_targets_in_the_right_format(small_world, tmp_path):
    """The protocol's controls: world.other_object_items points each answer word at another object
    of the same image (a mask disjoint from the asked object's); world.other_item_store gives each
    item the maps of another item with the same answer, under its own id, readable as a target."""
    out, paths = small_world
    items = [it for it in data.read_items(paths["finetune"]) if it.get("masks")]
    controls = world.other_object_items(items)
    assert len(controls) == sum(len(it["objects"]) > 1 for it in items) > 0
    by_id = {it["id"]: it for it in items}
    # masks/<image id>-<k>.png -> <image id>
    image_of = lambda rel: Path(rel).stem.rsplit("-", 1)[0]  # noqa: E731
    for c in controls:
        (word, rel), = c["masks"].items()
        (right,) = by_id[c["id"]]["masks"].values()
        # another object of the same image
        assert word == c["answer"] and rel != right and image_of(rel) == image_of(right)
        wrong = np.asarray(Image.open(out / rel)) > 127
        asked = np.asarray(Image.open(out / right)) > 127
        assert not (wrong & asked).any()
    assert world.oracle_store(controls, out, tmp_path / "object") == len(controls)
    # another item's map: a store with one distinct map per item, then swapped between items of
    # the same answer
    store = tmp_path / "dm"
    for n, it in enumerate(items):
        distinct = torch.full((1, 32, 32), n / len(items))
        data.save_maps(data.maps_path(store, it["id"]), distinct, [it["answer"]],
                       {"text": it["answer"]})
    written = world.other_item_store(items, store, tmp_path / "other", seed=0)
    shared = [it for it in items if sum(o["answer"] == it["answer"] for o in items) > 1]
    assert written == len(shared) > 0
    for n, it in enumerate(items):
        path = data.maps_path(tmp_path / "other", it["id"])
        assert path.exists() == (it in shared)
        if it in shared:
            maps, words, meta = data.load_maps(path)
            donor = items[round(float(maps[0, 0, 0]) * len(items))]
            assert donor["id"] != it["id"]
            assert donor["answer"] == it["answer"] == words[0] == meta["text"]
            assert data.check_maps(path, it["answer"]) == ([it["answer"]], None)


def test_oracle_store_resizes_and_refuses_stray_masks(tmp_path):
    """A 64x64 mask becomes its 32x32 coverage (min-max: a half-covered cell is 0.5); a mask filed
    under a word that is not in the answer, or an empty one, is refused, naming the item."""
    mask = np.zeros((64, 64), np.uint8)
    # cells (0, 0) and (1, 0) full, (0, 1) and (1, 1) half
    mask[0:4, 0:3] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "im.png")
    item = {"id": "x", "image_path": str(tmp_path / "im.png"), "answer": "Red.",
            "masks": {"red": "m.png"}}
    world.oracle_store([item], tmp_path, tmp_path / "store")
    maps, words, _ = data.load_maps(data.maps_path(tmp_path / "store", "x"))
    assert words == ["red"] and maps.shape == (1, 32, 32)
    assert maps[0, :2, :2].tolist() == [[1.0, 0.5], [1.0, 0.5]] and maps[0].sum() == 3.0
    with pytest.raises(ValueError, match="item 'x': masks for \\['blue'\\]"):
        world.oracle_store([dict(item, masks={"blue": "m.png"})], tmp_path, tmp_path / "store2")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="item 'x': the mask of 'red' is empty"):
        world.oracle_store([dict(item, masks={"red": "empty.png"})], tmp_path, tmp_path / "store3")
    assert world.oracle_store([dict(item, masks={})], tmp_path, tmp_path / "store4") == 0


def test_world_reads_through_the_project(small_world):
    """The JSONL is the DESIGN.md format: data.read_items and data.collate take it unchanged."""
    _, paths = small_world
    items = data.read_items(paths["finetune"])
    assert all(Path(it["image_path"]).exists() for it in items)
    model, processor = base_models.toy_vlm(seed=0)
    batch = data.collate(processor, items[:3])
    assert batch["pixel_values"].shape == (3, 1, 1, 3, 32, 32)
    # every world word is one token of each tokenizer
    clip = toy_teachers.toy_sd_tokenizer()
    for word in world.world_words():
        assert len(clip.tokenize(word)) == 1
        assert len(processor.tokenizer.tokenize(" " + word)) == 1


def test_clip_tokenizer_worked_example():
    tok = toy_teachers.toy_sd_tokenizer()
    pieces = tok.convert_ids_to_tokens(tok("red at top left, blue? redd").input_ids)
    assert pieces == ["<|startoftext|>", "red</w>", "at</w>", "top</w>", "left</w>", ",</w>",
                      "blue</w>", "?</w>", "re", "d", "d</w>", "<|endoftext|>"]


# ---------------------------------------------------------------------------------------------
# the shipped models
# ---------------------------------------------------------------------------------------------

def test_colour_masks_are_each_objects_drawing_by_colour():
    """toy_teachers.colour_masks: channel c of scene i is the drawn mask of scene i's object of
    colour c (world.render's), and zero for a colour the scene does not have."""
    red = dict(colour="red", texture="solid", shape="square", cell="top left", r=5.0)
    red.update(cx=8.0, cy=8.0)
    blue = dict(red, colour="blue", texture="dotted", shape="circle", cell="bottom right")
    blue.update(cx=24.0, cy=24.0)
    green = dict(red, colour="green", shape="triangle", cell="top right", cx=24.0)
    scenes = [[red, blue], [green]]
    masks = toy_teachers.colour_masks(scenes)
    colours = list(world.COLOURS)
    assert masks.shape == (2, len(colours), 32, 32)
    for i, objects in enumerate(scenes):
        drawn = dict(zip([o["colour"] for o in objects], world.render(objects)[1]))
        for c, colour in enumerate(colours):
            expected = drawn.get(colour, np.zeros((32, 32), bool))
            assert torch.equal(masks[i, c], torch.from_numpy(expected).float())
    assert masks[0, colours.index("red"), 8, 8] == 1 and masks[0, colours.index("red"), 24, 24] == 0


def test_localisation_loss_worked_example():
    """toy_teachers.localisation_loss: mean outside plus mean on the other objects minus mean inside
    the word's object, averaged over the colour tokens whose object is drawn. A map that is 1 on
    the object and 0 elsewhere gives -1, a uniform map 0 (no other object), the object's
    complement +1; a colour token without its object in the scene and every other token are left
    out; with a second object, a map lit on it too pays for it twice."""
    colour_ids = torch.tensor([7, 8])  # two colour words
    mask = torch.zeros(2, 32, 32)
    mask[0, :8, :8] = 1  # colour 0's object
    # (1, 2, 32, 32): colour 1's object is absent
    masks = mask[None]
    # start, colour 0, colour 1, end
    ids = torch.tensor([[1, 7, 8, 2]])
    maps = torch.zeros(1, 4, 32, 32)
    # the start token and colour 1 (its object absent) are left out, whatever their maps
    maps[0, 0] = 0.3
    maps[0, 2] = 0.5
    loss = lambda: float(toy_teachers.localisation_loss(maps, ids, masks, colour_ids))  # noqa: E731
    uniform = torch.full((32, 32), 0.4)
    for word_map, expected in ((mask[0], -1.0), (uniform, 0.0), (1 - mask[0], 1.0)):
        maps[0, 1] = word_map
        assert loss() == pytest.approx(expected, abs=1e-6)
    # 0.75 inside, 0.25 outside
    maps[0, 1] = 0.25 + 0.5 * mask[0]
    assert loss() == pytest.approx(-0.5)
    # colour 1's object (4 pixels) drawn too. Colour 0's word lit on both objects: 4 of its 960
    # outside pixels at 1, the other object's mean 1, its own 1 -> 4/960. Colour 1's word lit on
    # its own object only -> -1. The loss is their mean.
    masks[0, 1, 20:22, 20:22] = 1
    maps[0, 1] = mask[0] + masks[0, 1]
    maps[0, 2] = masks[0, 1]
    assert loss() == pytest.approx((4 / 960 - 1) / 2, abs=1e-6)
    # a batch of two, each row reading its own scene's masks. Row 0: colour 0's word exactly on its
    # object (-1), colour 1's word all 0 with its object drawn (0). Row 1: its colour 0 object is
    # at the bottom right, the same map misses it (64 of 960 outside pixels lit: 64/960); colour 1
    # is absent there. The loss is the mean over those three tokens.
    second = torch.zeros(2, 32, 32)
    second[0, 24:, 24:] = 1
    masks, ids = torch.stack([masks[0], second]), torch.cat([ids, ids])
    maps = torch.cat([maps, maps])
    maps[:, 1], maps[:, 2] = mask[0], 0.0
    assert loss() == pytest.approx((-1 + 0 + 64 / 960) / 3, abs=1e-6)
    masks = torch.zeros(2, 2, 32, 32)
    assert loss() == 0.0


def test_shipped_toy_sd_points_at_objects(small_world, tmp_path):
    """Held-out captions: the argmax of a colour word's map (extract.py, the sd14 path, the preset's
    layers) falls inside the word's object, and the maps are sharper than the base VLM's own."""
    _, paths = small_world
    dm = models.load_dm("toy-sd", path=SHIPPED_SD)
    assert dm["res"] == 32 and dm["vae"] is not None
    items = data.read_items(paths["test-captions"])[:12]
    summary = extract.extract(items, dm, tmp_path / "attn", inversion_steps=5, denoise_steps=5,
                              batch_size=12, layers=models.PRESETS["toy-sd"]["layers"],
                              progress=False)
    assert summary["done"] == len(items)
    result = base_models.dm_pointing(items, tmp_path / "attn")
    assert result["n"] >= 20
    assert result["accuracy"] >= POINTING_THRESHOLD, result
    assert result["entropy"] < ENTROPY_BOUND, result
    # caption masks: colour words alone
    assert result["colour"] == result["accuracy"], result


def test_shipped_toy_vlm_loads_through_train_and_answers(small_world):
    _, paths = small_world
    model, processor = models.load_vlm("toy", str(SHIPPED_VLM))
    assert processor.tokenizer.convert_tokens_to_ids("<|image|>") == model.config.image_token_index
    items = data.read_items(paths["test-one"])[:20]  # held-out one-object scenes
    accuracy = base_models.kind_accuracy(model, processor, items)
    assert all(accuracy[k] >= VQA_THRESHOLD for k in world.PERCEPTION_KINDS), accuracy


def steered_forward(model, inputs, rows, targets):
    """The toy VLM's logits under SteeredAttention: at alpha 0, at alpha 1 on layer 0 alone (which
    has no cross-attention) and at alpha 1 on every layer; with the last cross-attention layer's
    values and its output projection's input at the last forward ({"v", "o"}). The model is left
    as it was (attention implementation, STEERED's settings, no hooks)."""
    layer = models.attention_module(model, 3)  # the last cross-attention layer
    seen = {}
    hooks = [layer.v_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("v", o)),
             layer.o_proj.register_forward_pre_hook(lambda m, i: seen.__setitem__("o", i[0]))]
    base_models.register_steered()
    config = model.config.get_text_config()
    own_implementation = config._attn_implementation
    steer = base_models.STEERED
    logits = []
    try:
        config._attn_implementation = base_models.SteeredAttention.NAME
        steer.rows, steer.targets, steer.alpha = rows, targets, 0.0
        logits.append(model(**inputs).logits)
        steer.alpha, steer.layers = 1.0, [0]  # layer 0 has no cross-attention
        logits.append(model(**inputs).logits)
        steer.layers = None
        logits.append(model(**inputs).logits)
    finally:
        steer.rows, steer.alpha, steer.layers = None, 0.0, None
        config._attn_implementation = own_implementation
        for h in hooks:
            h.remove()
    return logits, seen


def test_steered_attention_changes_only_where_the_row_looks(small_world):
    """SteeredAttention at alpha 0 is the model's own forward; at alpha 1, with a target one-hot on
    image token 10, the steered row of each sample (a different position in each) reads exactly
    that token's values in every head, the positions before it keep their logits (causal), and a
    layer without cross-attention is left alone. The mask targets are distributions on the asked
    object's patches, in its cell; attention_ceiling at alpha 0 is the plain teacher-forced accuracy
    and leaves the model's attention as it was."""
    _, paths = small_world
    # trained: a new model's gates are 0
    model, processor = models.load_vlm("toy", str(SHIPPED_VLM))
    model.eval()
    items = [it for it in data.read_items(paths["test-id"]) if it.get("masks")][:3]
    batch = data.collate(processor, items)
    inputs = data.model_inputs(batch)
    plain = model(**inputs).logits
    # a different row each
    rows = capture.answer_rows(batch["labels"])[:, 0] - torch.arange(3)  # (3,)
    config = model.config.get_text_config()
    own_implementation = config._attn_implementation
    one = torch.zeros(len(items), 65)
    one[:, 10] = 1.0
    (alpha_0, layer_0, steered), seen = steered_forward(model, inputs, rows, one)
    assert torch.allclose(alpha_0, plain, atol=1e-5)
    assert torch.allclose(layer_0, plain, atol=1e-5)
    values = seen["v"].view(3, 65, config.num_key_value_heads, -1)  # (B, N, KV heads, d)
    groups = config.num_attention_heads // config.num_key_value_heads
    for b, r in enumerate(rows.tolist()):
        token_10 = values[b, 10].repeat_interleave(groups, 0).flatten()
        assert torch.allclose(seen["o"][b, r], token_10, atol=1e-5)
        assert torch.allclose(steered[b, :r], plain[b, :r], atol=1e-5)
        assert not torch.allclose(steered[b, r], plain[b, r], atol=1e-4)
    targets = base_models.mask_targets(items)
    assert targets.shape == (3, 65) and torch.allclose(targets.sum(1), torch.ones(3))
    assert (targets[:, 0] == 0).all()
    # the asked object's patches, inside its cell's 4x4 patches
    for it, t in zip(items, targets):
        cell = next(o["cell"] for o in it["objects"] if o["colour"] == it["answer"])
        x0, y0 = world.CELLS[cell]
        grid = t[1:].reshape(8, 8)
        in_cell = grid[y0 // 4:(y0 + world.CELL) // 4, x0 // 4:(x0 + world.CELL) // 4]
        assert in_cell.sum() == pytest.approx(1.0)
    ceiling = base_models.attention_ceiling(model, processor, items, alphas=(0.0,))
    assert config._attn_implementation == own_implementation
    assert base_models.STEERED.rows is None
    rows = capture.answer_rows(batch["labels"])[:, 0]
    predicted = plain[torch.arange(3), rows].argmax(-1)
    own = (predicted == batch["input_ids"][torch.arange(3), rows + 1]).float().mean()
    assert ceiling[0.0] == pytest.approx(float(own), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# the demo, end to end in seconds: the real extract.py, train.py and evaluate.py on a few items
# ---------------------------------------------------------------------------------------------

def test_quick_demo_end_to_end(small_world, tmp_path):
    """The demo with its default report, <out>/toy_report.md: the shipped one stays untouched."""
    world, _ = small_world
    shipped = (toy.ROOT / "toy_report.md").read_bytes()
    rows = toy.main(["--world", str(world), "--out", str(tmp_path / "demo"), "--seeds", "0",
                     "--steps", "2", "--batch-size", "4", "--limit", "8", "--inversion-steps", "2",
                     "--denoise-steps", "1", "--quiet"])
    table = dict((r[0], r[1:]) for r in rows)
    for split in ("test-id", "test-ood"):
        # base, AR, Lavender: all measured
        for value in table[f"accuracy {split}"]:
            assert 0.0 <= float(value.split(" ± ")[0]) <= 1.0
    dm_cell = table["DM maps of the same words: entropy, pointing (test-id)"][0]
    entropy, pointing = dm_cell.split(", ")
    assert 0.0 < float(entropy) <= 6.932 and 0.0 <= float(pointing) <= 1.0
    # one ruler: base, AR and Lavender
    for value in table["VLM's own attention: pointing (test-id)"]:
        assert 0.0 <= float(value.split(" ± ")[0]) <= 1.0
    assert table["Aligner head: pointing (test-id)"][:2] == ("", "")  # a head is Lavender's alone
    assert 0.0 <= float(table["Aligner head: pointing (test-id)"][2].split(" ± ")[0]) <= 1.0
    for arm, loss in (("ar", "ar"), ("lavender", "lavender"), ("oracle", "lavender")):
        config = json.loads((tmp_path / "demo" / "runs" / f"{arm}-s0" / "config.json").read_text())
        assert config["loss"] == loss and config["max_steps"] == 2 and config["model"] == "toy"
    oracle = json.loads((tmp_path / "demo" / "runs" / "oracle-s0" / "config.json").read_text())
    read_path = toy_protocol.READ_PATH
    assert "oracle-" in oracle["attn"] and all(oracle[k] == v for k, v in read_path.items())
    figures = json.loads((tmp_path / "demo" / "toy_report.json").read_text())
    for arm in ("ar", "lavender", "oracle"):
        assert set(figures[arm]["accuracy"]) == {"test-id", "test-ood"}
        assert "own_pointing" in figures[arm]
    # minus AR of the same seed; one seed: no interval
    for arm in ("lavender", "oracle"):
        gap = figures[arm]["minus_ar"]["test-id"]
        assert gap["n"] == 1 and gap["low"] is None and gap["high"] is None
        expected = figures[arm]["accuracy"]["test-id"] - figures["ar"]["accuracy"]["test-id"]
        assert gap["mean"] == pytest.approx(expected, abs=1e-6)
    assert {"dm_pointing", "dm_entropy", "base_own_entropy", "base_accuracy"} <= set(figures)
    assert set(figures["attention_ceiling"]) == {"test-id", "test-ood"}
    assert all(set(c) == {"as_is", "steered"} and 0.0 <= min(c.values()) <= max(c.values()) <= 1.0
               for c in figures["attention_ceiling"].values())
    log_path = tmp_path / "demo" / "runs" / "lavender-s0" / "log.jsonl"
    lavender_log = [json.loads(l) for l in open(log_path)]
    # the DM maps reached the loss
    assert any(entry["aligned_words"] > 0 for entry in lavender_log)
    report = (tmp_path / "demo" / "toy_report.md").read_text()
    assert "| accuracy test-id |" in report and "toy_report/" in report
    assert any((tmp_path / "demo" / "toy_report").glob("test-id-*.png"))  # pictures beside it
    assert (toy.ROOT / "toy_report.md").read_bytes() == shipped


def test_retraining_paths_write_loadable_models(small_world, tmp_path):
    """`toy.py train-sd` and `train-vlm` (a few steps here) write folders that load through the same
    code as the shipped ones: models.load_dm("toy-sd", path) and models.load_vlm("toy", path)."""
    world, _ = small_world
    toy_teachers.train_sd(tmp_path / "sd", world, seed=3, steps=2, batch=4, vae_steps=2)
    dm = models.load_dm("toy-sd", path=tmp_path / "sd")
    positions = models.SD_SIZES["toy-sd"]["text_encoder"]["max_position_embeddings"]
    assert dm["res"] == 32 and dm["text_encoder"].config.max_position_embeddings == positions
    # --init-from (how the shipped toy-sd was continued): the VAE and its scaling factor are kept
    # frozen, the UNet moves on from the loaded weights
    toy_teachers.train_sd(tmp_path / "sd2", world, seed=3, steps=2, batch=4,
                          init_from=tmp_path / "sd")
    dm2 = models.load_dm("toy-sd", path=tmp_path / "sd2")
    assert dm2["vae"].config.scaling_factor == dm["vae"].config.scaling_factor
    for (name, a), b in zip(dm["vae"].state_dict().items(), dm2["vae"].state_dict().values()):
        assert torch.equal(a, b), name
    unets = zip(dm["unet"].state_dict().values(), dm2["unet"].state_dict().values())
    moved = [not torch.equal(a, b) for a, b in unets]
    assert any(moved)
    base_models.train_vlm(tmp_path / "vlm", world, seed=3, steps=2, batch=4)
    model, processor = models.load_vlm("toy", str(tmp_path / "vlm"))
    assert json.loads((tmp_path / "vlm" / "training.json").read_text())["steps"] == 2


def test_extraction_cache_is_keyed_on_every_file_of_the_teacher(small_world, tmp_path):
    """prepare_world reuses maps only for the same teacher files and settings: a changed config
    file (no weight touched) or another --dm gives another attention folder, never stale maps."""
    import shutil
    root, _ = small_world
    teacher = tmp_path / "toy-sd"
    shutil.copytree(SHIPPED_SD, teacher, ignore=shutil.ignore_patterns("step*"))
    args = toy.build_parser().parse_args(["--threads", "1", "--quiet", "--limit", "1",
                                          "--dm-path", str(teacher)])

    def folder(out):  # {split: attention folder}; the key is the folder's parent
        return toy_protocol.prepare_world(args, 3, root, tmp_path / out, lambda text: None)[1]
    first = folder("a")["finetune"]
    assert folder("b")["finetune"].parent.name == first.parent.name     # the same files: one key
    config = teacher / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    assert folder("c")["finetune"].parent.name != first.parent.name     # a config: another key
    args.dm, args.dm_path = "toy-sdxl", str(toy.TOY_MODELS / "toy-sdxl")
    assert folder("d")["finetune"].parent.name != first.parent.name     # another teacher
