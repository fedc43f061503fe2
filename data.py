"""Data for train.py and evaluate.py: items and DM maps -> batches built by the VLM's processor (§5, §6).

The dataset is the JSONL of DESIGN.md, read by extract.read_items; the DM attention store
(attn/<id>.safetensors) is read by extract.load_maps. A batch is the processor's own output for
prompts written with the model's chat template, plus the labels of eq. 6 (answer tokens only),
the original image sizes that aggregate.py needs to crop the tiles' padding, and the item ids.
The data order is a pure function of (seed, epoch), so every rank, and a resumed run, agree on it.

    python -c "import data, extract, train; print(data.collate(train.tiny_vlm()[1], extract.read_items('d.jsonl')))"
"""
import torch
from PIL import Image

import extract


def check_images(items):
    """Open every image before training (not at step 40,000): a list of 'id: problem' strings."""
    problems = []
    for item in items:
        try:
            with Image.open(item["image_path"]) as im:
                im.verify()  # reads the whole file: catches truncated and non-image files
        except Exception as err:  # noqa: BLE001 -- any failure to open is the item's problem
            problems.append(f"item {item['id']!r}: image {item['image_path']!r} cannot be opened ({err})")
    return problems


def read_dm_maps(attn_dir, item_id):
    """(maps (n_words, 32, 32), words) from the attention store; (None, None) if the item has no file."""
    path = extract.maps_path(attn_dir, item_id) if attn_dir is not None else None
    return extract.load_maps(path)[:2] if path is not None and path.exists() else (None, None)


def collate(processor, items, with_answer=True):
    """A batch for the VLM: the processor's output + "labels" + "image_sizes" + "ids".

    Prompts use the processor's chat template: user [image, question], assistant [answer]. Labels
    (eq. 6) are the answer's tokens and the closing <|eot_id|> (so the model learns to stop), -100
    on the prompt and on padding. Training pads on the right; with_answer=False builds generation
    prompts (no labels), padded on the left so that batched generate() continues every row.
    image_sizes: (B, 2) original (height, width), which aggregate.py needs to crop the tiles' padding.
    """
    texts, prompt_lens, images = [], [], []
    tokenizer = processor.tokenizer
    for item in items:
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}
        prompt = processor.apply_chat_template([user], add_generation_prompt=True)
        if with_answer:
            answer = {"role": "assistant", "content": [{"type": "text", "text": item["answer"]}]}
            texts.append(processor.apply_chat_template([user, answer]))
            prompt_lens.append(len(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
        else:
            texts.append(prompt)
        images.append([Image.open(item["image_path"]).convert("RGB")])
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
