"""The benchmarks' own metrics (paper §7: "All benchmarks are evaluated using their default
metrics").

Each metric turns a model's answer and the item's reference answers into a score:
  - exact:   normalised exact match against any reference (the paper's ablation metric, §8);
  - choice:  the letter of a multiple-choice answer, options A to the last one listed (MMBench,
             ScienceQA, MMStar, SEED, WorldMedQA-V, §7.5);
  - vqa:     VQA accuracy, leave-one-annotator-out over ten answers (VQAv2, OK-VQA, TextVQA,
             VizWiz), under a harness's rule by name (vqa_rules.py: vlmevalkit, the paper's
             harness and the default; lmms-eval; lmms-eval-textvqa; official, GT-Vision-Lab/VQA);
  - anls:    average normalised Levenshtein similarity, threshold 0.5 (DocVQA, InfoVQA);
  - relaxed: ChartQA's relaxed accuracy, 5% tolerance for numbers;
  - cider:   CIDEr-D for captions (COCO, Flickr30k), in plain Python, without Java.
An item picks its metric with its own "metric" field (data.py's converters write it), else by its
fields (choice when the question lists options, else exact); --metric overrides. A run's score is
the mean over items, with a 95% interval: Wilson when every score is 0 or 1 (a proportion), a
Student t interval otherwise (a mean of soft scores, and CIDEr-D). The prediction files evaluate.py
writes (and reads back from any model with --score) are at the end.

    python -c "import metrics; print(metrics.vqa_accuracy('Two.', ['2'] * 2 + ['3'] * 8))"   # 0.6
"""
import csv
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from data import jsonl_lines
from vqa_rules import ARTICLES, VQA_RULES, check_rule, vqa_accuracy, vqa_normalize  # noqa: F401

# ---------------------------------------------------------------------------------------------
# exact match and multiple choice
# ---------------------------------------------------------------------------------------------

# number words to digits; articles ({"a", "an", "the"}) are vqa_rules' ARTICLES
NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalize_answer(text):
    """VQA-style normalisation before exact match: lower case, punctuation dropped (a period between
    digits is kept), number words to digits, articles dropped, whitespace collapsed.

    "The answer: Two red circles." -> "answer 2 red circles";  "3.5 cm" -> "3.5 cm"
    """
    text = str(text).lower().strip()
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)   # periods, except decimal points
    text = re.sub(r"[^\w\s.]", " ", text)              # every other punctuation mark
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


CHOICE_MARKER = re.compile(r"(?:(?<=\s)|^)\(?([A-Z])[.):]\)?\s+")   # "A. ", "(B) ", "C) ", "D: "


def parse_choices(question):
    """The options a multiple-choice question lists, as {letter: text}; {} when fewer than two.

    Options are lettered A, B, C, ... in order, up to the last one listed: a marker counts only
    when its letter is the next one expected, so initials inside an option are not read as options.
    Recognised markers: "A. x", "A) x", "(A) x", "A: x", one per line or inline.
    "Which organ? A. liver B. heart (C) lung" -> {"A": "liver", "B": "heart", "C": "lung"}
    "Who wrote it? A. J. Smith B. K. Lee"    -> {"A": "J. Smith", "B": "K. Lee"}
    """
    question = str(question)
    starts, expected = [], "A"
    for m in CHOICE_MARKER.finditer(question):
        if m.group(1) == expected:
            starts.append(m)
            expected = chr(ord(expected) + 1)
    ends = [m.start() for m in starts[1:]] + [len(question)]
    choices = {m.group(1): question[m.end():end].strip() for m, end in zip(starts, ends)}
    choices = {k: v for k, v in choices.items() if v}
    return choices if len(choices) >= 2 else {}


