"""The miniature world's fixed protocol: arms, runs, paired differences, its report (not in the
paper; its arms are §8's ablations and §7.4's data sizes, run in the miniature world).

The protocol is fixed before looking (README, toy_report.md): the Lavender arms of ARMS, one
train.py option each against the defaults, the FOLLOW_UPS (chosen after the first results and
reported as such), the oracle (the world's object masks as targets), the controls (targets at the
wrong place or from the wrong image) and AR and Lavender on smaller finetune splits. protocol()
runs every arm over several worlds and seeds, protocol_table() pairs each with AR of the same world
and seed (mean difference, 95% t interval, wins) and adds the links of the paper's argument,
protocol_markdown() writes its tables. The stages it shares with toy.py's demo come first: a
world's DM maps (prepare_world), one fine-tuning run (finetune) and the evaluation of the runs
(evaluate_runs), each through the real extract.py, train.py and evaluate.py.

    python toy.py protocol --worlds 26 27 28 --follow-ups   # -> toy_out/protocol/protocol.md
"""
import hashlib
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

import data
import evaluate
import extract
import models
import train
import world
from metrics import paired, paired_cell
from runs import file_sha256

ROOT = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------
# the stages the demo and the protocol share: a world's maps, a fine-tuning run, the evaluation
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
    # a fresh interpreter: no forked torch state
    context = multiprocessing.get_context("spawn")
    workers = min(args.threads, len(calls))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread_worker,
                             initargs=(not args.quiet,)) as pool:
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


def prepare_world(args, world_seed, world_dir, out, stage, controls=False):
    """Draw the world of `world_seed` (cached), extract its DM maps (extract.py, --dm's) for every
    item whose answer names an object, and write the oracle's store of the same items and, with
    `controls`, the controls' (another object's mask, another item's DM map). Returns (paths
    {split: jsonl}, {split: attention dir}, with "oracle" and CONTROL_ARMS' names)."""
    stage(f"world {world_seed}: {world_dir}")
    paths = world.build_world(world_dir, world_seed, args.finetune_items)
    key = extraction_key(args, world_dir)
    attn = {split: out / "attn" / key / split for split in ("finetune", "test-id", "test-ood")}
    stage(f"extract {', '.join(attn)} ({args.threads} processes)")
    # each split in shards, so that the processes finish together
    shards = max(1, args.threads)
    calls = [(args, paths[split], folder, shard, shards)
             for split, folder in attn.items() for shard in range(shards)]
    in_parallel(args, extract_split, calls)
    targets = ("oracle", *CONTROL_ARMS)
    attn.update({name: out / "attn" / f"{name}-{key}" / "finetune" for name in targets})
    items = [it for it in data.read_items(paths["finetune"]) if it.get("masks")]
    world.oracle_store(items, world_dir, attn["oracle"])
    # the protocol's arms alone read the controls
    if controls:
        world.oracle_store(world.other_object_items(items), world_dir, attn["control-object"])
        world.other_item_store(items, attn["finetune"], attn["control-map"], seed=world_seed)
    return paths, attn


def extraction_key(args, world_dir):
    """The extraction cache's key (10 hex digits): extract.py resumes from complete map files, so
    the key covers the DM's weights and configs, the extraction settings (steps, layers) and the
    world (seed, splits): no stale map is ever reused."""
    layers = models.PRESETS[args.dm]["layers"]
    extraction = [args.dm, args.inversion_steps, args.denoise_steps, args.capture_steps, layers]
    # the joint map (the default) adds no setting: its key is the key without --dit-map
    extraction += [args.dit_map] if args.dit_map != "joint" else []
    # weights and configs
    files = sorted(p for p in Path(args.dm_path).glob("*/*") if p.is_file())
    weights = b"".join(str(p.relative_to(args.dm_path)).encode() + p.read_bytes() for p in files)
    stamp = (Path(world_dir) / "world.json").read_bytes() + str(extraction).encode()
    return hashlib.sha256(weights + stamp).hexdigest()[:10]


def extract_split(args, data_path, folder, shard=0, shards=1):
    """extract.py's maps of every item of a split whose answer names an object (--limit: the first
    N), or of its shard-th of `shards` interleaved shares (each map is a file of its own)."""
    items = [it for it in data.read_items(data_path) if it.get("masks")]
    items = items[:args.limit or None][shard::shards]
    dm = models.load_dm(args.dm, path=args.dm_path)
    layers = models.PRESETS[args.dm]["layers"]
    return extract.extract(items, dm, folder, args.inversion_steps, args.denoise_steps,
                           args.capture_steps, layers, batch_size=64,
                           progress=not args.quiet, dit_map=args.dit_map)


