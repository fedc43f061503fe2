r"""Evaluate fine-tuned runs side by side: VQA accuracy, attention entropy, alignment, pictures
(paper §7, §8, App. B eq. 23, Fig. 7, 8, 17, 25).

For every run (and/or the base model) this script
  1. generates answers greedily, in batches, and scores them with each benchmark's own metric
     (metrics.py, --metric): exact match after normalisation (the paper's ablation metric, §8),
     the letter of a multiple-choice answer (WorldMedQA-V, §7.5), VQA accuracy, ANLS, ChartQA's
     relaxed accuracy or CIDEr-D; the mean score with a 95% interval, per run and per `category`;
     predictions are written per item (--vlmevalkit: in VLMEvalKit's columns, for its scorers);
  2. with --attn (the store written by extract.py), reads attention on the reference answer under
     teacher forcing, for the answer's words that have a DM map (label words: the same words for
     every model; aggregate.plan_words). One ruler for every model, base, AR or Lavender:
       - "own": the model's own cross-attention, the pretrained attention A of every model (for a
         Lavender run with parallel projections, A, not A_d), the same layers (--layers) and the
         same aggregation (--aggregate, default mean-mean) for every model, no Aligner, made into
         per-word 32x32 maps and min-max normalised as the DM maps are (aggregate.vlm_word_maps);
       - "head", Lavender runs only, reported in rows of their own: the map the run's loss
         compares with the DM map (eq. 17): its capture (A or A_d), aggregation and Aligner;
     and for each, per word:
       - entropy H(p) = -sum_a p(a) log p(a) of the map made a distribution over its 32x32 cells
         (App. B eq. 23; attention_entropy; histograms as in Fig. 7/25), and of the DM maps of the
         same words,
       - alignment MSE against the word's DM map (eq. 9/17 for one word),
       - pointing: whether the map's argmax lies inside the object the word names, when the JSONL
         gives a "masks" or "boxes" entry for it (and the DM map's own pointing on the same words),
       - overlay pictures for a few items (Fig. 8/17): image, DM map, each model's own map and
         each Lavender run's head map, per DM word;
  3. writes report.json (every figure), report.md (one row per run), <run>/predictions.jsonl,
     entropy.png and overlays/<id>.png (figures.py), and prints a one-line summary.

Usage:
    python evaluate.py --model tiny --run-dir runs/ar --run-dir runs/lavender --data test.jsonl \
        --attn attn/ --out eval/
    # the base model only
    python evaluate.py --model llama32 --model-path ~/llama32 --data test.jsonl --out eval/base
    torchrun --nproc_per_node 8 evaluate.py --model llama32 --run-dir runs/lavender \
        --data test.jsonl --out eval/
    # any model's answers, no model
    python evaluate.py --score other_model.jsonl --data textvqa.jsonl --out eval/other
A run trained under FSDP is loaded whole (runs.load_run). Under torchrun every rank loads the model
on its own GPU and evaluates every world-th item; rank 0 gathers the per-item results and writes the
same report as one process would. The report files (report.json, report.md, the summary line) are
eval_report.py's.
"""
import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch

import data
from aggregate import (AGGREGATIONS, LAYER_SUBSETS, aligned_layers, attention_capture, label_plan,
                       vlm_word_maps)
from distributed import exit_if_torchrun, gather_objects, setup_distributed, teardown
from eval_report import read_scored_items, score_files, summary_line, unique_names, write_report
from figures import draw_entropy_histograms, draw_overlays
from metrics import (METRICS, accuracy_summary, describe_metric, run_scores, score_items,
                     write_predictions)
from models import load_vlm, maps_have_positions, resolve_dtype
from runs import load_run, run_problem
from vqa_rules import VQA_RULES

# ---------------------------------------------------------------------------------------------
# attention measures: entropy (App. B eq. 23), alignment MSE (eq. 9), pointing
# ---------------------------------------------------------------------------------------------