def extract_choice(text, choices=None):
    """The letter a (generated or reference) answer picks, or None; only the letters of `choices`
    count when given (A to the last option), any capital letter otherwise.

    In order: a leading letter ("B", "(B)", "B.", "B) liver"), an "answer is (B)" / "Answer: B"
    phrase, a "(B)" anywhere, then the text of exactly one option. A bare capital "A" inside a
    sentence is not read as a letter: it is usually the article ("A red circle").
    """
    text = str(text).strip()
    letters = f"[{''.join(choices)}]" if choices else "[A-Z]"
    m = re.match(rf"^\(?({letters})\)?(?:[.):,]|$)", text)
    if m:
        return m.group(1)
    # an "answer is (B)" / "Answer: B" phrase; the letter stays upper case
    m = re.search(rf"(?i:answer)\s*(?:(?i:is)|:)?\s*:?\s*\(?({letters})\b", text)
    if m:
        return m.group(1)
    m = re.search(rf"\(({letters})\)", text)
    if m:
        return m.group(1)
    if choices:
        norm = f" {normalize_answer(text)} "
        options = {k: normalize_answer(v) for k, v in choices.items()}
        hits = [k for k, v in options.items() if v and f" {v} " in norm]
        if len(hits) == 1:
            return hits[0]
    return None


def exact_match(prediction, answers):
    """1.0 when the prediction equals some reference after normalize_answer, else 0.0:
    "Two dogs." against ["2 dogs", "puppies"] -> 1.0 ("2 dogs" = "2 dogs");  "dogs" -> 0.0."""
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def reference_choice(question, answer):
    """(choices, reference): the options the question lists (parse_choices) and the letter the
    reference answer picks among them; reference None without options or when it picks none."""
    choices = parse_choices(question)
    reference = extract_choice(answer, choices) if choices else None
    return choices, reference


def score_prediction(prediction, answer, question):
    """dict(correct, kind): "choice" when the question lists options and the reference answer picks
    one of them (the predicted letter must equal it), otherwise "exact" (normalised exact match)."""
    choices, reference = reference_choice(question, answer)
    if reference is not None:
        picked = extract_choice(prediction, choices)
        return {"correct": picked == reference, "kind": "choice", "letter": picked,
                "reference_letter": reference}
    return {"correct": normalize_answer(prediction) == normalize_answer(answer), "kind": "exact"}


# ---------------------------------------------------------------------------------------------
# ANLS (DocVQA, InfoVQA) and relaxed accuracy (ChartQA)
# ---------------------------------------------------------------------------------------------

def levenshtein(a, b):
    """Edit distance (insertions, deletions, substitutions, each 1): "smiht" -> "smith" = 2."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(prediction, answers, threshold=0.5):
    """Average Normalised Levenshtein Similarity of one question (Biten et al. 2019, the DocVQA and
    InfoVQA metric): max over the references of s = 1 - NL if NL < threshold else 0, where
    NL = levenshtein(a, b) / max(len(a), len(b)) on lower-cased, whitespace-collapsed text.

    Worked example: prediction "Smiht", references ["Smith", "J. Smith"]:
      "smiht" vs "smith":    distance 2 (a swap is two edits), NL = 2/5 = 0.4 < 0.5 -> 0.6
      "smiht" vs "j. smith": distance 5 ("j. " inserted, plus the swap), NL = 5/8 >= 0.5 -> 0
      ANLS = max(0.6, 0) = 0.6
    """
    clean = lambda s: " ".join(str(s).strip().lower().split())  # noqa: E731
    predicted, best = clean(prediction), 0.0
    for reference in map(clean, answers):
        longest = max(len(predicted), len(reference))
        distance = levenshtein(predicted, reference) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def _as_number(text):
    """float(text), with "45%" read as 0.45 (ChartQA's _to_float); None when it is not a number."""
    text = str(text).strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction, answers, tolerance=0.05):
    """ChartQA's relaxed accuracy (Masry et al. 2022, after Methani et al. 2020; the pix2struct
    relaxed_correctness): 1 when some reference is a non-zero number and the prediction is a number
    within 5% of it (|p - t| / |t| <= 0.05), or when the two are equal as lower-cased text; else 0.
    A reference of 0 is compared as text, as there.

    Worked examples against "12.5": "13" -> |13 - 12.5| / 12.5 = 0.04 -> 1;  "13.2" -> 0.056 -> 0.
    "45%" against "0.45" -> 0.45 vs 0.45 -> 1;  "Yes" against "yes" -> 1;
    "13 cars" against "13" -> 0.
    """
    for reference in answers:
        p, t = _as_number(prediction), _as_number(reference)
        if p is not None and t:
            if abs(p - t) / abs(t) <= tolerance:
                return 1.0
        elif str(prediction).strip().lower() == str(reference).strip().lower():
            return 1.0
    return 0.0