def finetune(args, data_path, attn, run_dir, loss, seed, overrides=None):
    """One fine-tuning run (train.train) with the demo's settings (AR and Lavender differ only in
    the loss) and an arm's `overrides` (train.py settings by dest name); a finished run of the same
    settings is reused, not retrained."""
    pretrain_steps = args.pretrain_aligner_steps if loss == "lavender" else 0
    config = settings(train, **{
        "model": "toy", "model_path": str(args.vlm_path), "data": str(data_path),
        "attn": str(attn), "out": str(run_dir), "loss": loss, "seed": seed,
        "max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "lam": args.lam,
        "aggregate": args.aggregate, "aligner": args.aligner, "aligner_mode": args.aligner_mode,
        "align_words": args.align_words, "peft": args.peft, "att_pooling": args.att_pooling,
        "pretrain_aligner_steps": pretrain_steps,
        # a run with other settings in the same folder is replaced
        "overwrite": True,
        "progress": not args.quiet, **(overrides or {})})
    done = Path(run_dir) / "config.json"
    saved_model = Path(run_dir) / ("adapter" if config.peft == "lora" else "model")
    if done.exists() and saved_model.is_dir():
        saved = json.loads(done.read_text())
        ignored = ("overwrite", "progress", "resume")
        same = all(saved.get(k) == v for k, v in vars(config).items() if k not in ignored)
        # the same world's items too
        if same and saved.get("data_sha256") == file_sha256(data_path):
            return str(run_dir)
    return train.train(config)


def evaluate_runs(args, paths, attn, runs, out, stage):
    """evaluate.py on test-id and test-ood: the base model and every run; {split: report}."""
    splits = ("test-id", "test-ood")
    stage(f"evaluate {' and '.join(splits)}: base + {len(runs)} runs")
    calls = [(args, paths[split], attn[split], list(runs), out / f"eval-{split}")
             for split in splits]
    return dict(zip(splits, in_parallel(args, evaluate_split, calls)))


def evaluate_split(args, data_path, attn_dir, runs, out_dir):
    """evaluate.py on one split: the base model and every run; its report."""
    config = settings(
        evaluate, model="toy", model_path=str(args.vlm_path), base=True, run=runs,
        data=str(data_path), attn=str(attn_dir), out=str(out_dir), batch_size=50, figures=3,
        max_new_tokens=4, limit=args.limit, quiet=args.quiet)
    return evaluate.evaluate(config)


# ---------------------------------------------------------------------------------------------
# the protocol: several worlds x several seeds, every Lavender arm paired with AR of the same world
# and seed, fixed before looking (README, toy_report.md)
# ---------------------------------------------------------------------------------------------

# Lavender arms, one train.py option each against the defaults (§8's ablations: aggregation Fig.
# 19-20, Aligner pre-training Fig. 21, layers Fig. 22, λ, word sampling §6 (5)); the toy VLM has
# cross-attention at layers 1 and 3, so "first" is [1] and "last" is [3]
ARMS = {
    "lavender": {},
    "mean-mean": {"aggregate": "mean-mean"},
    "mean-max": {"aggregate": "mean-max"},
    "max-max": {"aggregate": "max-max"},
    "flow-sum": {"aggregate": "flow-sum"},
    "flow-multi": {"aggregate": "flow-multi"},
    "pretrain-20": {"pretrain_aligner_steps": 20},
    "layers-first": {"layers": "first"},
    "layers-last": {"layers": "last"},
    "lam-1": {"lam": 1.0},
    "lam-100": {"lam": 100.0},
    "root": {"match": "root"},
    "label-words": {"align_words": "label"},
}
# the finetune split's first N items, AR and Lavender each (§7.4, Fig. 27)
DATA_SIZES = [25, 50]
# The path the answers read (base_models.attention_ceiling: steering the last cross-attention layer
# alone to the object nearly solves the task, the first alone does not): the model's own attention
# (no parallel head, no Aligner) of the last layer, at every answer word (label words)
READ_PATH = {"aggregate": "mean-mean", "aligner": "none", "layers": "last", "align_words": "label"}
# Chosen after the protocol's first results (toy_report.md), aimed at its failing link (b): the
# model's own attention aligned directly; and on the read path
FOLLOW_UPS = {"own-direct": {"aggregate": "mean-mean", "aligner": "none"},
              "lavender-read": READ_PATH}
