"""The one-command demo of the whole method on the miniature world (not in the paper; it runs §4-§8
end to end in minutes on a CPU), the protocol of every ablation arm, and the demo's report.

No weights can be downloaded here, so the project draws its own world (world.py) and trains its
own "pretrained" models on it (base_models.py: toy-sd and the toy VLM, shipped in toy_models/);
then every step of the paper runs on it for real, through the real scripts:

  1. `python toy.py`: extract DM maps (extract.py), fine-tune AR, Lavender and the oracle (the
     world's object masks as targets, world.oracle_store) with the same budget and seeds (train.py),
     evaluate (evaluate.py) and measure the attention ceiling (base_models.py); print one table,
     write toy_out/toy_report.md and .json (`--report toy_report.md`: the shipped report).
  2. `python toy.py protocol`: every arm over several worlds and seeds, paired against AR of the
     same world and seed, with the oracle and the controls (protocol.json, protocol.md).

    python toy.py                     # the demo (shipped weights in toy_models/, world cached in toy_out/)
    python toy.py protocol            # every arm x --worlds x --seeds
    python toy.py build               # draw the world only (world.py)
    python toy.py train-sd --seed 0   # retrain toy_models/toy-sd (1500 steps of 16, 12 min, 1 core)
    python toy.py train-vlm --seed 0  # retrain toy_models/toy-vlm
    python toy.py measure-sd          # toy-sd pointing on held-out images (colour and cell words apart)
"""
import argparse
import hashlib
import json
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

import base_models
import data
import evaluate
import extract
import mmdit
import models
import toy_teachers
import train
import world
from metrics import mean_spread, paired, paired_cell
from runs import file_sha256

ROOT = Path(__file__).resolve().parent
TOY_MODELS = ROOT / "toy_models"

# ---------------------------------------------------------------------------------------------
# the demo: extract -> fine-tune AR and Lavender -> evaluate, every stage through the real scripts
# ---------------------------------------------------------------------------------------------

def _one_thread_worker(show_bars):
    torch.set_num_threads(1)
    data.library_bars(show_bars)


def in_parallel(args, fn, calls):
    """[fn(*call) for call in calls], on --threads worker processes of one torch thread each: a toy
    model's step gains little from a second thread, a second process doubles the work done. Every
    call runs on one thread wherever it runs, so the figures do not depend on --threads."""
    if args.threads <= 1 or len(calls) <= 1:
        return [fn(*call) for call in calls]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
    with ProcessPoolExecutor(min(args.threads, len(calls)), mp_context=context,
                             initializer=_one_thread_worker, initargs=(not args.quiet,)) as pool:
        return list(pool.map(fn, *zip(*calls)))


def settings(script, **values):
    """A script's settings as its command line gives them, to call it as a function: every flag's
    default (script.build_parser()), then `values` by their dest names. A name the script does not
    have is refused (a misspelt setting would otherwise be ignored)."""
    config = script.build_parser().parse_args([])
    unknown = sorted(set(values) - set(vars(config)))
    if unknown:
        raise TypeError(f"{script.__name__}.py has no settings {unknown}")
    for name, value in values.items():
        setattr(config, name, value)
    return config


DEMO_MODELS = ("base", "ar", "lavender", "oracle")  # the demo's columns


def runs_of(reports, split, kind):
    """The run reports of one model kind ("ar": "ar-s0", "ar-s1", ...) in evaluate.py's {split: report}."""
    return [r for r in reports[split]["runs"] if r["name"] == kind or r["name"].startswith(kind + "-s")]


def demo_table(reports, seeds):
    """Rows of the demo table from evaluate.py's reports {split: report}: one column per model kind."""
    def column(kind, pick, split="test-id"):
        return [pick(r) for r in runs_of(reports, split, kind)]
    acc, ent, point, mse = (MEASURES[m][1] for m in ("accuracy test-id", "own entropy test-id",
                                                     "own pointing test-id", "own MSE to DM test-id"))
    blank = [""] * (len(DEMO_MODELS) - 2)
    rows = []
    for split in ("test-id", "test-ood"):
        rows.append((f"accuracy {split}", *[mean_spread(column(k, acc, split)) for k in DEMO_MODELS]))
    for split in ("test-id", "test-ood"):
        for k in world.KINDS if len(world.KINDS) > 1 else ():
            pick = lambda r, k=k: (r["accuracy"].get(k) or {}).get("accuracy")             # noqa: E731
            rows.append((f"  {k} ({split})", *[mean_spread(column(m, pick, split)) for m in DEMO_MODELS]))
    gaps = demo_paired(reports)
    for split in ("test-id", "test-ood"):
        cells = [paired_cell(gaps[arm][split]) for arm in DEMO_MODELS[2:]]
        rows.append((f"  minus AR, paired by seed [95% t] ({split})", "", "", *cells))
    dm = reports["test-id"].get("dm") or {}
    head = lambda pick: lambda r: pick(as_run(r["head"])) if r.get("head") else None       # noqa: E731
    rows.append(("VLM's own attention: entropy (nats, test-id)", *[mean_spread(column(k, ent)) for k in DEMO_MODELS]))
    rows.append(("VLM's own attention: pointing (test-id)", *[mean_spread(column(k, point)) for k in DEMO_MODELS]))
    rows.append(("VLM's own attention: MSE to the DM map (test-id)",
                 *[mean_spread(column(k, mse)) for k in DEMO_MODELS]))
    for name, pick in (("entropy", ent), ("pointing", point), ("MSE to the DM map", mse)):
        rows.append((f"Aligner head: {name} (test-id)", "", "", *[mean_spread(column(k, head(pick)))
                                                                   for k in DEMO_MODELS[2:]]))
    rows.append(("DM maps of the same words: entropy, pointing (test-id)",
                 f"{dm['entropy']['mean']:.3f}, {dm['pointing']['accuracy']:.3f}" if dm.get("pointing") else "-",
                 "", *blank))
    return rows


