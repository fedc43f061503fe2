"""Words on Stable Diffusion v1.4's own CLIP vocabulary: data.split_words, extract.text_words and
the VLM side's word grouping (aggregate.plan_words) on the real 49,408-token BPE.

The vocabulary is CLIP's `bpe_simple_vocab_16e6.txt.gz`, which the open-clip-torch wheel ships
(a test-only dependency: `pip install --no-deps open-clip-torch`; the file is found without
importing open_clip, which would need more packages). Without it these tests are skipped.

    python -m pytest -q tests/test_clip_words.py
"""
import gzip
import importlib.util
import json
import unicodedata
from pathlib import Path

import pytest
import torch

import aggregate
import data
import extract
import models


def bytes_to_unicode():
    """CLIP's byte -> printable character table (openai/CLIP simple_tokenizer.py, as GPT-2's): the
    188 printable Latin-1 bytes map to themselves, the other 68 to chr(256 + n) in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_bpe_file():
    """Path of bpe_simple_vocab_16e6.txt.gz inside the installed open_clip package, else None."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def sd_clip(tmp_path_factory):
    """SD v1.4's CLIPTokenizer, from vocab.json + merges.txt written as CLIP builds its encoder
    (simple_tokenizer.py): the 256 byte characters, the same with "</w>", one token per merge
    (lines 1 to 48894 of the BPE file), then <|startoftext|> and <|endoftext|>."""
    path = clip_bpe_file()
    if path is None:
        pytest.skip("CLIP's BPE vocabulary is absent: pip install --no-deps open-clip-torch "
                    "(its wheel ships bpe_simple_vocab_16e6.txt.gz)")
    from transformers import CLIPTokenizer
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("sd14-tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.model_max_length = 77  # SD's text encoder
    return tokenizer


def test_vocabulary_is_sd14s(sd_clip):
    assert len(sd_clip) == 49408
    assert (sd_clip.bos_token_id, sd_clip.eos_token_id) == (49406, 49407)
    # CLIP's well-known ids of "a photo of a dog"
    assert sd_clip("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]


# text -> {word: the CLIP pieces of its tokens}, read off the real vocabulary
CASES = {
    "A dog's toy, don't!": {"a": ["a</w>"], "dog": ["dog</w>"], "'s": ["'s</w>"],
                            "toy": ["toy</w>"], "don": ["don</w>"], "'t": ["'t</w>"]},
    "in 2024 it cost 3.5": {"in": ["in</w>"], "2024": ["2</w>", "0</w>", "2</w>", "4</w>"],
                            "it": ["it</w>"], "cost": ["cost</w>"], "3": ["3</w>"], "5": ["5</w>"]},
    "naïve café": {"naïve": ["na", "Ã¯", "ve</w>"], "café": ["cafÃ©</w>"]},
    "a well-known x-ray": {"a": ["a</w>"], "well": ["well</w>"], "known": ["known</w>"],
                           "x": ["x</w>"], "ray": ["ray</w>"]},
    "antidisestablishmentarianism": {
        "antidisestablishmentarianism": ["anti", "dise", "stab", "lish", "ment", "arianism</w>"]},
    'Hello... (world)! "quoted" 50%': {"hello": ["hello</w>"], "world": ["world</w>"],
                                       "quoted": ["quoted</w>"], "50": ["5</w>", "0</w>"]},
    "the 1990s, H2O": {"the": ["the</w>"], "1990s": ["1</w>", "9</w>", "9</w>", "0</w>", "s</w>"],
                       "h2o": ["h</w>", "2</w>", "o</w>"]},
}


@pytest.mark.parametrize("text", CASES)
def test_text_words_on_sd14_vocabulary(sd_clip, text):
    """Clitics, numbers, accents, hyphens, a rare word in six pieces and punctuation: the words
    are split_words', each with the CLIP tokens of its characters and no other (")!" is one
    token and belongs to no word)."""
    words, positions = extract.text_words(sd_clip, text)
    assert words == list(CASES[text]) == [w for w, _, _ in data.split_words(text)]
    ids = sd_clip(text, padding="max_length", max_length=77, truncation=True).input_ids  # UNet's
    pieces = {w: [sd_clip.convert_ids_to_tokens(ids[p]) for occ in pos for p in occ]
              for w, pos in zip(words, positions)}
    assert pieces == CASES[text]


def test_decomposed_accents_stay_in_their_word(sd_clip):
    """"naïve café" typed with combining marks (NFD) gives the NFC words and the same CLIP tokens,
    CLIP's tokenizer composing the text first; the marks' characters belong to their words."""
    nfc = "naïve café"
    nfd = unicodedata.normalize("NFD", nfc)
    assert len(nfd) == len(nfc) + 2
    assert extract.text_words(sd_clip, nfd) == extract.text_words(sd_clip, nfc)
    assert [(a, b) for _, a, b in data.split_words(nfd)] == [(0, 6), (7, 12)]


TEXTS = list(CASES) + [
    "It's the U.S. flag; don't wear a t-shirt", "we'll they're I'm you've he'd, O'Brien's",
    "Zürich's größte Straße", "हिन्दी भाषा", "日本語 emoji 🙂", "x² ½ rock'n'roll e.g. snake_case",
    "DON'T SHOUT: Red, red, RED!"]


@pytest.mark.parametrize("match", ["exact", "root"])
@pytest.mark.parametrize("text", TEXTS)
def test_every_vlm_word_maps_to_its_own_dm_word(sd_clip, text, match):
    """The VLM side (Llama-style byte-level BPE tokens -> aggregate.plan_words, what training
    aligns) pairs every word of the answer with the DM word of the same characters: the "s" of
    "U.S." with "s", not with the "'s" of "It's"; the "t" of "t-shirt" with "t", not "'t"."""
    dm_words = extract.text_words(sd_clip, text)[0]
    vlm = models.bpe_tokenizer()
    ids = torch.tensor([vlm(text, add_special_tokens=False)["input_ids"]])  # (1, T)
    rows = torch.arange(ids.shape[1])[None]  # every token a captured row  # (1, T)
    plan = aggregate.plan_words(vlm, rows, ids, [dm_words], match)
    aligned = [dm_words[j] for j in plan["dm_index"][0].tolist()]
    # each word once, in order, with its own map
    assert plan["words"][0] == aligned == dm_words