# The oracle: Lavender runs with the world's object masks as targets (world.oracle_store) instead of
# the DM's maps, the bound of what aligning attention gives in this world: on the read path (the
# demo's), with the default settings, and on the own attention of every layer
ORACLE_ARMS = {"oracle": READ_PATH, "oracle-default": {}, "oracle-own": FOLLOW_UPS["own-direct"]}
# Controls on the read path: targets in the right format at the wrong place (another object's
# mask) or from the wrong image (another item's DM map of the same word). What they also give is
# not grounding
CONTROL_ARMS = {"control-object": READ_PATH, "control-map": READ_PATH}
# name: (split, how a run report gives it); the demo's table reads them too
MEASURES = {
    "accuracy test-id": ("test-id", lambda r: r["accuracy"]["all"]["accuracy"]),
    "accuracy test-ood": ("test-ood", lambda r: r["accuracy"]["all"]["accuracy"]),
    "own pointing test-id": ("test-id", lambda r: (r.get("pointing") or {}).get("accuracy")),
    "own MSE to DM test-id": ("test-id", lambda r: (r.get("alignment_mse") or {}).get("mean")),
    "own entropy test-id": ("test-id", lambda r: (r.get("vlm_entropy") or {}).get("mean")),
}
GROUNDED = "accuracy when own map points / misses (test-id)"  # a row's key


def protocol_arms(args):
    """{arm: train.py overrides}: --arms (names from ARMS and FOLLOW_UPS), or every ARMS arm and,
    with --follow-ups, the FOLLOW_UPS; "lavender" (the defaults) always, as the links read it."""
    known = {**ARMS, **FOLLOW_UPS}
    names = args.arms or [*ARMS, *(FOLLOW_UPS if args.follow_ups else [])]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--arms {' '.join(unknown)}: no such arm; "
                         f"choose from {', '.join(known)}")
    return {name: known[name] for name in ["lavender", *[n for n in names if n != "lavender"]]}


def protocol_runs(args, paths, attn, world_out, stage):
    """Every fine-tuning run of one world: {(arm, seed): run dir}; "ar" and the chosen arms
    (protocol_arms) at the full finetune split, "ar-nN" and "lavender-nN" on its first N items
    (--data-sizes)."""
    full, store = paths["finetune"], attn["finetune"]
    # the first n items: a larger split begins with a smaller one (world.build_split)
    for n in args.data_sizes:
        lines = Path(full).read_text().splitlines()[:n]
        (Path(full).parent / f"finetune-{n}.jsonl").write_text("\n".join(lines) + "\n")
    arms = protocol_arms(args)
    # (arm, loss, train.py overrides, data, attention targets)
    jobs = [("ar", "ar", {}, full, store)]
    jobs += [(a, "lavender", o, full, store) for a, o in arms.items()]
    jobs += [(a, "lavender", o, full, attn["oracle"]) for a, o in ORACLE_ARMS.items()]
    jobs += [(a, "lavender", o, full, attn[a]) for a, o in CONTROL_ARMS.items()]
    jobs += [(f"{loss}-n{n}", loss, {}, Path(full).parent / f"finetune-{n}.jsonl", store)
             for n in args.data_sizes for loss in ("ar", "lavender")]
    keys, calls = [], []
    for seed in args.seeds:
        for arm, loss, overrides, data_path, targets in jobs:
            run_dir = world_out / "runs" / f"{arm}-s{seed}"
            keys.append((arm, seed))
            calls.append((args, data_path, targets, run_dir, loss, seed, overrides))
    stage(f"fine-tune {len(calls)} runs ({len(jobs)} arms x seeds {args.seeds}, "
          f"{args.threads} processes)")
    return dict(zip(keys, in_parallel(args, finetune, calls)))


def as_run(head):
    """A Lavender run's Aligner-head measures (evaluate.py's report["head"]) in a run report's
    keys."""
    head = head or {}
    return {"accuracy": {"all": {"accuracy": None}}, "pointing": head.get("pointing"),
            "alignment_mse": head.get("alignment_mse"), "vlm_entropy": head.get("entropy")}


def protocol(args):
    """`python toy.py protocol`: every arm in every world and seed; writes <out>/protocol.json and
    prints the paired differences of each measure (arm - AR, same world and seed)."""
    t0 = time.time()
    out = Path(args.out or ROOT / "toy_out" / "protocol")

    def stage(text):
        print(f"[protocol {time.time() - t0:6.0f}s] {text}", flush=True)

    # one per (world, seed): {"world", "seed", measure: {arm: value}}, plus the DM's
    rows = []
    for world_seed in args.worlds:
        rows += world_rows(args, world_seed, out / f"world-{world_seed}", stage)
    recorded = {k: str(v) for k, v in vars(args).items()}
    minutes = (time.time() - t0) / 60
    result = {"settings": recorded, "minutes": minutes, "rows": rows,
              "paired": protocol_table(rows)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps(result, indent=1))
    (out / "protocol.md").write_text(protocol_markdown(result))
    print(protocol_markdown(result))
    stage(f"wrote {out / 'protocol.json'} and protocol.md")
    return result