def demo_paired(reports):
    """{arm: {split: paired(...)}}: each model kind after AR minus AR of the same seed, accuracy."""
    acc = MEASURES["accuracy test-id"][1]
    gaps = {}
    for arm in DEMO_MODELS[2:]:
        for split in ("test-id", "test-ood"):
            by_seed = {r["name"].rsplit("-s", 1)[1]: {arm: acc(r)} for r in runs_of(reports, split, arm)}
            for r in runs_of(reports, split, "ar"):
                by_seed.get(r["name"].rsplit("-s", 1)[1], {})["ar"] = acc(r)
            gaps.setdefault(arm, {})[split] = paired(list(by_seed.values()), arm)
    return gaps


def demo_json(reports, perception):
    """toy_report.json: the demo's figures by key, means over seeds (forks compare runs with it)."""
    mean = lambda xs: float(np.mean(xs)) if xs and None not in xs else None               # noqa: E731
    pick = {name: MEASURES[name][1] for name in MEASURES}
    dm = reports["test-id"].get("dm") or {}
    result = {"dm_pointing": (dm.get("pointing") or {}).get("accuracy"),
              "dm_entropy": (dm.get("entropy") or {}).get("mean"),
              "base_own_entropy": pick["own entropy test-id"](runs_of(reports, "test-id", "base")[0]),
              "base_accuracy": {s: pick["accuracy test-id"](runs_of(reports, s, "base")[0])
                                for s in ("test-id", "test-ood")},
              "base_accuracy_one_object": perception}
    for arm in DEMO_MODELS[1:]:
        runs = {s: runs_of(reports, s, arm) for s in ("test-id", "test-ood")}
        result[arm] = {"accuracy": {s: mean([pick["accuracy test-id"](r) for r in runs[s]]) for s in runs},
                       "accuracy_by_kind": {s: {k: mean([(r["accuracy"].get(k) or {}).get("accuracy")
                                                         for r in runs[s]]) for k in world.KINDS} for s in runs},
                       "own_pointing": mean([pick["own pointing test-id"](r) for r in runs["test-id"]]),
                       "own_entropy": mean([pick["own entropy test-id"](r) for r in runs["test-id"]]),
                       "seeds": len(runs["test-id"])}
    for arm, gaps in demo_paired(reports).items():  # minus AR of the same seed, accuracy
        result[arm]["minus_ar"] = {s: gap and {k: gap[k] for k in ("mean", "low", "high", "n")}
                                   for s, gap in gaps.items()}
    return result


def markdown_table(rows, header=("measure", "base (toy)", "AR", "Lavender", "oracle (masks, read path)")):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def prepare_world(args, world_seed, world_dir, out, stage, controls=False):
    """Draw the world of `world_seed` (cached), extract its DM maps (extract.py, --dm's)
    for every item whose answer names an object, and write the oracle's store of the same items and,
    with `controls`, the controls' (another object's mask, another item's DM map). Returns (paths
    {split: jsonl}, {split: attention dir}, with "oracle" and CONTROL_ARMS' names)."""
    stage(f"world {world_seed}: {world_dir}")
    paths = world.build_world(world_dir, world_seed, args.finetune_items)
    # extract.py resumes from complete map files, so the cache is keyed on the DM's weights, the
    # extraction settings (steps, layers) and the world (seed, splits): no stale map is ever reused
    layers = models.PRESETS[args.dm]["layers"]
    settings = [args.dm, args.inversion_steps, args.denoise_steps, args.capture_steps, layers]
    settings += [args.dit_map] if args.dit_map != "joint" else []  # the joint map's keys as before
    files = sorted(p for p in Path(args.dm_path).glob("*/*") if p.is_file())  # weights and configs
    weights = b"".join(str(p.relative_to(args.dm_path)).encode() + p.read_bytes() for p in files)
    stamp = (Path(world_dir) / "world.json").read_bytes() + str(settings).encode()
    key = hashlib.sha256(weights + stamp).hexdigest()[:10]
    attn = {split: out / "attn" / key / split for split in ("finetune", "test-id", "test-ood")}
    stage(f"extract {', '.join(attn)} ({args.threads} processes)")
    shards = max(1, args.threads)  # each split in shards, so that the processes finish together
    in_parallel(args, extract_split, [(args, paths[split], folder, shard, shards)
                                      for split, folder in attn.items() for shard in range(shards)])
    attn.update({name: out / "attn" / f"{name}-{key}" / "finetune" for name in ("oracle", *CONTROL_ARMS)})
    items = [it for it in data.read_items(paths["finetune"]) if it.get("masks")]
    world.oracle_store(items, world_dir, attn["oracle"])
    if controls:  # the protocol's arms alone read them
        world.oracle_store(world.other_object_items(items), world_dir, attn["control-object"])
        world.other_item_store(items, attn["finetune"], attn["control-map"], seed=world_seed)
    return paths, attn