# ---------------------------------------------------------------------------------------------
# CIDEr-D (COCO and Flickr30k captions), as pycocoevalcap computes it, without Java
# ---------------------------------------------------------------------------------------------
# pycocoevalcap tokenises with Stanford's PTBTokenizer (Java), lower-cased, then drops these
# punctuation tokens. caption_tokens approximates it in Python: lower case, clitics split off
# ("don't" -> "do n't", "man's" -> "man 's"), words kept whole with inner hyphens, periods,
# slashes and apostrophes ("t-shirt", "3.5"), other symbols as tokens of their own, and the
# punctuation below dropped. Where it differs from PTB: PTB also splits "cannot", "gonna",
# "wanna" and keeps a final period in abbreviations ("a.m."), and it writes [ ] as -lsb- -rsb-
# (which pycocoevalcap keeps); none of this is common in captions.
PTB_PUNCTUATION = {"''", "'", "``", "`", '"', "(", ")", "{", "}", "-lrb-", "-rrb-", "-lcb-",
                   "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def caption_tokens(text):
    """PTB-like tokens of a caption:
    "A man's dog, running." -> ["a", "man", "'s", "dog", "running"]."""
    text = re.sub(r"n't\b", " n't", str(text).lower())
    text = re.sub(r"'(s|re|ve|ll|d|m)\b", r" '\1", text)
    tokens = re.findall(r"n't|'(?:s|re|ve|ll|d|m)\b|[^\W_]+(?:[-./'][^\W_]+)*|[^\w\s]", text)
    return [t for t in tokens if t not in PTB_PUNCTUATION]


def ngram_counts(tokens, n=4):
    """Counts of every 1..n-gram of a token list:
    ["a", "dog", "a"] -> {(a,): 2, (dog,): 1, (a, dog): 1, (dog, a): 1, (a, dog, a): 1}"""
    grams = (tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))
    return Counter(grams)


def clipped_dot(cand, ref):
    """CIDEr-D's clipped dot product of one n-gram length's tf-idf vectors {n-gram: weight}:
    the sum over the candidate's n-grams of min(w_c, w_r) * w_r."""
    return sum(min(w, ref.get(g, 0.0)) * ref.get(g, 0.0) for g, w in cand.items())


def cider_d(candidates, references, n=4, sigma=6.0):
    """CIDEr-D of each candidate caption against its image's reference captions (Vedantam et al.
    2015; pycocoevalcap's Cider): per n-gram length k = 1..4, the n-grams are weighted by
    tf-idf, tf = count in the caption, idf = log(#images) - log(max(1, df)), df = in how many
    images' references the n-gram occurs (over the evaluated set, as pycocoevalcap does: scores
    depend on the set); then, per reference, the cosine between the candidate and reference vectors
    with the candidate's counts clipped at the reference's (min(w_c, w_r) * w_r), times a length
    penalty exp(-(l_c - l_r)^2 / (2 sigma^2)), sigma = 6; averaged over k and over the references,
    times 10. The set's CIDEr-D is the mean of these per-image scores.

    Worked example, two images with one reference each, "a dog runs" and "a cat sits"; log 2 = L:
      image 1, candidate "a dog runs": "a" occurs in both images (idf log 2 - log 2 = 0), every
      other n-gram in one (idf L). The vectors equal the reference's for k = 1, 2, 3 (cosine 1);
      there is no 4-gram (cosine 0): 10 * (1 + 1 + 1 + 0) / 4 = 7.5
      image 2, candidate "a dog sits" against "a cat sits": k = 1, {a: 0, dog: L, sits: L} vs
      {a: 0, cat: L, sits: L}: cosine L² / (√2 L · √2 L) = 0.5; no shared 2- or 3-gram:
      10 * (0.5 + 0 + 0 + 0) / 4 = 1.25.   The set's CIDEr-D: (7.5 + 1.25) / 2 = 4.375.
    """
    cands = [ngram_counts(caption_tokens(c), n) for c in candidates]
    refs = [[ngram_counts(caption_tokens(r), n) for r in rs] for rs in references]
    # df: in how many images' references each n-gram occurs
    df = Counter(g for rs in refs for g in set().union(*rs))
    log_images = math.log(len(refs)) if refs else 0.0

    def vectors(counts):
        vec = [{} for _ in range(n)]
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (log_images - math.log(max(1.0, df[g])))
        # the length is the bigram count, as pycocoevalcap counts it: the same differences as word
        # counts except against an empty caption
        length = sum(tf for g, tf in counts.items() if len(g) == 2)
        return vec, [math.sqrt(sum(w * w for w in v.values())) for v in vec], length

    scores = []
    for cand, rs in zip(cands, refs):
        vec, norm, length = vectors(cand)
        total = 0.0
        for ref in rs:
            vec_r, norm_r, length_r = vectors(ref)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                if norm[k] and norm_r[k]:
                    dot = clipped_dot(vec[k], vec_r[k])
                    total += dot / (norm[k] * norm_r[k]) * penalty / n
        scores.append(10.0 * total / len(rs))
    return scores