def attention_entropy(maps, eps=1e-12):
    """App. B eq. 23: H(p) = -sum_a p(a) log p(a), in nats, with p = map / map.sum() over the 32x32
    cells (maps are stored min-max normalised, so they are made distributions first; 0 log 0 = 0).
    Uniform 32x32 -> log 1024 = 6.93; one-hot -> 0. An all-zero map (a constant map after min-max
    normalisation) carries no location: it is read as uniform. maps (..., h, w) -> (...)."""
    flat = maps.float().flatten(-2).clamp_min(0)                     # (..., h*w)
    total = flat.sum(-1, keepdim=True)                               # (..., 1)
    uniform = torch.full_like(flat, 1.0 / flat.shape[-1])
    p = torch.where(total > eps, flat / total.clamp_min(eps), uniform)
    # + 0.0 turns -0.0 into 0.0
    return -(p * torch.log(p.clamp_min(eps))).sum(-1) + 0.0          # (...)


def alignment_mse(vlm_maps, dm_maps):
    """Per-word mean squared error over the 32x32 cells (eq. 9/17 without the sum over words).
    (..., h, w), (..., h, w) -> (...)."""
    return ((vlm_maps.float() - dm_maps.float()) ** 2).flatten(-2).mean(-1)


def argmax_pixel(attn_map, height, width):
    """The image pixel (y, x) at the centre of the map's highest cell (first one on ties): the
    argmax is mapped back to image pixels rather than the mask resized to the map grid, so a mask
    is never blurred and a thin object still counts."""
    h, w = attn_map.shape
    cell = int(torch.argmax(attn_map.reshape(-1)))
    i, j = divmod(cell, w)
    y = min(int((i + 0.5) * height / h), height - 1)
    x = min(int((j + 0.5) * width / w), width - 1)
    return y, x


def pointing_hit(attn_map, region):
    """True when the argmax of a word's map falls inside its object; region (H, W) bool array in
    image pixels."""
    y, x = argmax_pixel(attn_map, *region.shape)
    return bool(region[y, x])


def summarize(values):
    """dict(mean, std, median, n) of a list of floats (None-valued when empty)."""
    if not values:
        return {"mean": None, "std": None, "median": None, "n": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)),
            "n": len(values)}


# ---------------------------------------------------------------------------------------------
# the models: generation and teacher-forced attention maps
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_answers(model, processor, items, batch_size=8, max_new_tokens=16, device="cpu",
                     show=True):
    """Greedy answers. Prompts come from data.collate(with_answer=False): the training chat template
    (user [image, question] + the assistant header), LEFT padded so that every row's first new token
    follows its own prompt. Mllama's generate takes pixel_values, aspect_ratio_ids,
    aspect_ratio_mask and cross_attention_mask beside the text."""
    tok = processor.tokenizer
    # stop at the model's own end tokens (Llama-3.2-Instruct lists several) and at the tokenizer's
    model_eos = getattr(model.generation_config, "eos_token_id", None)
    if not isinstance(model_eos, list):
        model_eos = [model_eos] if model_eos is not None else []
    eos = sorted({*model_eos, tok.eos_token_id} - {None})
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    answers = []
    batches = range(0, len(items), batch_size)
    for start in data.progress_bar(batches, show, desc="generate", leave=False):
        prompts = data.collate(processor, items[start:start + batch_size], with_answer=False)
        batch = data.model_inputs(prompts, device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)
        new = out[:, batch["input_ids"].shape[1]:]                       # (B, new tokens)
        texts = tok.batch_decode(new, skip_special_tokens=True)
        answers += [a.strip() for a in texts]
    return answers


def capture_settings(lavender, model, args):
    """(own, head): how a model's maps are made. own: the one ruler, the same for every model
    (--aggregate, --layers, --match on the pretrained attention, no Aligner); head: a Lavender run's
    map as its loss saw it (runs.load_run's lavender dict: aligner, layers, aggregation,
    aligner_mode, learned), None for the base model and runs without an Aligner or projections."""
    own = {"aggregation": args.aggregate, "layers": aligned_layers(model, args.layers),
           "match": args.match, "aligner": None, "aligner_mode": "auto", "learned": False}
    if lavender is None or (lavender["aligner"] is None and not lavender["learned"]):
        return own, None
    head = dict(lavender, match=args.match)
    head["layers"] = head.get("layers") or aligned_layers(model, "all")
    return own, head


