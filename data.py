"""The formats of DESIGN.md and the batches made from them: items, the attention store, images,
words, the checks before step 1, and batches built by the VLM's own processor (§5, §6).

Items are the lines of the dataset JSONL; the attention store holds extract.py's DM maps, one
safetensors file per item (attn/<id>.safetensors); open_image is the one image loader of both
models, so the VLM sees the pixels the DM saw; split_words is the one word rule of both sides;
item_regions reads the objects an item's words name (its masks and boxes, for pointing).
check_item looks at one item the way training will, before step 1. A batch is the processor's own
output for prompts written with the model's chat template (IDEFICS, which has none: its instruct
dialogue, flamingo.prompt_texts), plus the labels of eq. 6 (answer tokens only), the original
image sizes that aggregate.py needs to crop the tiles' padding, and the item ids. The data order
is a pure function of (seed, epoch), so every rank, and a resumed run, agree on it.
Dataset converters (VQAv2, TextVQA, ... -> this JSONL) are in prepare.py.

    python -c "import data; print(data.split_words('naïve café, 25 mp3s'))"
    python -c "import data; print(data.read_items('d.jsonl')[0])"   # d.jsonl: a dataset
"""
import json
import math
import os
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np
import snowballstemmer
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

# FAMILIES: a family's own prompts (IDEFICS: no chat template) and image tokens
import models
from aligner import MAP_SIZE  # the one map size of DM and VLM maps

# ---- items: the dataset JSONL ----

ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")  # ids become file names


def read_items(jsonl_path):
    """Items of a dataset JSONL, each as in the file plus "image_path" (absolute).

    A missing file raises FileNotFoundError, a malformed line (not UTF-8, not a JSON object, a
    missing or non-string id/image/question/answer) ValueError, each naming the file (and line);
    unsafe ids are left to the callers (extract() records them in failures.jsonl, train.py and
    evaluate.py refuse them: check_item), which check them with ID_PATTERN.
    """
    if not Path(jsonl_path).is_file():
        raise FileNotFoundError(f"{jsonl_path}: no such data file "
                                f"(resolved: {Path(jsonl_path).resolve()})")
    root = Path(jsonl_path).resolve().parent
    items = []
    for n, line, item in jsonl_lines(jsonl_path):
        for key in ("id", "image", "question", "answer"):
            if not isinstance(item, dict) or not isinstance(item.get(key), str):
                raise ValueError(f"{jsonl_path} line {n}: field {key!r} must be a string in a "
                                 f"JSON object: {line.strip()[:100]}")
        item["image_path"] = str(root / item["image"])
        item["line"] = n  # for messages about the item
        items.append(item)
    return items


def read_items_or_exit(path, flag="--data", then=""):
    """read_items for a script: a missing or malformed file ends the run with one line naming the
    flag, the file (and the line) instead of a traceback. then: what to do next, after the
    missing-file line (train.py: the extract.py command that makes the attention store)."""
    if not Path(path).is_file():
        fields = '{"id", "image", "question", "answer"}'
        raise SystemExit(f"{flag} {path}: no such file (looked for {Path(path).resolve()}). Write "
                         f"the dataset there as a JSONL of {fields} lines (README, 'Data'){then}")
    try:
        return read_items(path)
    except (OSError, ValueError) as err:
        # not UTF-8, not JSON, a missing field: with its line
        raise SystemExit(f"{flag}: {err}") from None


