"""Data for train.py and evaluate.py: items and DM maps -> batches built by the VLM's processor (§5, §6).

The dataset is the JSONL of DESIGN.md, read by extract.read_items; the DM attention store
(attn/<id>.safetensors) is read by extract.load_maps; images by extract.open_image, the same
pixels the DM saw. check_item looks at one item the way training will, before step 1. A batch is
the processor's own output for prompts written with the model's chat template, plus the labels
of eq. 6 (answer tokens only), the original image sizes that aggregate.py needs to crop the
tiles' padding, and the item ids.
The data order is a pure function of (seed, epoch), so every rank, and a resumed run, agree on it.

    python -c "import data, extract, train; print(data.collate(train.tiny_vlm()[1], extract.read_items('d.jsonl')))"
"""
import json

import torch
from safetensors import safe_open

import aggregate
import extract


# ---- checks: every item before step 1, so that a bad file among 130k is named, not met at step 8 ----

def duplicate_ids(items):
    """{index: problem} for every repeat of an id after its first item (as extract.py keeps the
    first item's maps, the later ones would train on them): [a, b, a] -> {2: "...'a'..."}."""
    first, problems = {}, {}
    for i, item in enumerate(items):
        j = first.setdefault(item["id"], i)
        if j != i:
            problems[i] = (f"item {item['id']!r} (line {item.get('line', '?')}): duplicate id, already "
                           f"used by line {items[j].get('line', '?')}; each item needs its own id")
    return problems