# ---------------------------------------------------------------------------------------------
# one metric per item, and a run's records
# ---------------------------------------------------------------------------------------------

METRICS = {  # name: (score of one item from (prediction, references), highest score)
    "exact": (exact_match, 1.0),
    "vqa": (vqa_accuracy, 1.0),
    "anls": (anls, 1.0),
    "relaxed": (relaxed_accuracy, 1.0),
    "choice": (None, 1.0),   # needs the question's options: score_items
    "cider": (None, 10.0),   # needs the whole set (document frequencies): score_items
}


def references(item):
    """The item's reference answers: its "answers" list when given, else [its "answer"]."""
    answers = item.get("answers")
    if answers is None:
        return [item["answer"]]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"item {item.get('id')!r}: field 'answers' must be a non-empty list of "
                         f"strings, got {str(answers)[:80]}")
    return answers


def pick_metric(item, metric="auto"):
    """The metric of one item: `metric` unless it is "auto"; with "auto", the item's own "metric"
    field (data.py's converters write it), else "choice" when the question lists options and the
    reference answer picks one, else "exact"."""
    name = metric if metric != "auto" else item.get("metric")
    if name is None:
        _, reference = reference_choice(item["question"], item["answer"])
        return "choice" if reference else "exact"
    if name not in METRICS:
        raise ValueError(f"item {item.get('id')!r}: metric {name!r} is not one of "
                         f"{', '.join(METRICS)}")
    return name


def score_choice(prediction, item):
    """The choice metric of one item: dict(score, letter, reference_letter)."""
    choices, reference = reference_choice(item["question"], item["answer"])
    if reference is None:
        raise ValueError(f"item {item.get('id')!r}: metric 'choice', but its question lists no "
                         f"lettered options A, B, ... or its answer {item['answer']!r} picks none "
                         f"of them")
    letter = extract_choice(prediction, choices)
    return {"score": float(letter == reference), "letter": letter, "reference_letter": reference}


def score_items(items, predictions, metric="auto", vqa_rule="vlmevalkit"):
    """One record per item: id, question, answer (and answers), prediction, category, kind (the
    metric), score, correct (score == 1; None for cider, which has no full mark), and for choice
    items the letters. CIDEr-D items are scored together (their document frequencies). vqa items
    are scored under `vqa_rule` (vqa_rules.VQA_RULES)."""
    check_rule(vqa_rule)
    records = []
    for item, prediction in zip(items, predictions):
        kind = pick_metric(item, metric)
        record = {"id": item["id"], "question": item["question"], "answer": item["answer"],
                  **({"answers": references(item)} if "answers" in item else {}),
                  "prediction": prediction, "category": item.get("category"), "kind": kind}
        if kind == "choice":
            record.update(score_choice(prediction, item))
        elif kind == "vqa":
            record["score"] = vqa_accuracy(prediction, references(item), rule=vqa_rule)
        elif kind != "cider":
            record["score"] = float(METRICS[kind][0](prediction, references(item)))
        records.append(record)
    captions = [i for i, r in enumerate(records) if r["kind"] == "cider"]
    candidates = [records[i]["prediction"] for i in captions]
    scores = cider_d(candidates, [references(items[i]) for i in captions])
    for i, score in zip(captions, scores):
        records[i]["score"] = score
    for r in records:
        r["correct"] = None if r["kind"] == "cider" else r["score"] == 1.0
    return records