def jsonl_lines(path):
    """(line number, text, parsed object) of every non-blank line of a JSONL file (the dataset,
    prediction files); ValueError naming the file and the line when one is not UTF-8 or not JSON."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                row = json.loads(line) if line.strip() else None
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} line {n}: not UTF-8 ({e}); "
                                 f"save the file as UTF-8") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e}); "
                                 f"each line must be one JSON object") from None
            if line.strip():
                yield n, line, row


def progress_bar(iterable=None, show=True, **kwargs):
    """The progress bar of every script: tqdm, drawn only when show (no --quiet; rank 0) and its
    output (stderr) is a terminal, so a piped or logged run holds no bar redraws (tqdm's
    disable=None)."""
    return tqdm(iterable, disable=None if show else True, **kwargs)


def library_bars(show=True):
    """transformers' own bars (loading weights) by progress_bar's rule: on only when show and
    stderr is a terminal. Process-wide: the scripts call it once, at their start."""
    from transformers.utils import logging
    on = show and sys.stderr.isatty()
    (logging.enable_progress_bar if on else logging.disable_progress_bar)()


# ---- the attention store: <attn>/<id>.safetensors (DESIGN.md, "Attention store") ----

def maps_path(attn_dir, item_id):
    """<attn_dir>/<id>.safetensors"""
    return Path(attn_dir) / f"{item_id}.safetensors"


def save_maps(path, maps, words, meta):
    """Write maps (n_words, 32, 32) in [0, 1] as float16 'maps' with the metadata of DESIGN.md,
    "Attention store".

    Atomic: a hidden temp file in the same folder, then os.replace, so a kill at any moment leaves
    either no file or a complete one (resume trusts any <id>.safetensors it can read).
    """
    path = Path(path)
    shape = tuple(maps.shape)
    if shape != (len(words), MAP_SIZE, MAP_SIZE):
        raise ValueError(f"save_maps({path}): maps {shape} must be "
                         f"({len(words)}, 32, 32), one per word of {words}")
    empty = {k: "" for k in ("text", "dm", "inversion_steps", "denoise_steps", "res")}
    given = {k: str(v) for k, v in meta.items()}
    metadata = dict(empty, **given, words=json.dumps(list(words)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        halves = maps.detach().to("cpu", torch.float16).contiguous()
        save_file({"maps": halves}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_maps(path):
    """(maps float32 (n_words, 32, 32), words list[str], meta dict) of one attention file.

    meta holds every metadata string; inversion_steps, denoise_steps, res and null_text_iters as
    int when numeric.
    """
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        maps = f.get_tensor("maps").float()  # (n_words, 32, 32)
    words = json.loads(meta.pop("words"))
    numbers = ("inversion_steps", "denoise_steps", "res", "null_text_iters")
    meta.update({k: int(meta[k]) for k in numbers if meta.get(k, "").isdigit()})
    return maps, words, meta


def is_complete(path):
    """True when path is a readable attention file with one 32x32 map per word (resume check)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            words = json.loads((f.metadata() or {})["words"])
            shape = f.get_slice("maps").get_shape()
        return list(shape) == [len(words), MAP_SIZE, MAP_SIZE]
    except Exception:
        # a missing, truncated or foreign file is simply not complete
        return False


def read_maps(attn_dir, item_id):
    """(maps (n_words, 32, 32), words) of an item from the attention store: what train.py and
    evaluate.py read; (None, None) when the item has no file (or there is no store)."""
    path = maps_path(attn_dir, item_id) if attn_dir is not None else None
    if path is None or not path.exists():
        return None, None
    return load_maps(path)[:2]


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
    # truncated, foreign or corrupt: the item's problem
    except Exception as err:  # noqa: BLE001
        return None, f"attention file {path} cannot be read ({type(err).__name__}: {err})"
    file = f"attention file {path}"
    words_ok = isinstance(words, list) and words
    if not words_ok or not all(isinstance(w, str) and w.strip() for w in words):
        return None, f"{file}: metadata 'words' {meta.get('words')!r} is not a list of words"
    if tuple(maps.shape) != (len(words), MAP_SIZE, MAP_SIZE):
        return None, f"{file}: maps {tuple(maps.shape)}, expected ({len(words)}, 32, 32)"
    if not maps.dtype.is_floating_point:
        return None, f"{file}: maps are {maps.dtype}, expected float16 values in [0, 1]"
    maps = maps.float()
    if not torch.isfinite(maps).all():
        return None, f"{file}: maps hold NaN or infinite values"
    if maps.min() < 0 or maps.max() > 1:
        return None, (f"{file}: maps range over [{maps.min():.4g}, {maps.max():.4g}], expected "
                      f"[0, 1] (min-max normalised: 0-255 or scaled maps must be divided back)")
    if meta.get("text") != answer:
        return None, (f"{file} was made for the text {meta.get('text')!r}, not this item's "
                      f"answer {answer!r}: rerun extract.py for this item")
    return words, None


# ---- images: the one loader of the DM's pixels and the VLM's ----

