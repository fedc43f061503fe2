"""(not in the paper) The authors' released map layout: export and import.

The authors' training code (load_sd_attn in their release's diffag_utils.py) reads per-word maps
as 32x32 8-bit grey JPEGs named by word, one folder per image FILE NAME, in any subfolder of its
lpm_attention/ (the image stem here):

    <root>/<image file name>/lpm_attention/<image stem>/attention_<word>.jpg

Maps are per image: items that share an image share a folder. export_jpeg writes extract.py's
store (attn/<id>.safetensors, DESIGN.md) in that layout; import_jpeg reads the layout back into
the store, each item getting the maps of its answer's words (data.split_words) found in its
image's folder. extract.py's --export-jpeg and --import-jpeg run them (convert).

    python extract.py --data data.jsonl --out attn/ --export-jpeg jpeg/    # store -> JPEGs
    python extract.py --data data.jsonl --out attn/ --import-jpeg jpeg/    # JPEGs -> store
"""
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# the one map size and normalisation of DM and VLM maps
from aligner import MAP_SIZE, min_max
from data import is_complete, load_maps, maps_path, save_maps, split_words


def jpeg_folder(jpeg_dir, item):
    """<jpeg_dir>/<image file name>/lpm_attention: the folder of an item's image."""
    return Path(jpeg_dir) / Path(item["image"]).name / "lpm_attention"


def export_jpeg(items, attn_dir, jpeg_dir):
    """Write our maps in the authors' layout; returns (items exported, maps written).

    An image's folder collects the words of every item on that image; a word already written for
    the image by an earlier item keeps that item's map (with a warning naming both items).
    """
    # owner: (image file name, word) -> item id
    owner, items_done, maps_done = {}, 0, 0
    for item in items:
        path = maps_path(attn_dir, item["id"])
        if not is_complete(path):
            continue
        maps, words, _ = load_maps(path)
        folder = jpeg_folder(jpeg_dir, item) / Path(item["image"]).stem
        folder.mkdir(parents=True, exist_ok=True)
        for word, m in zip(words, maps):
            key = (Path(item["image"]).name, word)
            if key in owner:
                warnings.warn(f"item {item['id']!r}: image {key[0]!r} already has a map of "
                              f"{word!r} from item {owner[key]!r}; the layout holds one map "
                              f"per image and word, kept that one")
                continue
            owner[key] = item["id"]
            grey = (m.clamp(0, 1) * 255).round().to(torch.uint8).numpy()     # (32, 32) 8-bit
            Image.fromarray(grey, "L").save(folder / f"attention_{word}.jpg", quality=95)
            maps_done += 1
        items_done += 1
    return items_done, maps_done


def read_jpeg_maps(folder, words=None):
    """(maps float32 (n, 32, 32) in [0, 1], words) from the attention_<word>.jpg files anywhere
    under folder (the release reads every subfolder of lpm_attention/).

    words: the order to return (missing files are left out); default: every file, sorted by word.
    JPEG ringing moves the extremes a little, so each map is min-max normalised again.
    """
    paths = sorted(Path(folder).glob("**/attention_*.jpg"))
    files = {p.name[len("attention_"):-len(".jpg")]: p for p in paths}
    words = sorted(files) if words is None else [w for w in words if w in files]
    maps = torch.zeros(len(words), MAP_SIZE, MAP_SIZE)                         # (n, 32, 32)
    for i, word in enumerate(words):
        # 8-bit grey, 32x32 (resized if not)
        with Image.open(files[word]) as img:
            grey = img.convert("L").resize((MAP_SIZE, MAP_SIZE))
            maps[i] = torch.from_numpy(np.asarray(grey, dtype=np.float32))
    return min_max(maps), words


def import_jpeg(items, jpeg_dir, attn_dir, dm_name="authors-jpeg"):
    """Convert the authors' JPEG maps into our store: for each item, the maps of its answer's
    words (split_words, in order) found in its image's folder. Returns (items written, words
    found, answer words in all); an item none of whose words has a map is not written."""
    written, found, total = 0, 0, 0
    for item in items:
        words = list(dict.fromkeys(w for w, _, _ in split_words(item["answer"])))
        maps, words_found = read_jpeg_maps(jpeg_folder(jpeg_dir, item), words)
        total, found = total + len(words), found + len(words_found)
        if words_found:
            meta = {"text": item["answer"], "dm": dm_name}
            save_maps(maps_path(attn_dir, item["id"]), maps, words_found, meta)
            written += 1
    return written, found, total


def convert(items, attn_dir, export_dir=None, import_dir=None):
    """extract.py's --export-jpeg DIR (attn_dir's maps -> DIR) or, without it, --import-jpeg DIR
    (DIR's maps -> attn_dir), with its summary line; SystemExit when the source folder is
    missing."""
    flag, source = ("--out", attn_dir) if export_dir else ("--import-jpeg", import_dir)
    if not Path(source).is_dir():
        raise SystemExit(f"{flag} {source}: no such folder (looked for "
                         f"{Path(source).resolve()}); it holds the maps to convert")
    if export_dir:
        n_items, n_maps = export_jpeg(items, attn_dir, export_dir)
        print(f"exported {n_maps} maps of {n_items} items to {export_dir}")
        return
    n_items, found, total = import_jpeg(items, import_dir, attn_dir)
    print(f"imported {n_items} of {len(items)} items into {attn_dir}: {found} of their {total} "
          f"answer words have a map in {import_dir}")