def word_maps(capture, plan, batch, settings):
    """(B, W, 32, 32) maps of `settings` (capture_settings) from a filled capture."""
    maps = vlm_word_maps(capture, plan, batch, aggregation=settings["aggregation"],
                         aligner=settings["aligner"], aligner_mode=settings["aligner_mode"])
    return maps.float().cpu()


@torch.no_grad()
def answer_maps(model, processor, items, dm_store, own, head=None, batch_size=4, device="cpu",
                show=True):
    """Per item dict(words, dm_index, own, head): the per-word maps on the reference answer under
    teacher forcing, for the answer's words that have a DM map (label words; plan_words). own and
    head (W, 32, 32) as capture_settings makes them (head None without one); one forward fills
    both."""
    out = []
    captures = [attention_capture(model, own["layers"], learned=False)]
    if head is not None:
        captures.append(attention_capture(model, head["layers"], learned=head["learned"]))
    try:
        batches = range(0, len(items), batch_size)
        for start in data.progress_bar(batches, show, desc="attention", leave=False):
            chunk = items[start:start + batch_size]
            batch = data.collate(processor, chunk, with_answer=True)
            dm_words = [dm_store[it["id"]][1] if it["id"] in dm_store else None for it in chunk]
            # rows (B, R): every row that predicts an answer token
            rows, plan = label_plan(processor.tokenizer, batch["input_ids"], batch["labels"],
                                    dm_words, own["match"])
            for capture in captures:
                capture.set_rows(rows.to(device))
            model(**data.model_inputs(batch, device))
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            # one (B, W, 32, 32) tensor per capture
            maps = [word_maps(c, plan, batch, s) for c, s in zip(captures, (own, head))]
            for b in range(len(chunk)):
                n = len(plan["words"][b])
                head_maps = maps[1][b, :n] if head is not None else None
                out.append({"words": plan["words"][b], "dm_index": plan["dm_index"][b, :n].tolist(),
                            "own": maps[0][b, :n], "head": head_maps})
    finally:
        for capture in captures:
            capture.remove()
    return out


def word_measures(maps, dm_maps, m, regions):
    """Per-word entropy (App. B.3, eq. 23), MSE against the DM map, pointing hits of (W, 32, 32)
    maps (one item)."""
    measures = {"entropies": attention_entropy(maps).tolist(), "errors": [], "hits": []}
    for w, (word, j) in enumerate(zip(m["words"], m["dm_index"])):
        measures["errors"].append(float(alignment_mse(maps[w], dm_maps[j])))
        region = regions.get(data.normalize_word(word))
        if region is not None:
            measures["hits"].append(pointing_hit(maps[w], region))
    return measures


def measure_items(results, maps, model, dm_store, regions, head, drawn):
    """Adds to each of this rank's results the word_measures of its own maps, of the DM maps of
    the same words and of a Lavender run's head maps; and, for the items in `drawn` (the
    overlays), the maps themselves. maps: answer_maps' per-item dicts, in the results' order."""
    # no pointing for maps without positions (IDEFICS' resampler latents)
    placed = maps_have_positions(model)
    # every word below has a DM map (plan_words keeps only those)
    for result, m in zip(results, maps):
        item_id = result["record"]["id"]
        dm_maps = dm_store[item_id][0] if item_id in dm_store else None
        word_regions = regions.get(item_id, {})
        vlm_regions = word_regions if placed else {}
        result["own"] = word_measures(m["own"], dm_maps, m, vlm_regions)
        if m["words"]:
            matched = torch.stack([dm_maps[j] for j in m["dm_index"]])
        else:
            matched = torch.zeros(0, 32, 32)
        result["dm"] = word_measures(matched, dm_maps, m, word_regions)
        if head is not None:
            result["head"] = word_measures(m["head"], dm_maps, m, vlm_regions)
        if item_id in drawn:
            result["picture"] = {kind: {j: m[kind][w] for w, j in enumerate(m["dm_index"])}
                                 for kind in ("own", "head") if m[kind] is not None}


