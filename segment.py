"""Zero-shot binary segmentation: how good are the DM maps as maps, measured the way the field
measures attention maps (not in the Lavender paper: DAAM, Tang et al. 2022; ConceptAttention,
Helbling et al. 2025, its zero-shot segmentation tables).

Each word that names an object gets one soft map (the attention store's (32, 32) map, min-max
normalised by extract.py) and one binary ground-truth mask. The map is resized to the mask's size
(bilinear) and binarised at its own mean (ConceptAttention's `mean_value_threshold`: a pixel is
foreground when its score is above the map's mean). Over a dataset:
  - pixel accuracy: correct pixels over all pixels, summed over the dataset;
  - IoU of foreground and of background, intersections and unions summed over the dataset (as
    ConceptAttention's scripts accumulate them), and mIoU, their mean;
  - mAP: the average precision of each image's pixel scores, then averaged over images.
ConceptAttention's ImageNet-Segmentation script scores stacked (1 - mask, mask) arrays, which
makes both class IoUs (TP + TN) / (2N - TP - TN): its mIoU is acc / (2 - acc), a function of pixel
accuracy alone (`miou_stacked` here; its Pascal VOC script scores the plain two-class IoU,
`miou`). Its AP ranks both channels together: scores 1 - s against the background and s against
the foreground, 2N pixels in one ranking (`ap`); `ap_fg` is the foreground channel alone.

Readers turn ImageNet-Segmentation's gtsegs_ijcv.mat (4,276 images, Guillaumin et al. 2014) and
Pascal VOC's single-class images into the project's JSONL (the answer is the class word, its mask
under "masks"), so extract.py runs on them unchanged and `score` reads its store.

    python segment.py imagenet --mat gtsegs_ijcv.mat --out imagenet_seg/ --class-names names.json
    python segment.py voc --voc-root VOCdevkit/VOC2012 --out voc_single/
    python extract.py --dm sd14 --data imagenet_seg/data.jsonl --out attn_seg/
    python segment.py score --data imagenet_seg/data.jsonl --attn attn_seg/
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data

# ---- metrics on one map ----


def resize_map(attn_map, size):
    """The soft map (h, w) resized to size (H, W), bilinear (half-pixel centres), as float64."""
    m = torch.as_tensor(np.asarray(attn_map, dtype=np.float32))
    if tuple(m.shape) != tuple(size):
        m = F.interpolate(m[None, None], size=tuple(size), mode="bilinear",
                          align_corners=False)[0, 0]  # (H, W)
    return m.double().numpy()


def binarise(soft):
    """Foreground where the score is above the map's mean (ConceptAttention's segmentation.py):
    [[1.0, 0.5], [0.25, 0.0]] (mean 0.4375) -> [[True, True], [False, False]]."""
    return soft > soft.mean()


def average_precision(scores, labels):
    """Average precision of scores (n,) against 0/1 labels (n,): sum over distinct thresholds,
    highest first, of (R_k - R_{k-1}) P_k (no interpolation; tied scores enter together), the
    step-wise AP of scikit-learn's average_precision_score. 0.0 without a positive (what
    np.nan_to_num makes of the undefined AP in ConceptAttention's scripts).
    scores [0.9, 0.8, 0.7, 0.6], labels [1, 0, 1, 0] -> 1/2 * 1 + 1/2 * 2/3 = 0.8333."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel() > 0
    if not labels.any():
        return 0.0
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    tp = np.cumsum(labels)                                            # (n,)
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]    # the end of each tie group
    precision, recall = tp[last] / (last + 1), tp[last] / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def score_map(attn_map, mask, void=None):
    """Counts and per-image figures of one soft map (h, w) against a bool mask (H, W); pixels
    where `void` (H, W) is True (Pascal VOC's 255 border) are left out. The 2x2 worked example:
    map [[1.0, 0.5], [0.25, 0.0]], mask [[1, 0], [0, 0]]: binarised [[1, 1], [0, 0]], so
    tp 1, fp 1, fn 0, tn 2; accuracy 3/4, iou_fg 1/2, iou_bg 2/3; ap_fg 1.0 (the one foreground
    pixel ranks first); ap 0.95 (both channels ranked together: 1.0 holds two positives, 0.75 one,
    0.5 a positive and a negative, 4 positives in all: 1/2 * 1 + 1/4 * 1 + 1/4 * 4/5)."""
    mask = np.asarray(mask, dtype=bool)
    keep = np.ones_like(mask) if void is None else ~np.asarray(void, dtype=bool)
    soft = resize_map(attn_map, mask.shape)[keep]                     # (n,)
    truth = mask[keep]                                                # (n,)
    pred = binarise(soft)
    tp, fp = int(np.sum(pred & truth)), int(np.sum(pred & ~truth))
    fn, tn = int(np.sum(~pred & truth)), int(np.sum(~pred & ~truth))
    ratio = lambda a, b: a / b if b else 1.0  # noqa: E731 -- an empty class in both: no error
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "accuracy": ratio(tp + tn, truth.size),
            "iou_fg": ratio(tp, tp + fp + fn), "iou_bg": ratio(tn, tn + fp + fn),
            "ap_fg": average_precision(soft, truth),
            "ap": average_precision(np.r_[1 - soft, soft], np.r_[~truth, truth])}