def extract_split(args, data_path, folder, shard=0, shards=1):
    """extract.py's maps of every item of a split whose answer names an object (--limit: the first
    N), or of its shard-th of `shards` interleaved shares (each map is a file of its own)."""
    items = [it for it in data.read_items(data_path) if it.get("masks")][:args.limit or None][shard::shards]
    dm = models.load_dm(args.dm, path=args.dm_path)
    return extract.extract(items, dm, folder, args.inversion_steps, args.denoise_steps,
                           args.capture_steps, models.PRESETS[args.dm]["layers"], batch_size=64,
                           progress=not args.quiet, dit_map=args.dit_map)


def finetune(args, data_path, attn, run_dir, loss, seed, overrides=None):
    """One fine-tuning run (train.train) with the demo's settings (AR and Lavender differ only in
    the loss) and an arm's `overrides` (train.py settings by dest name); a finished run of the same
    settings is reused, not retrained."""
    config = settings(train, **{
        "model": "toy", "model_path": str(args.vlm_path), "data": str(data_path), "attn": str(attn),
        "out": str(run_dir), "loss": loss, "seed": seed, "max_steps": args.steps, "batch_size": args.batch_size,
        "lr": args.lr, "lam": args.lam, "aggregate": args.aggregate, "aligner": args.aligner,
        "aligner_mode": args.aligner_mode, "align_words": args.align_words, "peft": args.peft,
        "att_pooling": args.att_pooling,
        "pretrain_aligner_steps": args.pretrain_aligner_steps if loss == "lavender" else 0,
        "overwrite": True,  # a run with other settings in the same folder is replaced
        "progress": not args.quiet, **(overrides or {})})
    done = Path(run_dir) / "config.json"
    if done.exists() and (Path(run_dir) / ("adapter" if config.peft == "lora" else "model")).is_dir():
        saved = json.loads(done.read_text())
        same = all(saved.get(k) == v for k, v in vars(config).items() if k not in ("overwrite", "progress", "resume"))
        if same and saved.get("data_sha256") == file_sha256(data_path):  # the same world's items too
            return str(run_dir)
    return train.train(config)


def evaluate_runs(args, paths, attn, runs, out, stage):
    """evaluate.py on test-id and test-ood: the base model and every run; {split: report}."""
    splits = ("test-id", "test-ood")
    stage(f"evaluate {' and '.join(splits)}: base + {len(runs)} runs")
    calls = [(args, paths[split], attn[split], list(runs), out / f"eval-{split}") for split in splits]
    return dict(zip(splits, in_parallel(args, evaluate_split, calls)))


def evaluate_split(args, data_path, attn_dir, runs, out_dir):
    """evaluate.py on one split: the base model and every run; its report."""
    return evaluate.evaluate(settings(
        evaluate, model="toy", model_path=str(args.vlm_path), base=True, run=runs, data=str(data_path),
        attn=str(attn_dir), out=str(out_dir), batch_size=50, figures=3, max_new_tokens=4,
        limit=args.limit, quiet=args.quiet))