# ---------------------------------------------------------------------------------------------
# a run's score: the mean, with a 95% interval (Wilson for 0/1 scores, Student t otherwise)
# ---------------------------------------------------------------------------------------------

def wilson_interval(k, n, z=1.959964):
    """95% Wilson score interval for k successes in n trials (better than the normal interval for
    small n and for accuracies near 0 or 1):

        (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n),   p = k/n, z = 1.96

    8/10 -> (0.4902, 0.9433); 10/10 -> (0.7225, 1.0); n = 0 -> (0.0, 1.0) (nothing known)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# t quantiles for a two-sided 95% interval, df = 1..30 (scipy.stats.t.ppf(0.975, df), 4 decimals)
T_975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423]


def t_quantile_975(df):
    """The 0.975 quantile of Student's t with df degrees of freedom: the table above up to 30,
    then the Cornish-Fisher expansion z + (z³ + z)/4df + (5z⁵ + 16z³ + 3z)/96df² (off by < 1e-4
    there)."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df * df)


def t_interval(scores, low=0.0, high=1.0):
    """95% Student t interval of a mean, mean ± t(n-1) · s / √n (s: the sample standard
    deviation), clipped to the metric's range [low, high]; fewer than 2 scores -> (low, high)
    (nothing known).

    [0.2, 0.4, 0.6, 0.4, 0.4]: mean 0.4, s = √(0.08 / 4) = 0.1414, t(4) = 2.7764,
    half-width 2.7764 · 0.1414 / √5 = 0.1756 -> (0.2244, 0.5756)."""
    n = len(scores)
    if n < 2:
        return low, high
    mean = sum(scores) / n
    s = math.sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1))
    half = t_quantile_975(n - 1) * s / math.sqrt(n)
    return max(low, mean - half), min(high, mean + half)


def paired(values, arm, base="ar"):
    """Paired differences arm - base over (world, seed): dict(mean, low, high, ci95, n, wins) (t
    interval; low and high None for a single pair)."""
    diffs = [v[arm] - v[base] for v in values if v.get(arm) is not None and v.get(base) is not None]
    if not diffs:
        return None
    lo, hi = t_interval(diffs, low=-math.inf, high=math.inf)
    # one pair: no interval
    finite = lambda x: x if math.isfinite(x) else None  # noqa: E731
    return {"mean": sum(diffs) / len(diffs), "low": finite(lo), "high": finite(hi),
            "ci95": [lo, hi], "n": len(diffs), "wins": sum(d > 0 for d in diffs)}


def paired_cell(gap):
    """'+0.021 [-0.042, +0.084] 2/3': a paired difference, its interval and its wins ('+0.021 1/1'
    for a single pair)."""
    if not gap:
        return "-"
    if gap["low"] is None or gap["high"] is None:  # one pair: no interval
        return f"{gap['mean']:+.3f} {gap['wins']}/{gap['n']}"
    low, high = gap["ci95"]
    return f"{gap['mean']:+.3f} [{low:+.3f}, {high:+.3f}] {gap['wins']}/{gap['n']}"