def summarise(rows):
    """The dataset's figures from score_map rows: counts summed over the dataset for pixel
    accuracy and the IoUs, per-image AP averaged. Two rows, tp/fp/fn/tn (1, 1, 0, 2) and
    (2, 0, 1, 1): accuracy 6/8, iou_fg 3/5, iou_bg 3/5, miou 0.6, miou_stacked 0.75 / 1.25 = 0.6."""
    if not rows:
        return {"n": 0}
    tp, fp, fn, tn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn", "tn"))
    acc = (tp + tn) / (tp + fp + fn + tn)
    iou_fg, iou_bg = tp / max(tp + fp + fn, 1), tn / max(tn + fp + fn, 1)
    return {"n": len(rows), "pixel_accuracy": acc, "iou_fg": iou_fg, "iou_bg": iou_bg,
            "miou": (iou_fg + iou_bg) / 2, "miou_stacked": acc / (2 - acc),
            "map": float(np.mean([r["ap"] for r in rows])),
            "map_fg": float(np.mean([r["ap_fg"] for r in rows]))}


# ---- the attention store against the items' masks ----

def phrase_map(maps, words, phrase):
    """The map of a mask's word, (32, 32): the store's map of that word, or for a class name of
    several words ("golden retriever") the mean of its words' maps; None when one is missing."""
    index = {data.normalize_word(w): i for i, w in enumerate(words)}
    parts = [index.get(w) for w, _, _ in data.split_words(phrase)]
    if not parts or None in parts:
        return None
    return maps[parts].mean(0)                                        # (32, 32)


def score_items(items, attn_dir, root):
    """(rows, skipped): one score_map row (with id and word) per (item, mask word) that has a map
    in the store; skipped counts the mask words without one (no file, or the word not in it).
    Masks are read by data.item_regions; an item's "void" (a PNG, white = not scored) is
    Pascal VOC's border."""
    rows, skipped = [], 0
    for item in items:
        if not item.get("masks"):
            continue
        regions = data.item_regions(item, root, data.normalize_word)
        maps, words = data.read_maps(attn_dir, item["id"])            # (n_words, 32, 32)
        void = None
        if item.get("void"):
            # white = not scored
            void_image = Image.open(Path(root) / item["void"]).convert("L")
            void = np.asarray(void_image) > 127
        for word, region in regions.items():
            m = phrase_map(maps, words, word) if maps is not None else None
            if m is None:
                skipped += 1
                continue
            rows.append({"id": item["id"], "word": word, **score_map(m.numpy(), region, void)})
    return rows, skipped


def score(data_path, attn_dir):
    """dict(summary, per_word, rows, skipped) for the items of data_path and the store attn_dir."""
    items = data.read_items_or_exit(data_path)
    rows, skipped = score_items(items, attn_dir, Path(data_path).resolve().parent)
    by_word = {}
    for r in rows:
        by_word.setdefault(r["word"], []).append(r)
    return {"data": str(data_path), "attn": str(attn_dir), "summary": summarise(rows),
            "per_word": {w: summarise(rs) for w, rs in sorted(by_word.items())},
            "skipped": skipped, "rows": rows}