def open_image(path):
    """The image file as a fully decoded PIL RGB image: the one loader of extract.py (the DM's
    pixels) and collate (the VLM's), so both models see the same picture.

    Modes: integer grey (I;16, I) is read as 16-bit when any value exceeds 255 (else as 8-bit),
    float grey (F) as [0, 1] when it stays within it; anything with transparency (RGBA, LA, or a
    transparent palette colour) is composited on white; CMYK, YCbCr, P, L, 1 convert with PIL.
    An EXIF orientation (a phone photo, VizWiz's) is applied, so the picture is upright as a viewer
    shows it. Decoding every pixel here (img.load) is what finds a truncated file; PIL's verify()
    does not.
    """
    with Image.open(path) as img:
        img.load()
        # orientation tags 2-8: the pixels turned upright
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit integer or float grey
            arr = np.asarray(img, dtype=np.float32)
            if arr.max() > 255:  # 16-bit
                arr = arr / 257.0
            elif img.mode == "F" and arr.max() <= 1:  # float in [0, 1]
                arr = arr * 255.0
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        return img.convert("RGB")


def load_image(path, res):
    """(3, res, res) float tensor in [-1, 1] from an image file of any mode (open_image), squashed
    to a square. The square resize matches the VLM side, whose maps also cover the whole image."""
    img = open_image(path).resize((res, res), Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.float32).copy()  # (res, res, 3) 0..255
    x = torch.from_numpy(pixels).permute(2, 0, 1)  # (3, res, res)
    return x / 127.5 - 1.0


def item_regions(item, root, normalize):
    """{normalised word: (H, W) bool array} from an item's "masks" (binary PNG, same size as the
    image) and "boxes" ([x0, y0, x1, y1] in pixels, x1/y1 exclusive) entries, where the words of
    its answer are in the image (evaluate.py's pointing), on the upright image (open_image: its
    EXIF orientation applied); {} when it has neither."""
    regions = {}
    width, height = open_image(item["image_path"]).size  # upright, as the models see it
    for word, rel in (item.get("masks") or {}).items():
        mask = Image.open(Path(root) / rel).convert("L")
        if mask.size != (width, height):
            raise ValueError(f"item {item['id']!r}: mask for {word!r} is {mask.size}, image is "
                             f"{(width, height)}; masks must have the image's size")
        regions[normalize(word)] = np.asarray(mask) > 127
    for word, (x0, y0, x1, y1) in (item.get("boxes") or {}).items():
        box = np.zeros((height, width), dtype=bool)
        rows = slice(max(0, int(y0)), max(0, math.ceil(y1)))
        cols = slice(max(0, int(x0)), max(0, math.ceil(x1)))
        box[rows, cols] = True
        regions[normalize(word)] = box
    return regions


# ---- words: the one rule of both sides (the DM's: extract.text_words; the VLM's: answer_words),
# and when two words are the same (§6 (5): exact or root) ----

# CLIP's pre-tokenizer pattern (case-insensitive): English clitics, runs of letters, single
# digits, other symbols (one at a time here, so that a combining mark, which neither pattern
# counts as a letter, can join the letters before it). Llama 3's splits the same clitics off.
CLITIC = r"'(?:s|t|re|ve|m|ll|d)"
PIECE = re.compile(CLITIC + r"|[^\W\d_]+|\d|[^\s\w]|_", re.IGNORECASE)


def _wordlike(s):
    """True when every character of s is a letter, a combining mark or a digit (L, M, N)."""
    return all(unicodedata.category(c)[0] in "LMN" for c in s)