def mean_spread(values):
    """'0.613 ± 0.021': mean ± sample std over seeds (None values dropped)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {spread:.3f}"


def accuracy_summary(scores, high=1.0):
    """dict(accuracy (the mean score), ci95 [lo, hi], interval, correct (the sum of the scores: the
    count of correct items for 0/1 scores), n) for a list of booleans or scores; accuracy None if
    empty. Wilson interval when every score is 0 or 1 (and 1 is the full mark), a t interval
    otherwise (high: the metric's highest score; 10 for CIDEr-D, whose 0s and 1s are not a
    proportion)."""
    scores = [float(s) for s in scores]
    n, total = len(scores), sum(scores)
    binary = high == 1.0 and all(s in (0.0, 1.0) for s in scores)
    lo, hi = wilson_interval(int(total), n) if binary else t_interval(scores, 0.0, high)
    return {"accuracy": total / n if n else None, "ci95": [lo, hi],
            "interval": "wilson" if binary else "t", "correct": int(total) if binary else total,
            "n": n}


def accuracy_table(records):
    """Overall and per-`category` accuracy of scored records (dicts with "score" or "correct",
    optional "category" and "kind")."""
    def score(r):
        return r["score"] if r.get("score") is not None else float(r["correct"])

    high = max((METRICS[r["kind"]][1] for r in records if r.get("kind") in METRICS), default=1.0)
    table = {"all": accuracy_summary([score(r) for r in records], high)}
    for category in sorted({r["category"] for r in records if r.get("category") is not None}):
        scores = [score(r) for r in records if r.get("category") == category]
        table[category] = accuracy_summary(scores, high)
    return table


def run_scores(records):
    """A run's score fields of report.json: accuracy (table), metrics (items per metric), and the
    multiple-choice counts (items, and predictions whose letter could not be read)."""
    return {"accuracy": accuracy_table(records),
            "metrics": dict(Counter(r["kind"] for r in records)),
            "multiple_choice": sum(r["kind"] == "choice" for r in records),
            "unparsed_choice": sum(r["kind"] == "choice" and r["letter"] is None for r in records)}


def check_items(items, metric="auto"):
    """Raise ValueError naming the first item whose fields the metric cannot use (an unknown
    "metric", a malformed "answers", a choice item without lettered options): run before a model
    generates, not after."""
    for item in items:
        kind = pick_metric(item, metric)
        references(item)
        if kind == "choice":
            score_choice("", item)


def describe_metric(metric, vqa_rule="vlmevalkit"):
    """report.json's one line on how the items were scored."""
    if metric == "auto":
        which = ("each item's own \"metric\" field, else the letter for a multiple-choice "
                 "question, else exact match")
    else:
        which = f"{metric} for every item"
    return (f"--metric {metric}: {which}; vqa items under the {vqa_rule} rule (--vqa-rule); "
            "the mean score with a 95% interval (Wilson for 0/1 scores, Student t for soft "
            "scores and CIDEr-D)")


# ---------------------------------------------------------------------------------------------
# prediction files: written per run by evaluate.py, read back from any model (evaluate.py --score)
# ---------------------------------------------------------------------------------------------

VLMEVALKIT_COLUMNS = ["index", "question", "answer", "prediction", "category"]


def vlmevalkit_row(record):
    """A scored record in VLMEvalKit's prediction-file columns. Several reference answers are
    written as the Python list literal that its VQA datasets store ("['2', '2', 'two']"); an
    all-digit id becomes an integer index, as in its TSVs."""
    answers = record.get("answers")
    return {"index": int(record["id"]) if record["id"].isdigit() else record["id"],
            "question": record["question"],
            "answer": str(answers) if answers and len(answers) > 1 else record["answer"],
            "prediction": record["prediction"], "category": record.get("category") or ""}


def write_predictions(run_dir, records, vlmevalkit=False):
    """<run_dir>/predictions.jsonl: one scored record per item. vlmevalkit=True writes VLMEvalKit's
    columns instead (VLMEVALKIT_COLUMNS), and the same rows as predictions.tsv: the file VLMEvalKit
    reads back (its PRED_FORMAT=tsv layout, tab-separated, every field quoted), to be renamed
    <model>_<dataset>.tsv in its work dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [vlmevalkit_row(r) for r in records] if vlmevalkit else records
    with open(run_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if vlmevalkit:
        with open(run_dir / "predictions.tsv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, VLMEVALKIT_COLUMNS, delimiter="\t", quoting=csv.QUOTE_ALL)
            writer.writeheader()
            writer.writerows(rows)


def read_predictions(path):
    """{item id: prediction} of a JSONL file with one {"id", "prediction"} object per line
    (VLMEvalKit's "index" is read as the id), as written by any model; ValueError naming the line
    when malformed."""
    predictions = {}
    for n, line, row in jsonl_lines(path):
        key = "id" if isinstance(row, dict) and "id" in row else "index"
        if (not isinstance(row, dict) or key not in row
                or not isinstance(row.get("prediction"), str)):
            raise ValueError(f"{path} line {n}: expected {{\"id\": ..., \"prediction\": \"...\"}} "
                             f"(or VLMEvalKit's \"index\" for the id), got {line.strip()[:100]}")
        if str(row[key]) in predictions:
            raise ValueError(f"{path} line {n}: id {str(row[key])!r} is predicted twice")
        predictions[str(row[key])] = row["prediction"]
    return predictions