def summary_line(result):
    """One line: mIoU (fg, bg), the stacked mIoU, pixel accuracy, mAP, over how many maps."""
    s = result["summary"]
    if not s["n"]:
        return (f"segmentation: no (item, word) with both a mask and a map "
                f"({result['skipped']} skipped)")
    return (f"segmentation of {s['n']} maps ({result['skipped']} mask words without a map): "
            f"mIoU {100 * s['miou']:.1f} (fg {100 * s['iou_fg']:.1f}, bg {100 * s['iou_bg']:.1f}), "
            f"stacked mIoU {100 * s['miou_stacked']:.1f}, pixel accuracy "
            f"{100 * s['pixel_accuracy']:.1f}, mAP {100 * s['map']:.1f} "
            f"(fg {100 * s['map_fg']:.1f})")


# ---- readers: the datasets as the project's JSONL ----

def write_item(out, item_id, image, mask, word, void=None, **extra):
    """Write images/<id>.png (or copy a file: image may be a path), masks/<id>.png (white = the
    object) and masks/<id>-void.png; return the item (id, image, question, answer, masks)."""
    out = Path(out)
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if isinstance(image, (str, Path)):
        rel = f"images/{item_id}{Path(image).suffix}"
        shutil.copyfile(image, out / rel)  # the dataset's own bytes: no re-encoding
    else:
        rel = f"images/{item_id}.png"
        Image.fromarray(image).save(out / rel)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(out / f"masks/{item_id}.png")
    item = {"id": item_id, "image": rel, "question": "What is the main object in the image?",
            "answer": word, "masks": {word: f"masks/{item_id}.png"}, **extra}
    if void is not None and void.any():
        Image.fromarray(np.where(void, 255, 0).astype(np.uint8)).save(
            out / f"masks/{item_id}-void.png")
        item["void"] = f"masks/{item_id}-void.png"
    return item


def write_jsonl(items, path):
    """The items as one JSON object a line; returns path."""
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return path


def need_h5py():
    """h5py, an optional dependency: only the ImageNet-Segmentation reader needs it."""
    try:
        import h5py
    except ImportError:
        raise SystemExit("reading gtsegs_ijcv.mat (MATLAB v7.3, an HDF5 file) needs h5py: "
                         "pip install h5py") from None
    return h5py


def wordnet_lemma(wnid):
    """WordNet's first lemma of a noun synset id ("n02084071" -> "dog"), the name
    ConceptAttention starts from; None when nltk or its WordNet data is not installed."""
    try:
        from nltk.corpus import wordnet
        synset = wordnet.synset_from_pos_and_offset(wnid[0], int(wnid[1:]))
        return synset.lemmas()[0].name().replace("_", " ")
    except (ImportError, LookupError):
        return None


def class_word(wnid, names):
    """The word an ImageNet-Segmentation image is prompted with: names[wnid], else
    names[WordNet lemma] (ConceptAttention's imagenet_class_map.json maps lemmas to simpler
    words), else the lemma itself; SystemExit when none is known."""
    if wnid in names:
        return names[wnid]
    lemma = wordnet_lemma(wnid)
    if lemma is None:
        raise SystemExit(f"no class word for synset {wnid}: pass --class-names, a JSON of "
                         f"{{wnid or WordNet lemma: word}}, or install WordNet "
                         f"(pip install nltk; python -m nltk.downloader wordnet)")
    return names.get(lemma, lemma)


def read_class_names(path):
    """{key: word} from a JSON file; a {"categories": {...}} file (ConceptAttention's
    imagenet_class_map.json) gives its categories."""
    if path is None:
        return {}
    names = json.loads(Path(path).read_text(encoding="utf-8"))
    return names.get("categories", names)


def mat_string(f, ref):
    """A MATLAB char array (uint16 code units) behind an HDF5 object reference, as text."""
    return np.asarray(f[ref]).astype("<u2").tobytes().decode("utf-16-le").strip()