def demo(args):
    """The README's main command: the whole method on the miniature world; returns the table rows."""
    t0 = time.time()
    out = Path(args.out or ROOT / "toy_out")
    stage = lambda text: print(f"[toy {time.time() - t0:5.0f}s] {text}", flush=True)        # noqa: E731
    paths, attn = prepare_world(args, args.seed, args.world, out, stage)
    # ---- fine-tune: AR and Lavender, the same budget, data and seeds ----
    arms = (("ar", "ar", attn["finetune"]), ("lavender", "lavender", attn["finetune"]),
            ("oracle", "lavender", attn["oracle"]))
    calls = [(args, paths["finetune"], targets, out / "runs" / f"{arm}-s{seed}", loss, seed, ORACLE_ARMS.get(arm))
             for seed in args.seeds for arm, loss, targets in arms]
    stage(f"fine-tune AR, Lavender and the oracle, seeds {args.seeds}: {len(calls)} runs of {args.steps} steps "
          f"of {args.batch_size} ({args.threads} processes)")
    runs = in_parallel(args, finetune, calls)
    reports = evaluate_runs(args, paths, attn, runs, out, stage)
    stage("perception: the base model on one-object images (test-one)")
    model, processor = models.load_vlm("toy", path=args.vlm_path)[:2]
    perception = base_models.kind_accuracy(model.eval(), processor, data.read_items(paths["test-one"]))
    stage("the attention ceiling: the base model with its cross-attention steered to the asked object")
    tests = {s: data.read_items(paths[s])[:args.limit or None] for s in ("test-id", "test-ood")}
    ceiling = {s: base_models.attention_ceiling(model, processor, items) for s, items in tests.items()}
    # ---- one table, toy_report.md and toy_report.json ----
    minutes = (time.time() - t0) / 60
    rows = demo_table(reports, args.seeds) + [("base, cross-attention steered to the object: accuracy test-id, "
                                               "test-ood", f"{ceiling['test-id'][1.0]:.3f}, {ceiling['test-ood'][1.0]:.3f}", "", "", "")]
    table = markdown_table(rows)
    print("\n" + table + f"\n\nwall time {minutes:.1f} min; seeds {args.seeds}; {args.steps} steps of batch "
          f"{args.batch_size} per run; reports in {out}/eval-*/report.md")
    report = out / "toy_report.md" if args.report is None else args.report  # '': none
    if report:
        write_report(Path(report), table, reports, args, minutes, out)
        figures = dict(demo_json(reports, perception), minutes=round(minutes, 2), seeds=args.seeds,
                       attention_ceiling={s: {"as_is": c[0.0], "steered": c[1.0]} for s, c in ceiling.items()})
        Path(report).with_suffix(".json").write_text(json.dumps(figures, indent=1) + "\n")
        stage(f"wrote {report} and {Path(report).with_suffix('.json')}")
    return rows


# ---------------------------------------------------------------------------------------------
# the protocol: several worlds x several seeds, every Lavender arm paired with AR of the same world
# and seed, fixed before looking (README, toy_report.md)
# ---------------------------------------------------------------------------------------------

# Lavender arms, one train.py option each against the defaults (§8's ablations: aggregation Fig.
# 19-20, Aligner pre-training Fig. 21, layers Fig. 22, λ, word sampling §6 (5)); the toy VLM has
# cross-attention at layers 1 and 3, so "first" is [1] and "last" is [3]
ARMS = {"lavender": {}, "mean-mean": {"aggregate": "mean-mean"}, "mean-max": {"aggregate": "mean-max"},
        "max-max": {"aggregate": "max-max"}, "flow-sum": {"aggregate": "flow-sum"},
        "flow-multi": {"aggregate": "flow-multi"}, "pretrain-20": {"pretrain_aligner_steps": 20},
        "layers-first": {"layers": "first"}, "layers-last": {"layers": "last"}, "lam-1": {"lam": 1.0},
        "lam-100": {"lam": 100.0}, "root": {"match": "root"}, "label-words": {"align_words": "label"}}
DATA_SIZES = [25, 50]  # the finetune split's first N items, AR and Lavender each (§7.4, Fig. 27)
# The path the answers read (base_models.attention_ceiling: steering the last cross-attention layer
# alone to the object nearly solves the task, the first alone does not): the model's own attention
# (no parallel head, no Aligner) of the last layer, at every answer word (label words)
READ_PATH = {"aggregate": "mean-mean", "aligner": "none", "layers": "last", "align_words": "label"}
# Chosen after the protocol's first results (toy_report.md), aimed at its failing link (b): the
# model's own attention aligned directly; and on the read path
FOLLOW_UPS = {"own-direct": {"aggregate": "mean-mean", "aligner": "none"}, "lavender-read": READ_PATH}
# The oracle: Lavender runs with the world's object masks as targets (world.oracle_store) instead of
# the DM's maps, the bound of what aligning attention gives in this world: on the read path (the
# demo's), with the default settings, and on the own attention of every layer
ORACLE_ARMS = {"oracle": READ_PATH, "oracle-default": {}, "oracle-own": FOLLOW_UPS["own-direct"]}
# Controls on the read path: targets in the right format at the wrong place (another object's mask)
# or from the wrong image (another item's DM map of the same word). What they also give is not grounding
CONTROL_ARMS = {"control-object": READ_PATH, "control-map": READ_PATH}
MEASURES = {  # name: (split, how a run report gives it); the demo's table reads them too
    "accuracy test-id": ("test-id", lambda r: r["accuracy"]["all"]["accuracy"]),
    "accuracy test-ood": ("test-ood", lambda r: r["accuracy"]["all"]["accuracy"]),
    "own pointing test-id": ("test-id", lambda r: (r.get("pointing") or {}).get("accuracy")),
    "own MSE to DM test-id": ("test-id", lambda r: (r.get("alignment_mse") or {}).get("mean")),
    "own entropy test-id": ("test-id", lambda r: (r.get("vlm_entropy") or {}).get("mean")),
}