def check_maps(path, answer):
    """(words, None) when <attn>/<id>.safetensors is a usable DM target for `answer`, else
    (None, what is wrong).

    Usable: readable; a floating 'maps' tensor (n_words, 32, 32) with every value finite and in
    [0, 1] (extract.py min-max normalises each map); 'words' a JSON list of n_words non-empty
    strings; 'text' (the answer the DM was conditioned on) equal to this item's answer, so that a
    file of another item or of an edited answer is not trained on.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            maps = f.get_tensor("maps")
        words = json.loads(meta.get("words", "null"))
    except Exception as err:  # noqa: BLE001 -- truncated, foreign or corrupt: the item's problem
        return None, f"attention file {path} cannot be read ({type(err).__name__}: {err})"
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
        return None, f"attention file {path}: metadata 'words' {meta.get('words')!r} is not a list of words"
    if tuple(maps.shape) != (len(words), extract.MAP_SIZE, extract.MAP_SIZE):
        return None, f"attention file {path}: maps {tuple(maps.shape)}, expected ({len(words)}, 32, 32)"
    if not maps.dtype.is_floating_point:
        return None, f"attention file {path}: maps are {maps.dtype}, expected float16 values in [0, 1]"
    maps = maps.float()
    if not torch.isfinite(maps).all():
        return None, f"attention file {path}: maps hold NaN or infinite values"
    if maps.min() < 0 or maps.max() > 1:
        return None, (f"attention file {path}: maps range over [{maps.min():.4g}, {maps.max():.4g}], expected "
                      f"[0, 1] (min-max normalised: 0-255 or scaled maps must be divided back)")
    if meta.get("text") != answer:
        return None, (f"attention file {path} was made for the text {meta.get('text')!r}, not this item's "
                      f"answer {answer!r}: rerun extract.py for this item")
    return words, None


def check_item(item, processor, attn_dir=None, max_length=None, match="exact"):
    """dict(problem=None or 'item ...: what is wrong', has_maps=bool, aligned=words alignable).

    In order: the id can name a file inside its folder (extract.ID_PATTERN: no '/', no '..'); the
    image decodes fully (extract.open_image, the loader training uses); prompt + answer fit in
    max_length tokens; with attn_dir, the item's attention file, when it has one, is usable
    (check_maps) and `aligned` counts its words that the answer's words match (aggregate.plan_words,
    as training does). An item without an attention file trains with L_VLM alone.
    """
    name = f"item {item['id']!r} (line {item.get('line', '?')})"
    result = {"problem": None, "has_maps": False, "aligned": 0}
    if not extract.ID_PATTERN.match(item["id"]):
        return {**result, "problem": f"{name}: id cannot be a file name (use only A-Z a-z 0-9 . _ -)"}
    try:
        extract.open_image(item["image_path"])
    except Exception as err:  # noqa: BLE001 -- missing, truncated or not an image
        reason = f"image {item['image_path']} cannot be read ({type(err).__name__}: {err})"
        return {**result, "problem": f"{name}: {reason}"}
    input_ids, labels = encode(processor, item)  # (1, T) each
    if max_length is not None and input_ids.shape[1] > max_length:
        reason = (f"{input_ids.shape[1]} tokens (prompt + answer) exceed --max-length {max_length}; shorten "
                  f"the answer or raise --max-length")
        return {**result, "problem": f"{name}: {reason}"}
    path = extract.maps_path(attn_dir, item["id"]) if attn_dir is not None else None
    if path is None or not path.exists():
        return result
    words, problem = check_maps(path, item["answer"])
    if problem:
        return {**result, "problem": f"{name}: {problem}"}
    plan = aggregate.plan_words(processor.tokenizer, input_ids, labels, [words], match=match)
    return {**result, "has_maps": True, "aligned": int((plan["dm_index"] >= 0).sum())}


def check_images(items):
    """'item ...: problem' for every item whose image cannot be fully decoded (evaluate.py's check)."""
    problems = []
    for item in items:
        try:
            extract.open_image(item["image_path"])
        except Exception as err:  # noqa: BLE001 -- any failure to decode is the item's problem
            problems.append(f"item {item['id']!r}: image {item['image_path']} cannot be read "
                            f"({type(err).__name__}: {err})")
    return problems


def read_dm_maps(attn_dir, item_id):
    """(maps (n_words, 32, 32), words) from the attention store; (None, None) if the item has no file."""
    path = extract.maps_path(attn_dir, item_id) if attn_dir is not None else None
    return extract.load_maps(path)[:2] if path is not None and path.exists() else (None, None)


# ---- batches ----

def chat_texts(processor, item, with_answer=True):
    """(text, prompt) in the processor's chat template: user [image, question], then, with_answer,
    assistant [answer]. prompt is the user turn and the assistant header (what generate continues)."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}
    prompt = processor.apply_chat_template([user], add_generation_prompt=True)
    if not with_answer:
        return prompt, prompt
    answer = {"role": "assistant", "content": [{"type": "text", "text": item["answer"]}]}
    return processor.apply_chat_template([user, answer]), prompt


def encode(processor, item):
    """(input_ids (1, T), labels (1, T)) of one item, text only (Mllama's <|image|> is one token):
    what collate gives for it, without decoding the image. Used to count tokens up front."""
    text, prompt = chat_texts(processor, item)
    tokenizer = processor.tokenizer
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])  # (1, T)
    labels = input_ids.clone()
    labels[:, :len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] = -100
    return input_ids, labels


def collate(processor, items, with_answer=True):
    """A batch for the VLM: the processor's output + "labels" + "image_sizes" + "ids".

    Prompts use the processor's chat template: user [image, question], assistant [answer]. Labels
    (eq. 6) are the answer's tokens and the closing <|eot_id|> (so the model learns to stop), -100
    on the prompt and on padding. Training pads on the right; with_answer=False builds generation
    prompts (no labels), padded on the left so that batched generate() continues every row.
    Images go through extract.open_image, the loader that made the DM maps (16-bit, transparency).
    image_sizes: (B, 2) original (height, width), which aggregate.py needs to crop the tiles' padding.
    """
    texts, prompt_lens, images = [], [], []
    tokenizer = processor.tokenizer
    for item in items:
        text, prompt = chat_texts(processor, item, with_answer)
        texts.append(text)
        if with_answer:
            prompt_lens.append(len(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
        images.append([extract.open_image(item["image_path"])])
    # the chat template already starts with <|begin_of_text|>: add no second one
    batch = processor(images=images, text=texts, padding=True, add_special_tokens=False, return_tensors="pt",
                      padding_side="right" if with_answer else "left")
    batch = dict(batch)
    batch["image_sizes"] = torch.tensor([[im[0].height, im[0].width] for im in images])  # (B, 2)
    batch["ids"] = [item["id"] for item in items]
    if with_answer:
        labels = batch["input_ids"].clone()  # (B, T)
        labels[batch["attention_mask"] == 0] = -100
        for b, n in enumerate(prompt_lens):
            labels[b, :n] = -100  # right padding: the prompt is the first n tokens of every row
        batch["labels"] = labels
    return batch


def model_inputs(batch, device=None):
    """The keys Mllama's forward and generate take (drops labels, ids, image_sizes), moved to `device` if given."""
    keys = ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
            "cross_attention_mask")
    return {k: batch[k] if device is None else batch[k].to(device) for k in keys if k in batch}


def epoch_order(n_items, seed, epoch):
    """The data order of an epoch: a permutation depending only on (seed, epoch), the same on every rank."""
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def micro_batches(order, step, batch_size, grad_accum, rank, world):
    """Item indices of each micro-batch of this rank at `step` of the epoch. A step consumes
    world * grad_accum * batch_size items, micro-batch m of rank r the slice starting at
    (m * world + r) * batch_size: 1 rank x batch 2 and 2 ranks x batch 1 see the same global batch."""
    start = step * world * grad_accum * batch_size
    return [order[start + (m * world + rank) * batch_size:][:batch_size] for m in range(grad_accum)]