def pointing_split(eval_dir):
    """(accuracy on the items whose answer word's own map points at its object, accuracy on the
    items where it misses, their counts) from a run's predictions.jsonl: is a grounded answer a
    better one?"""
    lines = (Path(eval_dir) / "predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    hit = [r["correct"] for r in records if r.get("own_pointing") and all(r["own_pointing"])]
    miss = [r["correct"] for r in records if r.get("own_pointing") and not all(r["own_pointing"])]
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return mean(hit), mean(miss), len(hit), len(miss)


def attention_summary(results, key):
    """dict(entropy, alignment_mse, pointing, matched_words) over every item's words (item
    order)."""
    every = lambda name: [v for r in results for v in r[key][name]]  # noqa: E731
    hits = every("hits")
    errors = every("errors")
    return {"entropy": summarize(every("entropies")), "alignment_mse": summarize(errors),
            "pointing": accuracy_summary(hits) if hits else None, "matched_words": len(errors)}


def shown_settings(settings):
    """Capture settings as report.json shows them: the Aligner by its class name."""
    aligner = settings["aligner"]
    return dict(settings, aligner=type(aligner).__name__ if aligner is not None else None)


def attention_report(results, own, head):
    """A run report's attention fields: the measures of its own maps, of the DM maps on the same
    words, and of a Lavender run's head (None without one)."""
    mine = attention_summary(results, "own")
    head_report = None
    if head:
        head_report = dict(attention_summary(results, "head"), settings=shown_settings(head))
    return {"settings": shown_settings(own), "vlm_entropy": mine["entropy"],
            "alignment_mse": mine["alignment_mse"], "pointing": mine["pointing"],
            "matched_words": mine["matched_words"],
            "dm_on_matched": attention_summary(results, "dm"), "head": head_report}


# ---------------------------------------------------------------------------------------------
# one model, all measures
# ---------------------------------------------------------------------------------------------

def evaluate_model(name, model, processor, settings, items, dm_store, regions, args, out_dir,
                   drawn=(), rank=0, world=1, device="cpu"):
    """Accuracy (and, with a DM store, attention measures) of one model; rank 0 writes
    <out>/<name>/predictions.jsonl. settings: capture_settings' (own, head). This rank measures
    items rank, rank + world, ...; the per-item results are gathered (distributed.gather_objects)
    and put back in item order, so the report does not depend on the number of ranks. Returns (run
    report dict, {item id: {"own" / "head": {dm word index: map}}} for the items in `drawn`)."""
    show = not args.quiet and rank == 0
    model.to(device).eval()
    mine = list(range(rank, len(items), world))
    my_items = [items[i] for i in mine]
    start = time.perf_counter()
    predictions = generate_answers(model, processor, my_items, args.batch_size,
                                   args.max_new_tokens, device, show)
    # every rank's generation time
    seconds = gather_objects([time.perf_counter() - start], world)
    # one dict per item of this rank: its prediction and, with a DM store, its per-word measures
    results = []
    for i, prediction in zip(mine, predictions):
        results.append({"index": i, "record": {"id": items[i]["id"], "prediction": prediction}})
    own, head = settings if dm_store else (None, None)
    if dm_store:
        maps = answer_maps(model, processor, my_items, dm_store, own, head, args.batch_size,
                           device, show)
        measure_items(results, maps, model, dm_store, regions, head, drawn)
    # every rank: all items
    results = sorted(gather_objects(results, world), key=lambda r: r["index"])
    # scored once gathered: CIDEr-D's document frequencies are over the whole set
    predictions = [r["record"]["prediction"] for r in results]
    records = score_items(items, predictions, args.metric, args.vqa_rule)
    # per item: did the own map of each answer word point at its object
    for record, r in zip(records, results):
        if "own" in r:
            record["own_pointing"] = r["own"]["hits"]
    if rank == 0:
        write_predictions(out_dir / name, records, args.vlmevalkit)
    # items per second: all ranks together
    report = {"name": name, **run_scores(records), "generate_seconds": max(seconds),
              "items_per_second": len(items) / max(max(seconds), 1e-9)}
    pictures = {}
    if dm_store:
        pictures = {r["record"]["id"]: r["picture"] for r in results if "picture" in r}
        report.update(attention_report(results, own, head))
        report["_entropies"] = [v for r in results for v in r["own"]["entropies"]]
    return report, pictures


# ---------------------------------------------------------------------------------------------
# main: the test data checked, each model loaded and evaluated, the report written
# ---------------------------------------------------------------------------------------------

def item_problems(items, attn_dir, root):
    """'item ...: what is wrong' for every item that cannot be evaluated: an id that is not a plain
    file name (overlays/<id>.png must stay in --out) or repeats another, an image that does not
    decode, an unusable attention file (data.check_item), a mask that cannot be read."""
    problems = list(data.duplicate_ids(items).values())
    for item in items:
        problem = data.check_item(item, attn_dir=attn_dir)[0]
        problems += [problem] if problem else []
        try:
            data.item_regions(item, root, data.normalize_word)
        # any exception: a missing or malformed mask or box
        except Exception as err:  # noqa: BLE001
            problems.append(f"item {item['id']!r} (line {item.get('line', '?')}): masks/boxes "
                            f"cannot be read ({type(err).__name__}: {err})")
    return problems


def read_test_data(args):
    """(items, dm_store, regions): --data and --attn read, every item checked (item_problems); a
    problem stops the evaluation with the items named, before any model is loaded."""
    # a missing or malformed file: one line, before any model
    items = read_scored_items(args)
    root = Path(args.data).resolve().parent
    problems = item_problems(items, args.attn, root)
    if problems:
        listed = "\n  ".join(problems[:20])
        raise SystemExit(f"{len(problems)} problem(s) in --data {args.data} / --attn {args.attn}; "
                         f"fix or remove these items:\n  " + listed)
    # {id: (maps, words)} of the items with an attention file
    dm_store = {}
    for it in items:
        stored = data.read_maps(args.attn, it["id"])
        if stored[0] is not None:
            dm_store[it["id"]] = stored
    if args.attn and not dm_store:
        raise SystemExit(f"--attn {args.attn}: no attention file for any of the {len(items)} "
                         f"items (expected <attn>/<id>.safetensors, written by extract.py)")
    regions = {it["id"]: data.item_regions(it, root, data.normalize_word) for it in items
               if dm_store and (it.get("masks") or it.get("boxes"))}
    return items, dm_store, regions


def open_run(run_dir, device, dtype):
    """runs.load_run, with a broken run folder turned into a message that names it."""
    problem = run_problem(run_dir)
    if problem is None:
        try:
            return load_run(run_dir, device=device, dtype=dtype)
        # unreadable weights, a foreign adapter, ...
        except Exception as err:  # noqa: BLE001
            problem = f"cannot be loaded ({type(err).__name__}: {str(err)[:300]})"
    raise SystemExit(f"--run-dir {run_dir}: {problem}")


def models_to_evaluate(args):
    """[(name, run dir or None for the base --model)]: the base first (with --base, or when no
    --run-dir is given), then each run named by its folder (made unique with -<n> when two share
    a name)."""
    models = []
    if args.base or not args.run:
        if not args.model:
            raise SystemExit("give --model <preset> to evaluate the base model, or one or more "
                             "--run-dir DIR")
        models.append(("base", None))
    # a run is named by its plain folder name
    models += [(Path(r).resolve().name or f"run{i}", r) for i, r in enumerate(args.run)]
    names = unique_names([n for n, _ in models])
    return [(n, r) for n, (_, r) in zip(names, models)]


def load_model(run_dir, args, device, dtype):
    """(model, processor, lavender): the base --model when run_dir is None, else the run (a LoRA
    or full run, loaded whole on this one process, also one trained under FSDP)."""
    if run_dir is None:
        # the weights go to this rank's device as they load
        model, processor = load_vlm(args.model, args.model_path, dtype, device)
        return model, processor, None
    model, processor, lavender, config = open_run(run_dir, device, dtype)
    if args.model and config.get("model") != args.model:
        raise SystemExit(f"--run-dir {run_dir} was trained from --model {config.get('model')}, "
                         f"not {args.model}")
    return model, processor, lavender


def evaluate(args):
    """Library entry (toy.py calls it with build_parser()'s settings): returns the report dict.
    Under torchrun every rank runs it; rank 0 writes the files and prints the summary. With
    --score, no model: the prediction files are scored (score_files)."""
    if not args.data or not args.out:
        raise SystemExit("evaluate.py needs --data (the test JSONL) and --out (the report's "
                         "folder)")
    if args.score:
        return score_files(args)
    data.library_bars(not args.quiet)
    rank, world, device, _ = setup_distributed()
    # under torchrun: this rank's GPU (or the CPU)
    device = str(device) if world > 1 else args.device
    try:
        return evaluate_ranks(args, rank, world, device)
    finally:
        teardown(world)


def evaluate_ranks(args, rank, world, device):
    """evaluate on this rank: each model in turn (models_to_evaluate), then, on rank 0, the
    figures (draw_dm_side) and the report files; returns the report dict."""
    out_dir = Path(args.out)
    items, dm_store, regions = read_test_data(args)
    run_dirs = [r for _, r in models_to_evaluate(args) if r]
    problems = [f"--run-dir {r}: {p}" for r in run_dirs if (p := run_problem(r))]
    # every broken run named at once, before the first runs are evaluated
    if problems:
        raise SystemExit("\n".join(problems))
    out_dir.mkdir(parents=True, exist_ok=True)
    # the overlays' items: only their maps are kept
    drawn = [it for it in items if it["id"] in dm_store][:args.figures]
    drawn_ids = {it["id"] for it in drawn}

    # ---- each model in turn: load, generate, score, read its attention ----
    runs, pictures = [], {}
    # auto: bf16 on a GPU, fp32 on a CPU
    dtype = resolve_dtype(args.dtype, device)
    for name, run_dir in models_to_evaluate(args):
        model, processor, lavender = load_model(run_dir, args, device, dtype)
        settings = capture_settings(lavender, model, args) if dm_store else None
        report, pictures[name] = evaluate_model(name, model, processor, settings, items, dm_store,
                                                regions, args, out_dir, drawn_ids, rank, world,
                                                device)
        report["run_dir"] = run_dir
        runs.append(report)
        # one model in memory at a time (gc: PEFT wrappers and hooks can hold it in reference
        # cycles)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    report = {"data": str(args.data), "items": len(items), "items_with_attention": len(dm_store),
              "out": str(out_dir), "metric": describe_metric(args.metric, args.vqa_rule),
              "runs": runs, "figures": []}
    # every rank holds the gathered figures; the files are rank 0's job
    if rank != 0:
        return report
    if dm_store:
        draw_dm_side(report, items, dm_store, drawn, pictures, out_dir)
    for r in runs:
        r.pop("_entropies", None)
        r.pop("dm_on_matched", None)
    write_report(report, out_dir)
    print(summary_line(report))
    return report