def split_words(text):
    """The words of a text: [(word, start, end), ...] in order, lower-cased, with their characters.

    Pieces as CLIP's pre-tokenizer cuts them (clitics, letter runs, single digits, symbols), then
    touching letter, mark and digit pieces glued back together (CLIP cuts "25" into "2" "5",
    "mp3" into "mp" "3", and a decomposed "e" + U+0301 "é" apart); pieces without a letter or
    digit are dropped. A word is lower-cased and in Unicode NFC, so a decomposed "café" is the
    word "café". Both sides of the alignment use this rule (the DM store's words and the VLM's
    answer words), so they reach the same words:

        "A dog's toy, don't!" -> [("a", 0, 1), ("dog", 2, 5), ("'s", 5, 7), ("toy", 8, 11),
                                   ("don", 13, 16), ("'t", 16, 18)]
        "naïve café, 25 mp3s" -> [("naïve", 0, 5), ("café", 6, 10), ("25", 12, 14),
                                   ("mp3s", 15, 19)]
        "a t-shirt, 3.5 kg"   -> [("a", 0, 1), ("t", 2, 3), ("shirt", 4, 9), ("3", 11, 12),
                                   ("5", 13, 14), ("kg", 15, 17)]
    """
    spans = []
    for m in PIECE.finditer(text):
        start, end = m.span()
        if spans and spans[-1][1] == start and _wordlike(text[spans[-1][0]:end]):
            spans[-1][1] = end  # "2" "5" -> "25"; "cafe" U+0301 -> "café"
        else:
            spans.append([start, end])
    return [(unicodedata.normalize("NFC", text[a:b].lower()), a, b) for a, b in spans
            if any(unicodedata.category(c)[0] in "LN" for c in text[a:b])]


_STEMMER = snowballstemmer.stemmer("english")


def normalize_word(w):
    """Lower-case, NFC, strip surrounding punctuation, but not the apostrophe that opens an
    English clitic (a word of its own in split_words, so that the "'s" of "it's" and the "s" of
    "U.S." stay two words): "Circle," -> "circle", "'s" -> "'s", "s." -> "s"."""
    w = unicodedata.normalize("NFC", w.lower())
    return re.sub(rf"^(?!{CLITIC}\b)\W+|\W+$", "", w)


def _root(w):
    """The Snowball stem of a normalised word; a clitic ("'s", "'re") is its own root."""
    w = normalize_word(w)
    return w if w.startswith("'") else _STEMMER.stemWord(w)


def match_words(vlm_words, dm_words, mode="exact"):
    """For each VLM word, the index of the first DM word it matches, else None.

    exact: equal after normalize_word; root: same Snowball (Porter 2) stem, e.g.
    match_words(["circles", "Red"], ["red", "circle"], "exact") -> [None, 0]
    match_words(["circles", "Red"], ["red", "circle"], "root")  -> [1, 0]
    match_words(["s", "'s"], ["'s", "s"], "exact")               -> [1, 0]
    """
    if mode not in ("exact", "root"):
        raise ValueError(f"unknown word match {mode!r}; choose 'exact' or 'root'")
    key = normalize_word if mode == "exact" else _root
    dm_keys = {}
    for j, w in enumerate(dm_words):
        if normalize_word(w):
            dm_keys.setdefault(key(w), j)
    return [dm_keys.get(key(w)) if normalize_word(w) else None for w in vlm_words]


def token_spans(tokenizer, ids):
    """(text, spans): the decoded text of token ids and each token's [start, end) characters in it.

    Tokens are decoded as growing prefixes (so merges and leading spaces come out as the whole
    text has them), without clean-up of spaces. A byte-level token that ends inside a UTF-8
    character decodes to U+FFFD until the character is complete: such a token shares the span of
    the token that completes it, so "naïve" cut inside "ï" stays one word with both tokens.
    Special tokens get an empty span.
    """
    special = set(tokenizer.all_special_ids)
    text, spans, pending, kept = "", [], [], []
    for tok in ids:
        if tok in special:
            spans.append((len(text), len(text)))
            continue
        kept.append(tok)
        pending.append(len(spans))
        spans.append(None)
        full = tokenizer.decode(kept, clean_up_tokenization_spaces=False)
        if full.endswith("\ufffd"):
            # inside a character: the span is set by the token that completes it
            continue
        for m in pending:
            spans[m] = (len(text), len(full))
        text, pending = full, []
    if pending:  # the ids end inside a character: it stays U+FFFD
        full = tokenizer.decode(kept, clean_up_tokenization_spaces=False)
        spans = [(len(text), len(full)) if s is None else s for s in spans]
        text = full
    return text, spans