def protocol_arms(args):
    """{arm: train.py overrides}: --arms (names from ARMS and FOLLOW_UPS), or every ARMS arm and,
    with --follow-ups, the FOLLOW_UPS; "lavender" (the defaults) always, as the links read it."""
    known = {**ARMS, **FOLLOW_UPS}
    names = args.arms or [*ARMS, *(FOLLOW_UPS if args.follow_ups else [])]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--arms {' '.join(unknown)}: no such arm; choose from {', '.join(known)}")
    return {name: known[name] for name in ["lavender", *[n for n in names if n != "lavender"]]}


def protocol_runs(args, paths, attn, world_out, stage):
    """Every fine-tuning run of one world: {(arm, seed): run dir}; "ar" and the chosen arms
    (protocol_arms) at the full finetune split, "ar-nN" and "lavender-nN" on its first N items
    (--data-sizes)."""
    for n in args.data_sizes:  # the first n items: a larger split begins with a smaller one (build_split)
        lines = Path(paths["finetune"]).read_text().splitlines()[:n]
        (Path(paths["finetune"]).parent / f"finetune-{n}.jsonl").write_text("\n".join(lines) + "\n")
    arms = protocol_arms(args)
    full, store = paths["finetune"], attn["finetune"]
    jobs = [("ar", "ar", {}, full, store)] + [(a, "lavender", o, full, store) for a, o in arms.items()]
    jobs += [(a, "lavender", o, full, attn["oracle"]) for a, o in ORACLE_ARMS.items()]
    jobs += [(a, "lavender", o, full, attn[a]) for a, o in CONTROL_ARMS.items()]
    jobs += [(f"{loss}-n{n}", loss, {}, Path(full).parent / f"finetune-{n}.jsonl", store)
             for n in args.data_sizes for loss in ("ar", "lavender")]
    keys = [(arm, seed) for seed in args.seeds for arm, *_ in jobs]
    calls = [(args, data_path, targets, world_out / "runs" / f"{arm}-s{seed}", loss, seed, overrides)
             for seed in args.seeds for arm, loss, overrides, data_path, targets in jobs]
    stage(f"fine-tune {len(calls)} runs ({len(jobs)} arms x seeds {args.seeds}, {args.threads} processes)")
    return dict(zip(keys, in_parallel(args, finetune, calls)))


def as_run(head):
    """A Lavender run's Aligner-head measures (evaluate.py's report["head"]) in a run report's keys."""
    head = head or {}
    return {"accuracy": {"all": {"accuracy": None}}, "pointing": head.get("pointing"),
            "alignment_mse": head.get("alignment_mse"), "vlm_entropy": head.get("entropy")}


def protocol(args):
    """`python toy.py protocol`: every arm in every world and seed; writes <out>/protocol.json and
    prints the paired differences of each measure (arm - AR, same world and seed)."""
    t0 = time.time()
    out = Path(args.out or ROOT / "toy_out" / "protocol")
    stage = lambda text: print(f"[protocol {time.time() - t0:6.0f}s] {text}", flush=True)  # noqa: E731
    rows = []  # one per (world, seed): {"world", "seed", measure: {arm: value}}, plus the DM's
    for world_seed in args.worlds:
        world_out = out / f"world-{world_seed}"
        paths, attn = prepare_world(args, world_seed, world_out / "world", world_out, stage, controls=True)
        runs = protocol_runs(args, paths, attn, world_out, stage)
        order = list(runs)
        reports = evaluate_runs(args, paths, attn, [runs[k] for k in order], world_out, stage)
        by_run = {split: dict(zip([("base", None)] + order, reports[split]["runs"])) for split in reports}
        dm = reports["test-id"]["dm"]
        for seed in args.seeds:
            row = {"world": world_seed, "seed": seed, "dm pointing test-id": dm["pointing"]["accuracy"],
                   "dm entropy test-id": dm["entropy"]["mean"]}
            for name, (split, pick) in MEASURES.items():
                row[name] = {arm: pick(by_run[split][arm, seed]) for arm, s in order if s == seed}
                row[name]["base"] = pick(by_run[split]["base", None])
                row[name]["lavender head"] = pick(as_run(by_run[split]["lavender", seed].get("head")))
            evals = world_out / "eval-test-id"
            key = "accuracy when own map points / misses (test-id)"
            row[key] = {arm: evaluate.pointing_split(evals / Path(runs[arm, seed]).name)
                        for arm, s in order if s == seed and arm in ("ar", "lavender")}
            row[key]["base"] = evaluate.pointing_split(evals / "base")
            rows.append(row)
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "minutes": (time.time() - t0) / 60,
              "rows": rows, "paired": protocol_table(rows)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps(result, indent=1))
    (out / "protocol.md").write_text(protocol_markdown(result))
    print(protocol_markdown(result))
    stage(f"wrote {out / 'protocol.json'} and protocol.md")
    return result