def draw_dm_side(report, items, dm_store, drawn, pictures, out_dir):
    """The DM side of the report (run-independent), the entropy histograms (Fig. 7/25) and the
    overlays (Fig. 8/17). The DM's maps are read on the matched words, the same words for every
    model (label words)."""
    runs = report["runs"]
    dm = runs[0].pop("dm_on_matched")
    report["dm"] = {"entropy": dm["entropy"], "pointing": dm["pointing"],
                    "matched_words": dm["matched_words"]}
    # every DM word, for the histogram
    dm_entropy = [float(h) for it in items if it["id"] in dm_store
                  for h in attention_entropy(dm_store[it["id"]][0])]
    vlm_entropies = {r["name"]: r["_entropies"] for r in runs}
    draw_entropy_histograms(out_dir / "entropy.png", dm_entropy, vlm_entropies)
    overlays = draw_overlays(out_dir, drawn, dm_store, pictures)
    report["figures"] += ["entropy.png"] + overlays


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to evaluate
    p.add_argument("--model", default=None,
                   help="VLM preset (models.VLM_PRESETS: llama32, idefics, qwen2vl, tiny, ...): "
                        "the base model, evaluated when no --run-dir is given or with --base")
    p.add_argument("--model-path", default=None,
                   help="local copy of the --model preset (a save_pretrained folder)")
    p.add_argument("--run-dir", "--run", dest="run", action="append", default=[],
                   help="a run directory written by train.py; repeat to compare runs (--run is the "
                        "same flag, but torchrun takes --run for its own --run-path: use --run-dir "
                        "there)")
    p.add_argument("--base", action=argparse.BooleanOptionalAction, default=False,
                   help="also evaluate the base --model beside the runs")
    # data
    p.add_argument("--data", help="test JSONL (DESIGN.md format; optional category, masks, boxes)")
    p.add_argument("--attn", default=None,
                   help="attention store of extract.py for the test items: enables entropy, "
                        "alignment MSE, pointing and pictures")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N items (0: all)")
    # generation and maps
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy generation length limit")
    p.add_argument("--batch-size", type=int, default=8,
                   help="items per generation / teacher-forcing batch")
    p.add_argument("--aggregate", default="mean-mean",
                   choices=[a for a in AGGREGATIONS if a != "learn"],
                   help="every model's own maps (the one ruler; a Lavender run's head keeps its "
                        "own): aggregation over heads-layers (§4.2)")
    p.add_argument("--layers", default="all", choices=LAYER_SUBSETS,
                   help="every model's own maps: the text-to-image attention layers read")
    p.add_argument("--match", default="exact", choices=["exact", "root"],
                   help="VLM-to-DM word matching")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the VLM's dtype, base model and runs; auto: bfloat16 on a GPU (half the "
                        "memory), float32 on a CPU")
    # scoring
    p.add_argument("--metric", default="auto", choices=["auto", *METRICS],
                   help="how answers are scored: auto (each item's \"metric\" field, written by "
                        "prepare.py convert; else choice for a question with lettered options, "
                        "else exact), or one metric for every item: exact, vqa "
                        "(VQAv2/OK-VQA/TextVQA/VizWiz), anls (DocVQA/InfoVQA), relaxed (ChartQA), "
                        "choice, cider (CIDEr-D, captions); see metrics.py")
    p.add_argument("--vqa-rule", default="vlmevalkit", choices=list(VQA_RULES),
                   help="how vqa items' answers are processed before matching (vqa_rules.py): "
                        "vlmevalkit (the paper's harness), lmms-eval (its VQAv2), "
                        "lmms-eval-textvqa (its TextVQA/OK-VQA/VizWiz), official "
                        "(GT-Vision-Lab/VQA: processed only when the ten answers disagree)")
    p.add_argument("--score", action="append", default=[], metavar="PRED.jsonl",
                   help="score a prediction file of any model (lines {\"id\", \"prediction\"}; "
                        "VLMEvalKit's \"index\" is read as the id) against --data, without "
                        "loading a model; repeat to compare files")
    p.add_argument("--vlmevalkit", action=argparse.BooleanOptionalAction, default=False,
                   help="write predictions.jsonl in VLMEvalKit's columns (index, question, answer, "
                        "prediction, category) and the same rows as predictions.tsv, the file "
                        "VLMEvalKit reads back")
    # output
    p.add_argument("--out", help="output directory (report.json, report.md, PNGs, predictions)")
    p.add_argument("--figures", type=int, default=4,
                   help="items drawn as overlay grids (Fig. 8/17)")
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress bars")
    return p


def main():
    evaluate(build_parser().parse_args())
    # (gloo teardown, see there)
    exit_if_torchrun()


if __name__ == "__main__":
    main()