def answer_words(tokenizer, ids):
    """Group token ids into words: [(word, [token offsets in ids]), ...] in text order.

    The words are split_words of the decoded text, the rule that makes the DM store's
    words, so both sides reach the same words ("dog's" -> "dog", "'s"; "naïve" -> "naïve"). A
    token belongs to every word its characters overlap ("re" "d" -> ("red", [0, 1])); tokens of
    spaces, punctuation or special tokens belong to no word.
    """
    text, spans = token_spans(tokenizer, ids)
    words = []
    for word, start, end in split_words(text):
        words.append((word, [n for n, (a, b) in enumerate(spans) if a < end and b > start]))
    return words


# ---- checks: every item before step 1, so that a bad file among 130k is named, not met at
# step 8 ----

def duplicate_ids(items):
    """{index: problem} for every repeat of an id after its first item (as extract.py keeps the
    first item's maps, the later ones would train on them): [a, b, a] -> {2: "...'a'..."}."""
    first, problems = {}, {}
    for i, item in enumerate(items):
        j = first.setdefault(item["id"], i)
        if j != i:
            problems[i] = (f"item {item['id']!r} (line {item.get('line', '?')}): duplicate id, "
                           f"already used by line {items[j].get('line', '?')}; each item needs "
                           f"its own id")
    return problems


def check_item(item, processor=None, attn_dir=None, max_length=None):
    """(problem, words): 'item ...: what is wrong' or None, and the DM words of the item's
    attention file (None when it has none: it trains with L_VLM alone).

    In order: the id can name a file inside its folder (ID_PATTERN: no '/', no '..'); the image
    decodes fully (open_image, the loader training uses); with a processor, the prompt can hold the
    text (IDEFICS: flamingo.prompt_problem) and prompt + answer fit in max_length tokens; with
    attn_dir, the item's attention file, when it has one, is usable (check_maps). Which of the
    words the answer aligns is train.py's count (aggregate.label_plan).
    """
    name = f"item {item['id']!r} (line {item.get('line', '?')})"
    if not ID_PATTERN.match(item["id"]):
        return f"{name}: id cannot be a file name (use only A-Z a-z 0-9 . _ -)", None
    try:
        image = open_image(item["image_path"])
    # missing, truncated or not an image
    except Exception as err:  # noqa: BLE001
        why = f"{type(err).__name__}: {err}"
        return f"{name}: image {item['image_path']} cannot be read ({why})", None
    check = family_part(processor, "prompt_problem") if processor is not None else None
    problem = check(processor, item) if check else None
    # a text the family's prompt cannot hold (IDEFICS: flamingo.prompt_problem)
    if problem:
        return f"{name}: {problem}", None
    n_tokens = 0
    if processor:
        text_tokens = encode(processor, item)[0].shape[1]
        n_tokens = text_tokens + image_tokens(processor, image)
    if max_length is not None and n_tokens > max_length:
        return (f"{name}: {n_tokens} tokens (prompt + answer) exceed --max-length {max_length}; "
                f"shorten the answer or raise --max-length"), None
    path = maps_path(attn_dir, item["id"]) if attn_dir is not None else None
    if path is None or not path.exists():
        return None, None
    words, problem = check_maps(path, item["answer"])
    return (f"{name}: {problem}" if problem else None), words


# ---- batches ----

def chat_texts(processor, item, with_answer=True):
    """(text, prompt) in the processor's chat template: user [image, question], then, with_answer,
    assistant [answer]. prompt is the user turn and the assistant header (what generate continues).
    A family with its own prompts (FAMILIES "prompt_texts"; IDEFICS, which has no chat template:
    flamingo.prompt_texts) writes them."""
    own = family_part(processor, "prompt_texts")
    if own:
        return own(processor, item, with_answer)
    question = [{"type": "image"}, {"type": "text", "text": item["question"]}]
    user = {"role": "user", "content": question}
    prompt = processor.apply_chat_template([user], add_generation_prompt=True)
    if not with_answer:
        return prompt, prompt
    answer = {"role": "assistant", "content": [{"type": "text", "text": item["answer"]}]}
    return processor.apply_chat_template([user, answer]), prompt


def family_part(processor, name):
    """Field `name` of the FAMILIES entry of the processor's family (models.processor_family)."""
    return models.FAMILIES[models.processor_family(processor)][name]