def world_rows(args, world_seed, world_out, stage):
    """The protocol's rows of one world, one per seed (seed_row): its world and maps
    (prepare_world), its runs (protocol_runs) and their evaluation on test-id and test-ood."""
    world_dir = world_out / "world"
    paths, attn = prepare_world(args, world_seed, world_dir, world_out, stage, controls=True)
    runs = protocol_runs(args, paths, attn, world_out, stage)
    order = list(runs)
    reports = evaluate_runs(args, paths, attn, [runs[k] for k in order], world_out, stage)
    # {split: {(arm, seed): run report}}; the base model's is ("base", None)
    keys = [("base", None)] + order
    by_run = {split: dict(zip(keys, reports[split]["runs"])) for split in reports}
    dm = reports["test-id"]["dm"]
    evals = world_out / "eval-test-id"
    return [seed_row(world_seed, seed, dm, by_run, runs, evals) for seed in args.seeds]


def seed_row(world_seed, seed, dm, by_run, runs, evals):
    """The protocol's row of one world and seed: the DM's pointing and entropy, each MEASURES
    entry by arm (with the base model and the Lavender run's Aligner head), and AR's, Lavender's
    and the base model's accuracy where the own map points and where it misses
    (evaluate.pointing_split of their evaluation folders under `evals`)."""
    row = {"world": world_seed, "seed": seed, "dm pointing test-id": dm["pointing"]["accuracy"],
           "dm entropy test-id": dm["entropy"]["mean"]}
    arms = [arm for arm, s in runs if s == seed]
    for name, (split, pick) in MEASURES.items():
        row[name] = {arm: pick(by_run[split][arm, seed]) for arm in arms}
        row[name]["base"] = pick(by_run[split]["base", None])
        head = by_run[split]["lavender", seed].get("head")
        row[name]["lavender head"] = pick(as_run(head))
    row[GROUNDED] = {arm: evaluate.pointing_split(evals / Path(runs[arm, seed]).name)
                     for arm in arms if arm in ("ar", "lavender")}
    row[GROUNDED]["base"] = evaluate.pointing_split(evals / "base")
    return row


# ---------------------------------------------------------------------------------------------
# paired differences and the report
# ---------------------------------------------------------------------------------------------

def data_sizes(rows):
    """The smaller finetune splits the protocol's rows hold ("lavender-nN" arms), in order."""
    arms = rows[0]["accuracy test-id"]
    return sorted(int(arm.rsplit("-n", 1)[1]) for arm in arms if arm.startswith("lavender-n"))


def protocol_table(rows):
    """{measure: {arm: paired difference vs AR}}, and the links of the paper's argument."""
    table = {}
    for name in MEASURES:
        values = [r[name] for r in rows]
        # every arm against AR, the smaller splits' Lavender against AR of the same split (below)
        arms = [a for a in values[0] if a not in ("ar", "base", "lavender head")
                and not a.startswith(("ar-", "lavender-n"))]
        table[name] = {arm: paired(values, arm) for arm in arms}
        table[name]["base"] = paired(values, "base")
        for n in data_sizes(rows):
            table[name][f"lavender-n{n}"] = paired(values, f"lavender-n{n}", f"ar-n{n}")
    table["grounded answers"] = grounded_answers(rows)
    table["links"] = protocol_links(rows)
    return table


def grounded_answers(rows):
    """{model: paired difference}: test-id accuracy on the items whose answer word's own map points
    at its object minus on those where it misses, for base (paired by world: one value a world),
    AR and Lavender (paired by world and seed)."""
    splits = [r[GROUNDED] for r in rows]
    per_world = list({r["world"]: sp for r, sp in zip(rows, splits)}.values())
    grounded = {}
    for model in ("base", "ar", "lavender"):
        pairs = [{"points": sp[model][0], "misses": sp[model][1]}
                 for sp in (per_world if model == "base" else splits)]
        grounded[model] = paired(pairs, "points", "misses")
    return grounded


