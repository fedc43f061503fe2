"""The pictures of evaluate.py (paper §7.1 Fig. 7, 8; §7.6 Fig. 17; App. F.1 Fig. 25), with PIL
only, no plotting dependency: histograms of the attention entropies of the DM's and each model's
maps, and per item a grid of the image, the DM map and each model's map of every answer word,
overlaid on the image.

    python -c "import figures, torch; from PIL import Image; figures.draw_overlay_grid('o.png',
        Image.new('RGB', (64, 48)), ['red'], torch.rand(1, 32, 32), {})"
"""
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import data


def heat_colors(values):
    """A jet-like colour map: values (h, w) in [0, 1] -> uint8 RGB (h, w, 3), blue (low) to red
    (high)."""
    v = np.clip(values, 0, 1)[..., None]
    # each channel peaks at its own centre: red at 3/4, green at 1/2, blue at 1/4
    centres = np.array([3.0, 2.0, 1.0])
    distance = np.abs(4 * v - centres)
    rgb = np.clip(1.5 - distance, 0, 1)
    return (rgb * 255).astype(np.uint8)


def heat_overlay(image, attn_map, alpha=0.5):
    """The image with a 32x32 map stretched over it (bilinear) in heat colours; both cover the
    whole image."""
    map_image = Image.fromarray(attn_map.float().numpy())
    values = map_image.resize(image.size, Image.BILINEAR)
    heat = Image.fromarray(heat_colors(np.asarray(values)))
    return Image.blend(image.convert("RGB"), heat, alpha)


def overlay_path(out_dir, item_id):
    """<out>/overlays/<id>.png, refused for an id that is not a plain file name (it would leave
    the folder)."""
    if not data.ID_PATTERN.match(item_id):
        raise ValueError(f"item id {item_id!r} cannot be a file name: "
                         f"overlays/<id>.png would leave {out_dir}")
    return Path(out_dir) / "overlays" / f"{item_id}.png"


def draw_overlay_grid(path, image, words, dm_maps, run_maps, cell=128):
    """One PNG per item (Fig. 8/17): a row per word; columns image, DM map, then each run's VLM
    map, overlaid on the image. run_maps {run name: list (one per word) of (32, 32) maps or None
    (not matched)}."""
    # the thumbnail keeps the image's aspect, its longer side `cell` pixels
    scale = cell / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    thumb = image.convert("RGB").resize(size, Image.BILINEAR)
    columns = ["image", "DM"] + list(run_maps)
    label_w, head_h = 90, 18
    sheet_w = label_w + len(columns) * (size[0] + 4)
    sheet_h = head_h + len(words) * (size[1] + 4)
    sheet = Image.new("RGB", (sheet_w, sheet_h), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        draw.text((label_w + c * (size[0] + 4) + 2, 3), name[:18], fill="black")
    for r, word in enumerate(words):
        y = head_h + r * (size[1] + 4)
        draw.text((4, y + size[1] // 2 - 6), word[:14], fill="black")
        tiles = [thumb, heat_overlay(thumb, dm_maps[r])]
        for name in run_maps:
            m = run_maps[name][r]
            if m is not None:
                tiles.append(heat_overlay(thumb, m))
            else:
                # a grey tile: the run has no map of this word
                tiles.append(Image.new("RGB", size, (200, 200, 200)))
        for c, tile in enumerate(tiles):
            sheet.paste(tile, (label_w + c * (size[0] + 4), y))
    sheet.save(path)


def draw_entropy_histograms(path, dm_entropy, run_entropy, bins=28, width=420, height=150):
    """Fig. 7/25 as a PNG: one panel per run, the DM's entropies (blue) against that run's VLM
    entropies (orange), as fractions per bin over [0, log 1024] nats (the range for 32x32 maps);
    a vertical line marks each mean."""
    top = math.log(32 * 32)
    edges = np.linspace(0, top, bins + 1)
    margin = 34
    panels = max(1, len(run_entropy))
    sheet_h = panels * (height + margin) + margin
    sheet = Image.new("RGB", (width + 20, sheet_h), "white")
    draw = ImageDraw.Draw(sheet, "RGBA")
    for p, (name, values) in enumerate(run_entropy.items()):
        x0, y0 = 10, margin + p * (height + margin) - 12
        # the panel: title, frame, x-axis labels
        draw.text((x0, y0 - 16), f"{name}: DM (blue) vs VLM (orange)", fill="black")
        draw.rectangle([x0, y0, x0 + width, y0 + height], outline="black")
        draw.text((x0, y0 + height + 2), "0", fill="black")
        draw.text((x0 + width // 2 - 40, y0 + height + 2), "entropy (nats)", fill="black")
        draw.text((x0 + width - 24, y0 + height + 2), f"{top:.2f}", fill="black")
        for series, colour in ((dm_entropy, (40, 90, 220)), (values, (240, 130, 20))):
            if not len(series):
                continue
            series = np.clip(np.asarray(series, dtype=np.float64), 0, top)
            counts = np.histogram(series, bins=edges)[0]
            frac = counts / len(series)
            for b, f in enumerate(frac):
                left = x0 + b * width / bins
                bar_top = y0 + height - f * (height - 4)
                right = left + width / bins - 1
                bottom = y0 + height
                draw.rectangle([left + 1, bar_top, right, bottom], fill=colour + (120,))
            mean_x = x0 + series.mean() / top * width
            draw.line([mean_x, y0, mean_x, y0 + height], fill=colour + (255,), width=2)
    sheet.save(path)


def draw_overlays(out_dir, items, dm_store, pictures):
    """overlays/<id>.png for each item (Fig. 8/17): per DM word, its DM map and every model's map
    of the word (pictures: {model: {item id: {"own" or "head": {DM word index: map}}}}, a head
    drawn as "<model> head"). Returns the files written, relative to out_dir."""
    (Path(out_dir) / "overlays").mkdir(exist_ok=True)
    files = []
    for item in items:
        maps, words = dm_store[item["id"]]
        # one column per model and kind: {"ar": [...], "lavender": [...], "lavender head": [...]}
        run_maps = {}
        for name in pictures:
            if item["id"] not in pictures[name]:
                continue
            for kind in pictures[name][item["id"]]:
                column = name if kind == "own" else f"{name} head"
                by_word = pictures[name][item["id"]][kind]
                run_maps[column] = [by_word.get(j) for j in range(len(words))]
        path = overlay_path(out_dir, item["id"])
        image = data.open_image(item["image_path"])
        draw_overlay_grid(path, image, words, maps, run_maps)
        files.append(f"overlays/{item['id']}.png")
    return files