def image_tokens(processor, image):
    """Tokens the processor adds for `image` beyond what the prompt text holds (FAMILIES
    "image_tokens"): Qwen2-VL's one <|image_pad|> per merged token (qwen.image_tokens); 0 for
    Mllama's one <|image|> and for IDEFICS, whose image tokens are written in the prompt."""
    count = family_part(processor, "image_tokens")
    return count(processor, image) if count else 0


def encode(processor, item):
    """(input_ids (1, T), labels (1, T)) of one item, text only (the image as its one placeholder
    token; image_tokens counts the rest): what collate gives for it, without decoding the image.
    Used to count tokens up front."""
    text, prompt = chat_texts(processor, item)
    tokenizer = processor.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids])  # (1, T)
    labels = input_ids.clone()
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    labels[:, :n_prompt] = -100
    return input_ids, labels


def collate(processor, items, with_answer=True):
    """A batch for the VLM: the processor's output + "labels" + "image_sizes" + "ids".

    Prompts use the family's dialogue (the processor's chat template; IDEFICS' own): user
    [image, question], assistant [answer]. Labels (eq. 6) are the answer's tokens and the closing
    end-of-turn token (<|eot_id|>, IDEFICS' <end_of_utterance>; so the model learns to stop),
    -100 on the prompt (with the image tokens the processor expands it into) and on padding.
    Training pads on the right; with_answer=False builds generation prompts (no labels), padded
    on the left so that batched generate() continues every row. Images go through open_image,
    the loader that made the DM maps (16-bit, transparency). image_sizes: (B, 2) original
    (height, width), which aggregate.py needs to crop the tiles' padding.
    """
    texts, prompt_lens, images = [], [], []
    tokenizer = processor.tokenizer
    for item in items:
        text, prompt = chat_texts(processor, item, with_answer)
        texts.append(text)
        image = open_image(item["image_path"])
        images.append([image])
        if with_answer:
            # the prompt's tokens once the processor has expanded its image placeholder
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            prompt_lens.append(n_prompt + image_tokens(processor, image))
    side = "right" if with_answer else "left"
    own = family_part(processor, "processor_batch")
    if own:
        # the family's own (IDEFICS: [text, image, text] lists, flamingo.processor_batch)
        batch = own(processor, texts, images, side)
    else:
        # the chat template already starts with <|begin_of_text|>: add no second one
        batch = processor(images=images, text=texts, padding=True, add_special_tokens=False,
                          return_tensors="pt", padding_side=side)
    batch = dict(batch)
    sizes = [[im[0].height, im[0].width] for im in images]
    batch["image_sizes"] = torch.tensor(sizes)  # (B, 2)
    batch["ids"] = [item["id"] for item in items]
    if with_answer:
        labels = batch["input_ids"].clone()  # (B, T)
        labels[batch["attention_mask"] == 0] = -100
        for b, n in enumerate(prompt_lens):
            # right padding: the prompt is the first n tokens of every row
            labels[b, :n] = -100
        batch["labels"] = labels
    return batch


def model_inputs(batch, device=None):
    """The keys the VLM's forward and generate take (drops labels, ids, image_sizes), moved to
    `device` if given: Mllama's (aspect ratios, cross_attention_mask), IDEFICS'
    (image_attention_mask), Qwen2-VL's (image_grid_thw, mm_token_type_ids)."""
    keys = ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
            "cross_attention_mask", "image_attention_mask", "image_grid_thw", "mm_token_type_ids")
    return {k: batch[k] if device is None else batch[k].to(device) for k in keys if k in batch}


def epoch_order(n_items, seed, epoch):
    """The data order of an epoch: a permutation depending only on (seed, epoch), the same on
    every rank."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_items, generator=generator).tolist()


def micro_batches(order, step, batch_size, grad_accum, rank, world):
    """Item indices of each micro-batch of this rank at `step` of the epoch. A step consumes
    world * grad_accum * batch_size items, micro-batch m of rank r the slice starting at
    (m * world + r) * batch_size: 1 rank x batch 2 and 2 ranks x batch 1 see the same global
    batch."""
    start = step * world * grad_accum * batch_size
    starts = [start + (m * world + rank) * batch_size for m in range(grad_accum)]
    return [order[s:][:batch_size] for s in starts]