def protocol_links(rows):
    """The links of the paper's argument, each a paired difference: (a) the DM's maps against the
    VLM's own attention (pointing), (b) Lavender's own attention against base's and AR's, (c) the
    oracle and Lavender on the read path against their controls (accuracy: grounding or
    regularisation?)."""
    pointing = [dict(r["own pointing test-id"], dm=r["dm pointing test-id"]) for r in rows]
    # base and DM: one value a world
    per_world = list({r["world"]: p for r, p in zip(rows, pointing)}.values())
    links = {
        "(a) DM - base own pointing (per world)": paired(per_world, "dm", "base"),
        "(a) DM - Lavender own pointing": paired(pointing, "dm", "lavender"),
        "(b) Lavender - base own pointing": paired(pointing, "lavender", "base"),
        "(b) Lavender on the read path - AR own pointing": paired(pointing, "lavender-read", "ar"),
    }
    # the controls: is a gain grounding or regularisation?
    accuracy = [r["accuracy test-id"] for r in rows]
    for arm, control in (("oracle", "control-object"), ("lavender-read", "control-map")):
        links[f"(c) {arm} - {control} accuracy test-id"] = paired(accuracy, arm, control)
    return links


def protocol_markdown(result):
    """The protocol's tables: per measure, each arm's paired difference against AR (mean [95% t
    interval], arm ahead in k of n pairs), the raw means, and the links of the paper's argument."""
    rows, paired_ = result["rows"], result["paired"]
    lines = markdown_paired(rows, paired_)
    lines += markdown_means(rows)
    lines += markdown_links(paired_)
    lines += markdown_grounded(rows, paired_)
    return "\n".join(lines) + "\n"


def markdown_paired(rows, paired_):
    """The paired differences' table: one row per arm, one column per measure."""
    names = list(MEASURES)
    worlds = len({r["world"] for r in rows})
    seeds = len({r["seed"] for r in rows})
    lines = [f"{worlds} worlds x {seeds} seeds; cells: mean difference against AR of the same "
             "world and seed [95% t interval], and in how many pairs the arm's value is the higher",
             "", "| arm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for arm in paired_[names[0]]:
        cells = [paired_cell(paired_[n].get(arm)) for n in names]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def arm_mean(rows, name, arm):
    """The mean of one measure of one arm over the rows that have a value for it."""
    return np.mean([r[name][arm] for r in rows if r[name].get(arm) is not None])


def markdown_means(rows):
    """The raw means over every world and seed (base, AR, Lavender, its head, the smaller splits)
    and the DM maps' pointing and entropy."""
    names = list(MEASURES)
    lines = ["", "Means over every world and seed:", "", "| model | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    smaller = [f"{k}-n{n}" for n in data_sizes(rows) for k in ("ar", "lavender")]
    for arm in ("base", "ar", "lavender", "lavender head", *smaller):
        cells = [f"{arm_mean(rows, n, arm):.3f}" for n in names]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    dm_pointing = np.mean([r["dm pointing test-id"] for r in rows])
    dm_entropy = np.mean([r["dm entropy test-id"] for r in rows])
    lines += ["", f"DM maps (test-id answer words): pointing {dm_pointing:.3f}, "
              f"entropy {dm_entropy:.3f}", ""]
    return lines


def markdown_links(paired_):
    """The links (a)-(c), and (d): Lavender on the oracle's path against the oracle."""
    lines = [f"- {name}: {paired_cell(d)}" for name, d in paired_["links"].items()]
    accuracy = paired_["accuracy test-id"]
    gain = {arm: (accuracy.get(arm) or {}).get("mean") for arm in ("oracle", "lavender-read")}
    if None not in gain.values():
        lines.append("- (d) Lavender on the oracle's path against the oracle, test-id minus AR: "
                     f"{gain['lavender-read']:+.3f} against {gain['oracle']:+.3f}")
    return lines


def markdown_grounded(rows, paired_):
    """Is a grounded answer a better one: accuracy where the own map points and where it misses."""
    lines = ["", "Is a grounded answer a better one? Test-id accuracy on the items whose answer "
             "word's own map points at its object against the items where it misses (mean over "
             "worlds and seeds; the difference paired by world and seed, base by world):", "",
             "| model | accuracy, map points | accuracy, map misses | items pointing / missing "
             "| points - misses |", "|---|---|---|---|---|"]
    for model, d in paired_["grounded answers"].items():
        # (accuracy where it points, where it misses, items pointing, items missing) a row
        splits = [r[GROUNDED][model] for r in rows]
        points = np.mean([x[0] for x in splits if x[0] is not None])
        misses = np.mean([x[1] for x in splits if x[1] is not None])
        n_points = np.mean([x[2] for x in splits])
        n_misses = np.mean([x[3] for x in splits])
        lines.append(f"| {model} | {points:.3f} | {misses:.3f} | "
                     f"{n_points:.0f} / {n_misses:.0f} | {paired_cell(d)} |")
    return lines