def protocol_markdown(result):
    """The protocol's tables: per measure, each arm's paired difference against AR (mean [95% t
    interval], arm ahead in k of n pairs), the raw means, and the links of the paper's argument."""
    fmt = paired_cell
    mean = lambda rows, name, arm: np.mean([r[name][arm] for r in rows if r[name].get(arm) is not None])  # noqa: E731
    rows, paired_ = result["rows"], result["paired"]
    names = list(MEASURES)
    lines = [f"{len({r['world'] for r in rows})} worlds x {len({r['seed'] for r in rows})} seeds; cells: mean "
             "difference against AR of the same world and seed [95% t interval], and in how many pairs the "
             "arm's value is the higher", "",
             "| arm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for arm in paired_[names[0]]:
        lines.append(f"| {arm} | " + " | ".join(fmt(paired_[n].get(arm)) for n in names) + " |")
    lines += ["", "Means over every world and seed:", "", "| model | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    sizes = data_sizes(rows)
    for arm in ("base", "ar", "lavender", "lavender head", *[f"{k}-n{n}" for n in sizes for k in ("ar", "lavender")]):
        lines.append(f"| {arm} | " + " | ".join(f"{mean(rows, n, arm):.3f}" for n in names) + " |")
    lines += ["", f"DM maps (test-id answer words): pointing {np.mean([r['dm pointing test-id'] for r in rows]):.3f}, "
              f"entropy {np.mean([r['dm entropy test-id'] for r in rows]):.3f}", ""]
    lines += [f"- {name}: {fmt(d)}" for name, d in paired_["links"].items()]
    gain = {arm: (paired_["accuracy test-id"].get(arm) or {}).get("mean") for arm in ("oracle", "lavender-read")}
    if None not in gain.values():  # (d): Lavender on the oracle's path, against the oracle
        lines.append("- (d) Lavender on the oracle's path against the oracle, test-id minus AR: "
                     f"{gain['lavender-read']:+.3f} against {gain['oracle']:+.3f}")
    lines += ["", "Is a grounded answer a better one? Test-id accuracy on the items whose answer word's own map "
              "points at its object against the items where it misses (mean over worlds and seeds; the "
              "difference paired by world and seed, base by world):", "",
              "| model | accuracy, map points | accuracy, map misses | items pointing / missing | points - misses |",
              "|---|---|---|---|---|"]
    for model, d in paired_["grounded answers"].items():
        splits = [r["accuracy when own map points / misses (test-id)"][model] for r in rows]
        lines.append(f"| {model} | {np.mean([x[0] for x in splits if x[0] is not None]):.3f} | "
                     f"{np.mean([x[1] for x in splits if x[1] is not None]):.3f} | "
                     f"{np.mean([x[2] for x in splits]):.0f} / {np.mean([x[3] for x in splits]):.0f} | {fmt(d)} |")
    return "\n".join(lines) + "\n"


def data_sizes(rows):
    """The smaller finetune splits the protocol's rows hold ("lavender-nN" arms), in order."""
    return sorted(int(arm.rsplit("-n", 1)[1]) for arm in rows[0]["accuracy test-id"] if arm.startswith("lavender-n"))


def protocol_table(rows):
    """{measure: {arm: paired difference vs AR}}, and the links of the paper's argument."""
    table = {}
    for name in MEASURES:
        values = [r[name] for r in rows]
        arms = [a for a in values[0] if a not in ("ar", "base", "lavender head") and not a.startswith(("ar-", "lavender-n"))]
        table[name] = {arm: paired(values, arm) for arm in arms}
        table[name]["base"] = paired(values, "base")
        for n in data_sizes(rows):
            table[name][f"lavender-n{n}"] = paired(values, f"lavender-n{n}", f"ar-n{n}")
    pointing = [dict(r["own pointing test-id"], dm=r["dm pointing test-id"]) for r in rows]
    per_world = list({r["world"]: p for r, p in zip(rows, pointing)}.values())  # base and DM: one value a world
    splits = [r["accuracy when own map points / misses (test-id)"] for r in rows]
    table["grounded answers"] = {}
    for model in ("base", "ar", "lavender"):
        pairs = [{"points": sp[model][0], "misses": sp[model][1]} for sp in
                 (list({r["world"]: sp for r, sp in zip(rows, splits)}.values()) if model == "base" else splits)]
        table["grounded answers"][model] = paired(pairs, "points", "misses")
    table["links"] = {"(a) DM - base own pointing (per world)": paired(per_world, "dm", "base"),
                      "(a) DM - Lavender own pointing": paired(pointing, "dm", "lavender"),
                      "(b) Lavender - base own pointing": paired(pointing, "lavender", "base"),
                      "(b) Lavender on the read path - AR own pointing": paired(pointing, "lavender-read", "ar")}
    accuracy = [r["accuracy test-id"] for r in rows]  # the controls: is a gain grounding or regularisation?
    for arm, control in (("oracle", "control-object"), ("lavender-read", "control-map")):
        table["links"][f"(c) {arm} - {control} accuracy test-id"] = paired(accuracy, arm, control)
    return table


def write_report(path, table, reports, args, minutes, out):
    """toy_report.md with the table and the pictures (copied beside it, into toy_report/)."""
    pictures = path.parent / "toy_report"
    pictures.mkdir(parents=True, exist_ok=True)
    shown = []
    for split in ("test-id", "test-ood"):
        for fig in reports[split]["figures"][:3]:
            name = f"{split}-{Path(fig).name}"
            shutil.copy(out / f"eval-{split}" / fig, pictures / name)
            shown.append(f"![{split} {fig}](toy_report/{name})")
    def relative(v):  # paths inside the repository as the README's commands write them
        if isinstance(v, (str, Path)) and Path(v).is_absolute() and Path(v).resolve().is_relative_to(ROOT):
            return str(Path(v).resolve().relative_to(ROOT))
        return str(v) if isinstance(v, Path) else v
    recorded = {k: relative(v) for k, v in vars(args).items()}
    # hand-written notes below the marker (what was tried, by hand) survive a re-run of the demo
    marker = "<!-- notes: kept when the demo rewrites this file -->"
    notes = path.read_text().split(marker, 1)[1] if path.exists() and marker in path.read_text() else "\n"
    path.write_text(
        "# The miniature world: Lavender vs autoregressive fine-tuning\n\n"
        f"Made by `python toy.py --report {relative(path.resolve())}` ({minutes:.1f} min on this machine; finished runs of the same settings in "
        f"{relative(out)}/runs are reused, not retrained). Mean ± sample std over seeds {args.seeds}; accuracy is "
        "exact match. The VLM's own attention is read the same way for every model: its pretrained cross-attention, "
        "averaged over heads and layers (evaluate.py's mean-mean), no Aligner, min-max normalised like the DM maps; "
        "a Lavender run's Aligner head (the map its loss trains to imitate the DM's) has rows of its own. Entropy: App. B eq. 23 "
        "(uniform 32x32 = 6.93 nats); pointing: the argmax of an answer word's map inside the object it names; MSE: "
        "against the DM map of the same word. Base = the pre-trained toy VLM before fine-tuning.\n\n" + table + "\n\n"
        "Pictures (evaluate.py): entropy histograms (Fig. 7), and per item the image, the DM map and each model's "
        "map of the answer word (Fig. 8/17).\n\n" + "\n\n".join(shown) + "\n\n"
        f"Settings: `{json.dumps(recorded)}`\n\n" + marker + notes)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="demo",
                   choices=("demo", "protocol", "build", "train-sd", "train-vlm", "measure-sd"),
                   help="demo (default): the whole method end to end; build: draw the world only; "
                        "protocol: every arm over --worlds x --seeds, paired against AR; "
                        "train-sd, train-vlm: retrain the base models; measure-sd: pointing")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and of the base models' training")
    p.add_argument("--world", default=str(ROOT / "toy_out" / "world"), help="where the world is drawn (a cache)")
    p.add_argument("--out", default=None, help="output (demo: toy_out; train-sd: toy_models/DM; "
                                               "train-vlm: toy_models/toy-vlm; measure-sd: toy_out/measure-sd)")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU cores: the demo and the protocol run their extractions, fine-tuning runs and "
                        "evaluations on this many processes of one thread each (1: in this process); "
                        "train-sd, train-vlm and measure-sd use this many torch threads")
    # ---- base models ----
    p.add_argument("--dm", default="toy-sd", choices=("toy-sd", *toy_teachers.SIZES),
                   help="the teacher: toy-sd, or toy_teachers.py's toy-sd21, toy-sdxl, toy-sd3")
    p.add_argument("--dm-path", default=None, help="its folder (default toy_models/<--dm>)")
    p.add_argument("--vlm-path", default=str(TOY_MODELS / "toy-vlm"), help="toy VLM folder (save_pretrained)")
    p.add_argument("--base-steps", type=int, default=None, help="train-sd / train-vlm: training steps (1500 / 1000)")
    p.add_argument("--init-from", default=None, help="train-sd (toy-sd): continue from this folder")
    p.add_argument("--sd-lr", type=float, default=1e-3, help="train-sd: peak learning rate (warm-up + cosine)")
    p.add_argument("--save-every", type=int, default=300, help="train-sd (toy-sd): step<N>/ each N")
    p.add_argument("--localise", type=float, default=toy_teachers.LOCALISE,
                   help="train-sd: the localisation loss's weight (0: taught by denoising alone)")
    # ---- extraction (extract.py) ----
    p.add_argument("--inversion-steps", type=int, default=5, help="DDIM inversion steps (extract.py)")
    p.add_argument("--denoise-steps", type=int, default=5, help="denoising steps after the inversion (extract.py)")
    p.add_argument("--capture-steps", default="denoise", choices=("denoise", "inversion", "all"),
                   help="steps whose cross-attention is averaged (extract.py)")
    p.add_argument("--dit-map", default="joint", choices=mmdit.DIT_MAPS,
                   help="toy-sd3's map: its joint attention or the output space (extract.py)")
    # ---- fine-tuning (train.py): the same for AR and Lavender ----
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds (each runs AR and Lavender)")
    p.add_argument("--worlds", type=int, nargs="+", default=[0, 1, 2], help="protocol: the world seeds")
    p.add_argument("--follow-ups", action=argparse.BooleanOptionalAction, default=False,
                   help="protocol: also the FOLLOW_UPS arms (chosen after the first results, reported as such)")
    p.add_argument("--arms", nargs="+", default=None,
                   help="protocol: only these arms of ARMS and FOLLOW_UPS (AR, the default Lavender, "
                        "ORACLE_ARMS and CONTROL_ARMS always run)")
    p.add_argument("--data-sizes", type=int, nargs="*", default=DATA_SIZES,
                   help="protocol: smaller finetune splits, AR and Lavender each (none: --data-sizes alone)")
    p.add_argument("--finetune-items", type=int, default=None,
                   help="the finetune split's size (default 100; another size: another --world)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per fine-tuning run")
    p.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    p.add_argument("--peft", default="lora", choices=("lora", "full"), help="LoRA (paper) or full fine-tuning")
    p.add_argument("--lam", type=float, default=10.0, help="λ of eq. 10")
    p.add_argument("--aggregate", default="learn", help="train.py --aggregate (learn, mean-mean, ...)")
    p.add_argument("--aligner", default="sim", help="train.py --aligner (sim, light, deep, mlp, none)")
    p.add_argument("--aligner-mode", default="auto", help="train.py --aligner-mode (auto, per-layer, after)")
    p.add_argument("--align-words", default="predicted", help="train.py --align-words (predicted, label)")
    p.add_argument("--att-pooling", default="words", choices=("words", "samples"), help="train.py's")
    p.add_argument("--pretrain-aligner-steps", type=int, default=0, help="Lavender runs: Aligner pre-training steps")
    # ---- demo output ----
    p.add_argument("--limit", type=int, default=0, help="extract and evaluate only the first N items of each split (quick test; 0: all)")
    p.add_argument("--report", default=None, help="where the demo writes its report and pictures (default "
                   "<out>/toy_report.md; toy_report.md refreshes the shipped one and toy_report/; '' for none)")
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False, help="no progress bars")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.dm_path = args.dm_path or models.preset_path(args.dm)
    extract.check_dit_map(args.dit_map, args.dm, models.PRESETS[args.dm].get("family") == "mmdit")
    data.library_bars(not args.quiet)
    torch.set_num_threads(args.threads)
    if args.command == "build":
        paths = world.build_world(args.world, args.seed)
        print(f"world: {', '.join(f'{k}={v}' for k, v in paths.items())}")
    elif args.command == "train-sd" and args.dm != "toy-sd":
        out, steps = args.out or TOY_MODELS / args.dm, args.base_steps or 1500
        toy_teachers.train(args.dm, out, args.world, args.seed, steps, args.sd_lr, args.init_from,
                           localise=args.localise)
    elif args.command == "train-sd":
        toy_teachers.train_sd(args.out or TOY_MODELS / "toy-sd", args.world, seed=args.seed, steps=args.base_steps or 1500,
                 lr=args.sd_lr, save_every=args.save_every, init_from=args.init_from,
                 localise=args.localise)
    elif args.command == "train-vlm":
        base_models.train_vlm(args.out or TOY_MODELS / "toy-vlm", args.world, seed=args.seed, steps=args.base_steps or 1000)
    elif args.command == "measure-sd":
        out = args.out or ROOT / "toy_out" / "measure-sd"
        result = base_models.measure_sd(args.dm_path, args.world, out, seed=args.seed, name=args.dm,
                            inversion_steps=args.inversion_steps, denoise_steps=args.denoise_steps,
                            capture_steps=args.capture_steps, dit_map=args.dit_map)
        print(f"{args.dm} pointing: {json.dumps(result)}")
    elif args.command == "protocol":
        return protocol(args)
    else:
        return demo(args)


if __name__ == "__main__":
    main()