def read_imagenet_segmentation(mat_path, out, class_names=None, limit=None):
    """ImageNet-Segmentation's gtsegs_ijcv.mat -> <out>/data.jsonl, images/, masks/.

    Layout (MATLAB v7.3 = HDF5; the same fields ConceptAttention's and Chefer et al.'s loaders
    read): /value/img, /value/gt, /value/id are (N, 1) object references; an image is (3, W, H)
    uint8 (MATLAB's column-major (H, W, 3)), a mask a further reference to (W, H) 0/1, an id a
    char array "n02085620_1234" (synset, ImageNet image). The word is class_word's.
    """
    h5py = need_h5py()
    names = read_class_names(class_names)
    items = []
    with h5py.File(mat_path, "r") as f:
        total = f["/value/img"].shape[0]
        n = total if limit is None else min(limit, total)
        for i in data.progress_bar(range(n), desc="imagenet-seg"):
            image = np.asarray(f[f["/value/img"][i, 0]]).T                 # (H, W, 3) or (H, W)
            # a mask is a reference to a reference
            gt_ref = f[f["/value/gt"][i, 0]][0, 0]
            gt = np.asarray(f[gt_ref]).T > 0                                # (H, W)
            name = mat_string(f, f["/value/id"][i, 0])
            wnid = name.split("_")[0]
            image = np.stack([image] * 3, -1) if image.ndim == 2 else image
            item = write_item(out, f"imagenet-seg-{i:04d}", np.ascontiguousarray(image), gt,
                              class_word(wnid, names), wnid=wnid, source=name)
            items.append(item)
    return write_jsonl(items, Path(out) / "data.jsonl")


# Pascal VOC's 20 classes in label order (1-20), by the words ConceptAttention prompts with
VOC_WORDS = ("plane", "bike", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "table", "dog", "horse", "motorcycle", "person", "pot", "sheep", "sofa", "train",
             "monitor")


def read_voc_single_class(voc_root, out, split="val", limit=None):
    """Pascal VOC's images of one object class (SegmentationClass PNGs: palette indices, 0
    background, 1-20 the classes, 255 the void border) -> <out>/data.jsonl. An image is kept
    when exactly one class is present besides background and void, the single-class split of
    ConceptAttention (930 images of VOC 2012 val); void pixels go to the item's "void" mask."""
    root = Path(voc_root)
    names = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    items = []
    for name in data.progress_bar(names, desc="voc"):
        labels = np.asarray(Image.open(root / "SegmentationClass" / f"{name}.png"))  # (H, W)
        present = sorted(set(np.unique(labels).tolist()) - {0, 255})
        if len(present) != 1:
            continue
        image = root / "JPEGImages" / f"{name}.jpg"
        item = write_item(out, f"voc-{name}", image, labels == present[0],
                          VOC_WORDS[present[0] - 1], void=labels == 255, voc_class=present[0])
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    return write_jsonl(items, Path(out) / "data.jsonl")


# ---- main ----

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score an attention store against the items' masks")
    s.add_argument("--data", required=True, help="dataset JSONL whose items have masks")
    s.add_argument("--attn", required=True, help="attention store of extract.py (<id>.safetensors)")
    s.add_argument("--out", default=None,
                   help="JSON of every figure (default <attn>/segmentation.json)")
    i = sub.add_parser("imagenet", help="gtsegs_ijcv.mat -> JSONL + images + masks (needs h5py)")
    i.add_argument("--mat", required=True, help="ImageNet-Segmentation's gtsegs_ijcv.mat")
    i.add_argument("--out", required=True, help="folder for data.jsonl, images/, masks/")
    i.add_argument("--class-names", default=None,
                   help="JSON {wnid or WordNet lemma: word}, or ConceptAttention's "
                        "imagenet_class_map.json; without it, WordNet's first lemma (nltk)")
    i.add_argument("--limit", type=int, default=None, help="only the first N images")
    v = sub.add_parser("voc", help="Pascal VOC's single-class images -> JSONL + images + masks")
    v.add_argument("--voc-root", required=True,
                   help="VOC folder with JPEGImages/, SegmentationClass/, ImageSets/Segmentation/")
    v.add_argument("--out", required=True, help="folder for data.jsonl, images/, masks/")
    v.add_argument("--split", default="val", help="ImageSets/Segmentation/<split>.txt")
    v.add_argument("--limit", type=int, default=None, help="stop after N single-class images")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "imagenet":
        path = read_imagenet_segmentation(args.mat, args.out, args.class_names, args.limit)
        return print(f"wrote {path}; next: python extract.py --data {path} --out <attn>")
    if args.command == "voc":
        path = read_voc_single_class(args.voc_root, args.out, args.split, args.limit)
        return print(f"wrote {path}; next: python extract.py --data {path} --out <attn>")
    if not Path(args.attn).is_dir():
        raise SystemExit(f"--attn {args.attn}: no such folder; make the store with extract.py")
    result = score(args.data, args.attn)
    out = Path(args.out) if args.out else Path(args.attn) / "segmentation.json"
    out.write_text(json.dumps(result, indent=1))
    print(summary_line(result))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
