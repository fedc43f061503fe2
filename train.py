"""Lavender fine-tuning: the torchrun + FSDP2 training loop (paper §5, §6, §8.1.1, §9).

One script runs both methods the paper compares, so every comparison is one flag apart:
  --loss ar        autoregressive fine-tuning: L_VLM, the next-token loss on the answer (eq. 6)
  --loss lavender  L_total = L_VLM + λ·L_att (eq. 10/12), L_att the MSE between the VLM's per-word
                   text-to-image attention (aggregate.py, through the Aligner of aligner.py) and
                   Stable Diffusion's per-word maps read from the attention store (extract.py), eq. 9/17.
What else is here, from the paper: LoRA or full fine-tuning (§6 (4), §8.1.1), Aligner pre-training
with the VLM frozen (§6 (1), Fig. 21), exact/root word sampling (§6 (5)), aligned layer subsets
(Fig. 22), learned aggregation with parallel projections (eq. 15-16), FSDP for Llama-3.2 (§5 (4)).

Distributed set-up, in the order it happens (see shard()): torchrun env -> process group (nccl on
GPU, gloo on CPU) -> explicit 1-D device mesh -> load model -> PEFT LoRA -> parallel projections ->
attention capture -> activation checkpointing -> fully_shard every decoder/encoder layer, then the
root -> optimizer. Plain `python train.py` is one rank with no process group and no sharding.
Batches (chat template, answer-only labels, data order) come from data.py.

Before step 1 every item is checked (data.check_item); checkpoints are written new, renamed,
then the old one deleted; --resume refuses a changed experiment; SIGTERM/SIGINT save at the next
step boundary. README, "The run folder, resume and pre-emption", says what a run folder holds.

    torchrun --nproc_per_node 8 train.py --model llama32   # reads data/train.jsonl, data/attn/
    python train.py --model tiny --data data.jsonl --attn attn/ --out runs/lav --max-steps 10
    python bench.py train      # CPU: Lavender step vs autoregressive step, time and peak memory
"""
import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm
from transformers import (MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil,
                          MllamaProcessor, PreTrainedTokenizerFast)

import aggregate
import aligner as aligner_lib
import extract
from data import (check_item, collate, duplicate_ids, epoch_order, micro_batches,  # collate: public API
                  model_inputs, read_dm_maps)


# ---- model presets: --model NAME picks one; --model-path points at a local copy ----

# Special tokens of Llama-3.2-Vision that the chat template and the processor rely on.
LLAMA_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|image|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"]

# A chat template with the same shape as Llama-3.2-Vision-Instruct's (no system prompt):
# <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>{question}<|eot_id|>
# <|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

# Text the tiny byte-level BPE is trained on: small enough that common words are one token and
# rarer ones split into pieces ("red" -> "re" "d"), as Llama's tokenizer splits rare words.
TINY_CORPUS = [
    "a red circle left of a blue square", "what colour is the circle?", "what shape is red?",
    "how many objects are there?", "is there a green triangle?", "yes", "no", "two", "three",
    "the photograph shows two dogs playing on the grass", "describe the image in one sentence.",
    "a man riding a horse on a beach", "user", "assistant",
]

VLM_PRESETS = {
    # name: hub id (None: built here), what it is
    "llama32": {"hub_id": "meta-llama/Llama-3.2-11B-Vision-Instruct",
                "about": "Llama-3.2-11B-Vision-Instruct: 40 text layers, cross-attention at 3, 8, ..., 38"},
    "tiny": {"hub_id": None, "about": "the llama32 classes from a tiny config, random weights (tests)"},
    "toy": {"hub_id": None, "about": "a tiny Mllama pre-trained by toy.py on the miniature world",
            "default_path": "toy_models/toy-vlm"},
}


def tiny_tokenizer(corpus=TINY_CORPUS, vocab_size=300):
    """A byte-level BPE tokenizer (as Llama 3's) with Llama-3.2-Vision's special tokens, trained in
    memory on `corpus` (the tiny preset's by default; toy.py passes the world's words)."""
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>")


def tiny_vlm(seed=0, tile_size=56, max_tiles=4):
    """(model, processor): Mllama classes at toy size, random weights, nothing downloaded.

    Text: hidden 64, 5 layers, cross-attention at layers 1 and 3, 4 heads (2 KV heads).
    Vision: hidden 32, 56 px tiles of 14 px patches (4x4 patches + CLS = 17 tokens a tile), up to 4 tiles.
    """
    tokenizer = tiny_tokenizer()
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessorPil(size={"height": tile_size, "width": tile_size}, max_image_tiles=max_tiles),
        tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE)
    config = MllamaConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                           intermediate_size=64, vision_output_dim=32 * 3, image_size=tile_size, patch_size=14,
                           max_num_tiles=max_tiles, intermediate_layers_indices=[0, 1]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, cross_attention_layers=[1, 3],
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, max_position_embeddings=1024),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"))
    torch.manual_seed(seed)
    return MllamaForConditionalGeneration(config), processor


def load_vlm(name, path=None, dtype=torch.float32):
    """(model, processor) for a preset name; `path` is a local copy (a save_pretrained folder)."""
    if name not in VLM_PRESETS:
        raise SystemExit(f"unknown --model {name!r}; choose one of {sorted(VLM_PRESETS)}")
    if name == "tiny" and path is None:
        model, processor = tiny_vlm()
        return model.to(dtype), processor
    default = VLM_PRESETS[name].get("default_path")
    source = path or (str(Path(__file__).resolve().parent / default) if default else VLM_PRESETS[name]["hub_id"])
    if VLM_PRESETS[name]["hub_id"] is None and not Path(source).is_dir():
        raise SystemExit(f"--model {name}: no model folder at {source!r}; for 'toy' run `python toy.py` first "
                         f"(it writes toy_models/toy-vlm), or pass --model-path DIR (a save_pretrained folder)")
    try:
        processor = MllamaProcessor.from_pretrained(source)
        model = MllamaForConditionalGeneration.from_pretrained(source, dtype=dtype)
    except OSError as err:
        raise SystemExit(
            f"could not load --model {name} from {source!r}: {err}\n"
            f"Download {VLM_PRESETS[name]['hub_id'] or 'the weights'} on a machine with network access "
            f"(e.g. `hf download {VLM_PRESETS[name]['hub_id']} --local-dir DIR`) and pass --model-path DIR.") from None
    return model, processor


# ---- distributed set-up: plain and visible (nanoGPT style) ----

def setup_distributed(timeout_minutes=10):
    """(rank, world, device, mesh). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is rank 0
    of 1 with no process group at all (FSDP over one rank shards nothing, and the toy demo runs
    many small trainings on 2 CPU cores: no group, no collectives, no overhead).
    timeout_minutes: how long a collective waits for a stalled rank before the job fails (gloo's
    own default is 30 minutes, NCCL's 10)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))  # 1-D: pure data parallel
    return rank, world, device, mesh


def all_reduce_sum(values, world):
    """Sum a list of floats over ranks (every rank must call it)."""
    on_gpu = world > 1 and dist.get_backend() == "nccl"  # nccl reduces GPU tensors only
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if on_gpu else "cpu")
    if world > 1:
        dist.all_reduce(t)
    return t.cpu().tolist()


def gather_objects(values, world):
    """Concatenate a list from every rank (every rank must call it)."""
    parts = [values] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def barrier(world):
    if world > 1:
        dist.barrier()


def any_rank(value, world):
    """The largest of a number over ranks (every rank must call it): e.g. a signal seen by one rank."""
    on_gpu = world > 1 and dist.get_backend() == "nccl"
    t = torch.tensor([float(value)], device="cuda" if on_gpu else "cpu")
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def shard(model, aligner, mesh, device):
    """FSDP2: every `_no_split_modules` layer (vision encoder layer, self-attention and cross-attention
    decoder layer) is one unit: the largest piece that is always used whole, so only one layer's
    full weights exist at a time; then the root (embeddings, lm_head, norms). Parallel projections
    live inside their cross-attention layer and so shard with it. The Aligner runs outside the
    model's forward, so it is its own FSDP root over the same mesh: all trainable parameters are
    then DTensors on one mesh and one AdamW, one clip_grad_norm_ and one DCP checkpoint cover
    them (a replicated Aligner would mix plain tensors and DTensors in the optimizer).
    bf16 compute with fp32 gradient reduction on GPU; fp32 everywhere on CPU.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    units = set(base_model(model)._no_split_modules)
    for module in list(model.modules()):
        if type(module).__name__ in units:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # A rank whose batch aligns no word leaves the parallel projections without a gradient while
    # another rank has one: reduce-scatter zeros for them so the collectives still match.
    model.set_reduce_scatter_unused_params(True)
    if aligner is not None:
        fully_shard(aligner, mesh=mesh, mp_policy=mp)
    return model, aligner


def base_model(model):
    """The MllamaForConditionalGeneration inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---- model: preset -> LoRA -> parallel projections -> capture -> checkpointing ----

# LoRA targets (§6 (4)): q/v projections of the LANGUAGE model only. "q_proj" alone would also
# match the vision encoder's attention (the authors' release adapts both, see REFERENCE.md).
LORA_TARGETS = r".*language_model\..*\.(q_proj|v_proj)"


def apply_peft(model, args):
    """LoRA on the language model's q/v projections (args.peft == "lora"), or all weights trainable."""
    if args.peft == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(args.seed)  # LoRA A matrices are random: same seed, same start
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(model, config)


def build(args, device, mesh):
    """Model, processor, aligner, capture and aligned layers, in the order the set-up needs."""
    if args.loss == "lavender" and args.aligner != "none":  # refuse a placement it cannot honour, before loading
        try:
            aggregate.aligner_placement(args.aggregate, args.aligner_mode)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    frozen = args.frozen_dtype  # the frozen base weights' dtype; auto: bf16 on a GPU with LoRA, else fp32
    if frozen == "auto":
        frozen = "bfloat16" if device.type == "cuda" and args.peft == "lora" else "float32"
    model, processor = load_vlm(args.model, args.model_path, dtype=getattr(torch, frozen))
    model = apply_peft(model, args)
    aligner, capture, layers = None, None, []
    if args.loss == "lavender":
        torch.manual_seed(args.seed + 1)  # parallel projections (random init)
        layers = aggregate.aligned_layers(model, args.layers)
        if args.aggregate == "learn":  # eq. 15-16: W_Qd, W_Kd beside each aligned layer's W_Q, W_K
            aggregate.add_parallel_projections(model, layers, init=args.projection_init)
        if args.aligner != "none":
            torch.manual_seed(args.seed + 2)
            heads = base_model(model).config.text_config.num_attention_heads
            aligner = aligner_lib.Aligner(args.aligner, aligner_lib.aligner_channels(args.aggregate, heads),
                                          norm=args.aligner_norm, act=args.aligner_act)
        capture = aggregate.AttentionCapture(model, layers, learned=args.aggregate == "learn")
    trainable_in_float32(model)
    if args.activation_checkpointing:  # recompute each layer in backward; non-reentrant works with FSDP2
        if hasattr(model, "activation_checkpointing_enable"):  # the name in recent transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # earlier 5.x: the same function under its old name
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mesh is None:
        model.to(device)
        aligner = aligner.to(device) if aligner is not None else None
    else:  # fully_shard moves each rank's shard to its device: the full model never sits on one GPU
        model, aligner = shard(model, aligner, mesh, device)
    return model, processor, aligner, capture, layers


# ---- losses of one micro-batch ----

def vlm_loss_sum(logits, labels):
    """eq. 6: −Σ log p(answer token | image, question, earlier tokens), summed (not averaged), so
    that micro-batches and ranks can be weighted by their token counts. Token t predicts t+1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def trainable_in_float32(model):
    """Trainable parameters in fp32 (master weights); frozen ones stay in the load dtype. FSDP2 needs
    one dtype per unit among trainable parameters (LoRA and copied projections could differ)."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def micro_batch_losses(args, model, aligner, capture, batch, dm, device, tokenizer):
    """(ce_sum, att, n_aligned) for one micro-batch: the pieces of eq. 10. att is eq. 9/17 as
    aligner.attention_loss takes it (the mean over samples of each sample's mean word MSE)."""
    inputs = model_inputs(batch, device)
    labels = batch["labels"].to(device)
    if capture is None:  # --loss ar: no hooks, no maps
        return vlm_loss_sum(model(**inputs).logits, labels), None, 0
    rows = aggregate.answer_rows(batch["labels"])  # (B, R): every row that predicts an answer token
    capture.set_rows(rows.to(device))
    logits = model(**inputs).logits  # (B, T, V); the hooks filled capture.probs
    tokens = aggregate.row_tokens(rows, batch["input_ids"], logits, args.align_words)  # §6 (5)
    plan = aggregate.plan_words(tokenizer, rows, tokens, [words for _, words in dm], match=args.match)
    att, n_aligned = alignment_loss(args, capture, aligner, plan, [maps for maps, _ in dm], {**batch, **inputs}, device)
    return vlm_loss_sum(logits, labels), att, n_aligned


def alignment_loss(args, capture, aligner, plan, dm_maps, batch, device, recompute=True):
    """(att, n_aligned): eq. 9/17 between the VLM's word maps (capture -> aggregate -> Aligner) and
    the DM maps of the words `plan` aligns, after the forward that filled `capture`. recompute: a
    per-layer Aligner runs under checkpoint (less memory, the same result; not with BatchNorm)."""
    if plan["dm_index"].shape[1] == 0:
        # no word to align (no attention file, no matching word): run the very same maps -> Aligner
        # graph on one captured row as a word that the loss weights by 0. Under FSDP every rank must
        # run the same graph: collectives follow autograd's order
        row_word = torch.full_like(plan["rows"], -1)
        row_word[:, 0] = 0
        plan = {**plan, "row_word": row_word, "dm_index": torch.full((row_word.shape[0], 1), -1, dtype=torch.long)}
    mask = plan["dm_index"] >= 0  # (B, W) words aligned with a DM map
    vlm_maps = aggregate.vlm_word_maps(capture, plan, batch, aggregation=args.aggregate, aligner=aligner,
                                       aligner_mode=args.aligner_mode,
                                       recompute=recompute and args.aligner_norm != "batch")  # (B, W, 32, 32)
    target = aggregate.dm_targets(dm_maps, plan["dm_index"]).to(device)  # (B, W, 32, 32)
    return aligner_lib.attention_loss(vlm_maps, target, mask.to(device)), int(mask.sum())  # eq. 9/17


# ---- checkpoints (resume) and the run directory's outputs ----

def trainable_modules(model, aligner):
    """One module holding everything trained, so one state-dict call covers the VLM and the Aligner."""
    return nn.ModuleDict({"vlm": model, **({"aligner": aligner} if aligner is not None else {})})


# A checkpoint is a folder: the DCP shards of everything trained (LoRA or all weights, parallel
# projections, Aligner; never the frozen base weights, which --model-path already holds), the
# optimizer, each rank's RNG state, train_state.json (step, scheduler, the run's
# config) and, written last, complete.json listing the files: a folder without it is unfinished.
CHECKPOINT, NEW, OLD, COMPLETE = "checkpoint", "checkpoint.tmp", "checkpoint.old", "complete.json"


def write_durably(path, data):
    """Write bytes and fsync them: once this returns, a power loss keeps the file."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path, text):
    """Replace a text file at once (temp file, fsync, rename): a reader sees the old or the new one."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    write_durably(tmp, text.encode("utf-8"))
    os.replace(tmp, path)


def fsync_dir(path):
    """Make a rename or delete inside a folder durable (fsync of the folder itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_checkpoint(path):
    """Delete a checkpoint folder, complete.json first: a kill halfway leaves an unfinished folder,
    never one that looks complete without its shards."""
    if not path.exists():
        return
    (path / COMPLETE).unlink(missing_ok=True)
    fsync_dir(path)
    shutil.rmtree(path)


def checkpoint_state(path):
    """train_state.json of a complete checkpoint folder (complete.json and every file it lists),
    else None."""
    try:
        listed = json.loads((path / COMPLETE).read_text())["files"]
        if all((path / name).is_file() for name in listed):
            return json.loads((path / "train_state.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def recover_checkpoint(out):
    """Make <out>/checkpoint the newest complete checkpoint and delete the other folders: this
    finishes a save that was killed (see save_checkpoint). Rank 0 only. Each operation leaves the
    newest complete checkpoint in place, so a kill in here is recovered by the next call."""
    folders = [out / name for name in (CHECKPOINT, NEW, OLD)]
    steps = {f: state["step"] for f in folders if (state := checkpoint_state(f)) is not None}
    if not steps:
        return
    newest = max(steps, key=lambda f: (steps[f], f.name == CHECKPOINT))  # a tie: keep checkpoint/
    for folder in folders:
        if folder != newest:  # unfinished, or older than the newest
            remove_checkpoint(folder)
    if newest.name != CHECKPOINT:
        os.replace(newest, out / CHECKPOINT)
        fsync_dir(out)


def checkpoint_tensors(modules, optimizer):
    """What a checkpoint holds as tensors: the trained parameters and the optimizer state (sharded
    under FSDP). ignore_frozen_params: frozen base weights are left out (LoRA); with --peft full
    every weight is trained, so every weight is in."""
    trained = StateDictOptions(ignore_frozen_params=True)
    return {"model": get_model_state_dict(modules, options=trained),
            "optim": get_optimizer_state_dict(modules, optimizer)}


def save_checkpoint(out, modules, optimizer, scheduler, state, rank, world):
    """Write new, rename, then delete. Every rank writes its DCP shards and its RNG state into
    checkpoint.tmp/; rank 0 adds train_state.json and, last, complete.json; then checkpoint/
    becomes checkpoint.old/, checkpoint.tmp/ becomes checkpoint/, and checkpoint.old/ is deleted.
    Killed before any of these operations, the folder still holds a complete checkpoint (the new
    or the previous one), and --resume takes the newest (recover_checkpoint)."""
    out = Path(out)
    new, final, old = out / NEW, out / CHECKPOINT, out / OLD
    if rank == 0:  # leftovers of a killed save; --resume made checkpoint/ the newest complete one
        remove_checkpoint(new)
        remove_checkpoint(old)
    barrier(world)
    dcp.save(checkpoint_tensors(modules, optimizer), checkpoint_id=str(new))  # a collective; fsyncs files
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),  # weights_only loads tensors, ints
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    buffer = io.BytesIO()
    torch.save(rng, buffer)
    write_durably(new / f"rng_rank{rank}.pt", buffer.getvalue())
    barrier(world)
    if rank == 0:
        record = {**state, "scheduler": scheduler.state_dict()}
        write_durably(new / "train_state.json", json.dumps(record).encode())
        files = sorted(p.name for p in new.iterdir())
        write_durably(new / COMPLETE, json.dumps({"step": state["step"], "files": files}).encode())
        if final.exists():
            os.replace(final, old)
            fsync_dir(out)
        os.replace(new, final)
        fsync_dir(out)
        remove_checkpoint(old)
    barrier(world)


def resume_state(out, rank, world):
    """The train state of <out>/checkpoint after recover_checkpoint; every rank reads it."""
    if rank == 0:
        recover_checkpoint(out)
    barrier(world)  # rank 0 may have renamed folders: the others read after it
    state = checkpoint_state(out / CHECKPOINT)
    if state is None:
        raise SystemExit(f"--resume: no complete checkpoint in {out} (looked for {out / CHECKPOINT} with "
                         f"its {COMPLETE}); start the run without --resume (with --overwrite if {out} "
                         f"is not empty)")
    if "config" not in state:
        raise SystemExit(f"--resume: {out / CHECKPOINT} records no run config, so this run cannot be checked "
                         f"against it; start a new run with --overwrite")
    return state


def load_checkpoint(out, modules, optimizer, scheduler, state, rank, world, seed):
    """Restore what save_checkpoint wrote into <out>/checkpoint (state: its train_state.json).

    Another rank count works when the global batch (ranks x --grad-accum x --batch-size) is the same,
    say 8 x 1 x 4 resumed as 4 x 2 x 4: every step then sees the same items (data.micro_batches),
    the losses are normalised by global counts, and DCP reshards model and optimizer onto the new
    ranks. Only the random streams (dropout) cannot carry over: each rank is then seeded from
    (--seed, step, rank)."""
    ckpt = Path(out) / CHECKPOINT
    sd = checkpoint_tensors(modules, optimizer)
    dcp.load(sd, checkpoint_id=str(ckpt))  # every rank reads the shards it needs (resharded if ranks differ)
    trained = StateDictOptions(ignore_frozen_params=True, strict=False)
    keys = set_model_state_dict(modules, sd["model"], options=trained)
    missing = set(keys.missing_keys) - {n for n, p in modules.named_parameters() if not p.requires_grad}
    if missing or keys.unexpected_keys:  # only frozen weights may be absent
        raise SystemExit(f"--resume: {ckpt} does not fit this model (missing {sorted(missing)[:3]}, "
                         f"unexpected {keys.unexpected_keys[:3]})")
    set_optimizer_state_dict(modules, optimizer, sd["optim"])
    scheduler.load_state_dict(state["scheduler"])
    if state["world"] == world:
        restore_rng(ckpt / f"rng_rank{rank}.pt")
    else:
        stream = seed * 1_000_003 + state["step"] * 1_009 + rank  # one stream per (seed, step, rank)
        torch.manual_seed(stream)
        random.seed(stream)
        if rank == 0:
            print(f"--resume: {state['world']} ranks -> {world}, same global batch {state['global_batch']}: "
                  f"the same items per step; dropout draws new random numbers")


def restore_rng(path):
    """Set the RNG states saved by save_checkpoint. weights_only=True: the file may hold tensors and
    plain numbers only, so a planted pickle cannot run code."""
    try:
        rng = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 -- unpickling errors come in several types
        raise SystemExit(f"--resume: {path} is not an RNG state written by train.py "
                         f"({type(err).__name__}: {str(err)[:200]}); it was not loaded. Restore the "
                         f"checkpoint or start anew") from None
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def save_outputs(args, out, model, aligner, processor, rank):
    """adapter/ (LoRA, PEFT save_pretrained) or model/ (full), and lavender.safetensors (Aligner +
    parallel projections). Every rank gathers (a collective); rank 0 writes."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=args.peft == "lora")
    vlm_sd = get_model_state_dict(model, options=full)  # rank 0: full tensors; others: empty
    aligner_sd = get_model_state_dict(aligner, options=full) if aligner is not None else {}
    if rank != 0:
        return
    lavender = {k: v for k, v in vlm_sd.items() if "lavender_" in k}  # eq. 15-16 projections
    lavender.update({f"aligner.{k}": v for k, v in aligner_sd.items()})
    rest = {k: v for k, v in vlm_sd.items() if "lavender_" not in k}
    if args.peft == "lora":  # loadable by PeftModel.from_pretrained(base, "<run>/adapter")
        model.save_pretrained(Path(out) / "adapter", state_dict=rest)
    else:
        base_model(model).save_pretrained(Path(out) / "model", state_dict=rest)
        processor.save_pretrained(Path(out) / "model")
    if lavender:
        save_file({k: v.contiguous() for k, v in lavender.items()}, Path(out) / "lavender.safetensors")


def load_run(run_dir, device="cpu", dtype=torch.float32):
    """(model, processor, lavender, config) of a finished run, on one process, in eval mode.

    The base preset comes from config.json; LoRA runs load adapter/ exactly as the authors' README
    does (PeftModel.from_pretrained(base_model, adapter)), full runs load model/; the VLM in `dtype`
    (bf16 halves the memory: an 11B model then fits a 24 GB GPU), the Aligner in fp32. lavender =
    dict(aligner=nn.Module or None, layers=, aggregation=, aligner_mode=, match=, align_words=, learned=).
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    if config["peft"] == "lora":
        from peft import PeftModel
        base, processor = load_vlm(config["model"], config["model_path"], dtype=dtype)
        model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    else:
        model, processor = load_vlm(config["model"], str(run_dir / "model"), dtype=dtype)
    lavender = dict(aligner=None, layers=config.get("aligned_layers", []), aggregation=config["aggregate"],
                    aligner_mode=config["aligner_mode"], match=config["match"], align_words=config["align_words"],
                    learned=config["loss"] == "lavender" and config["aggregate"] == "learn")
    path = run_dir / "lavender.safetensors"
    if path.exists():
        sd = load_file(path)
        if lavender["learned"]:
            aggregate.add_parallel_projections(model, lavender["layers"], init="random")
            own = {k: v for k, v in sd.items() if not k.startswith("aligner.")}
            missing = set(own) - {k for k, _ in model.named_parameters()}
            if missing:
                raise ValueError(f"{path}: parameters {sorted(missing)[:3]} have no place in the model")
            model.load_state_dict(own, strict=False)
        if config["aligner"] != "none":
            heads = base_model(model).config.text_config.num_attention_heads
            channels = aligner_lib.aligner_channels(config["aggregate"], heads)
            lavender["aligner"] = aligner_lib.Aligner(config["aligner"], channels, norm=config["aligner_norm"],
                                                      act=config["aligner_act"])
            lavender["aligner"].load_state_dict({k[len("aligner."):]: v for k, v in sd.items()
                                                 if k.startswith("aligner.")})
            lavender["aligner"].to(device).eval()
    return model.to(device).eval(), processor, lavender, config


# ---- before step 1: the run folder, the data and the run's config, each checked ----

# What a run writes into --out; --overwrite deletes these (and nothing else) before writing anew.
RUN_FILES = ("config.json", "log.jsonl", "skipped.jsonl", CHECKPOINT, NEW, OLD, "adapter", "model",
             "lavender.safetensors")

# Settings that may change on --resume: they change when or how the run is computed, not what it
# learns (the data order per step depends on the global batch, which is compared instead; --data
# and --attn as paths: the data file is compared by its sha256, the attention folder resolved).
RESUME_MAY_CHANGE = {"max_steps", "epochs", "total_steps", "save_every", "progress", "resume", "overwrite",
                     "out", "dist_timeout", "activation_checkpointing", "world",
                     "batch_size", "grad_accum", "skip_bad_items", "max_length", "data", "attn"}


def may_change_flags():
    """RESUME_MAY_CHANGE as flags, for messages and --help."""
    return ", ".join("--" + k.replace("_", "-") for k in sorted(RESUME_MAY_CHANGE - {"world", "total_steps"}))


def extract_command(data, attn):
    return f"torchrun --nproc_per_node 8 extract.py --dm sd14 --data {data} --out {attn}"


def open_run_dir(args, out, rank, world):
    """The checkpoint's train state with --resume, else None. Without --resume a non-empty --out is
    refused unless --overwrite: a finished run is never replaced by accident."""
    if args.resume and args.overwrite:
        raise SystemExit("--resume continues the run in --out, --overwrite replaces it: give one of them")
    if args.resume:
        return resume_state(out, rank, world)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        held = ", ".join(sorted(p.name for p in out.iterdir())[:6])
        raise SystemExit(f"--out {out} is not empty ({held}): pass --resume to continue the run in it, "
                         f"--overwrite to replace it, or another --out")
    return None


def read_data(args):
    """(items, attention folder or None): --data read, and for --loss lavender the attention store
    found; what is missing is named, with where it was looked for and how to make it."""
    data = Path(args.data)
    attn = Path(args.attn) if args.attn else data.parent / "attn"
    if not data.is_file():
        raise SystemExit(f"--data {data}: no such file (looked for {data.resolve()}). Write the training "
                         f"set there as a JSONL of {{\"id\", \"image\", \"question\", \"answer\"}} lines "
                         f"(README, 'Data'), then make the attention targets: {extract_command(data, attn)}")
    try:
        items = extract.read_items(data)
    except (OSError, ValueError) as err:  # a line that is not UTF-8 or not JSON: the message names it
        raise SystemExit(f"--data: {err}") from None
    if args.loss == "ar":
        return items, None
    if not attn.is_dir():
        where = "--attn" if args.attn else "the default --attn, attn/ beside --data"
        raise SystemExit(f"--loss lavender needs the attention store of extract.py: {where} {attn} does "
                         f"not exist (looked for {attn.resolve()}). Make it with "
                         f"`{extract_command(data, attn)}`, pass --attn DIR, or train without it: --loss ar")
    return items, attn


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def max_length(args, model):
    """--max-length, or by default 2048 tokens (the model's context if shorter)."""
    context = base_model(model).config.text_config.max_position_embeddings
    if args.max_length is not None and args.max_length > context:
        raise SystemExit(f"--max-length {args.max_length} exceeds --model {args.model}'s context of "
                         f"{context} tokens")
    return args.max_length or min(2048, context)


def checked_items(args, items, attn_dir, processor, limit, rank, world, out):
    """(items to train on, skipped, counts): every item checked before step 1 (data.check_item and
    repeated ids), each rank a share, the results gathered so that every rank, and the message,
    see every bad item. Bad items stop the run with their list, or with --skip-bad-items are left
    out and recorded in <out>/skipped.jsonl. A Lavender run with no word to align is refused."""
    share = tqdm(range(rank, len(items), world), desc="check data", disable=rank != 0 or not args.progress,
                 leave=False)
    checked = dict(gather_objects([(i, check_item(items[i], processor, attn_dir, limit, args.match))
                                   for i in share], world))
    problems = {i: c["problem"] for i, c in checked.items() if c["problem"]}
    problems.update(duplicate_ids(items))  # a repeated id also fails its maps' text check: say why
    if problems and not args.skip_bad_items:
        listed = "\n  ".join(problems[i] for i in sorted(problems)[:20])
        raise SystemExit(f"{len(problems)} of {len(items)} items in {args.data} cannot be trained on "
                         f"(nothing was trained):\n  {listed}\nFix or remove them, or pass "
                         f"--skip-bad-items to train without them (listed then in {out / 'skipped.jsonl'})")
    good = [i for i in range(len(items)) if i not in problems]
    with_maps = sum(checked[i]["has_maps"] for i in good)
    counts = {"items": len(good), "skipped_items": len(problems),
              "items_without_attention": len(good) - with_maps,
              "items_with_aligned_words": sum(checked[i]["aligned"] > 0 for i in good)}
    if attn_dir is not None and counts["items_with_aligned_words"] == 0:
        raise SystemExit(f"--loss lavender would align nothing: of {len(good)} items, {with_maps} have an "
                         f"attention file in {attn_dir} and none has an answer word among its file's words "
                         f"(--match {args.match}). Make the store for this --data with "
                         f"`{extract_command(args.data, attn_dir)}`, or use --loss ar")
    skipped = [{"id": items[i]["id"], "line": items[i].get("line"), "reason": problems[i]}
               for i in sorted(problems)]
    return [items[i] for i in good], skipped, counts


def refuse_changes(saved, config, only_given=False):
    """--resume: refuse every setting that differs from the checkpoint's run config, except those
    in RESUME_MAY_CHANGE, naming each with both values. only_given: compare only the keys of
    `config` (a first check on the command line alone, before the model is loaded)."""
    if saved["global_batch"] != config["global_batch"]:
        raise SystemExit(f"--resume: the checkpoint was written by {saved['world']} ranks with a global "
                         f"batch of {saved['global_batch']}; this run has {config['world']} ranks and a "
                         f"global batch of {config['global_batch']} (ranks x --grad-accum x --batch-size). "
                         f"Keep the global batch: the data order per step depends on it")
    config = json.loads(json.dumps(config))  # tuples -> lists, as in the saved JSON
    flags = vars(build_parser().parse_args([]))
    name = lambda k: "--" + k.replace("_", "-") if k in flags else k  # noqa: E731
    keys = config.keys() if only_given else saved.keys() | config.keys()
    changed = [f"  {name(k)}: {saved.get(k, '(not recorded)')!r} in the checkpoint, "
               f"{config.get(k, '(not recorded)')!r} now"
               for k in sorted(keys - RESUME_MAY_CHANGE) if saved.get(k) != config.get(k)]
    if changed:
        raise SystemExit("--resume would change the experiment; these settings differ from the checkpoint's "
                         "run:\n" + "\n".join(changed) + "\nResume with the checkpoint's settings, or start a "
                         "new run (another --out, or --overwrite). May differ: " + may_change_flags())


def start_run_dir(args, out, config, skipped, step):
    """Rank 0, once every check passed: --overwrite clears the old run's files, config.json and
    skipped.jsonl are written, and on --resume log.jsonl keeps the checkpoint's steps only.
    Returns log.jsonl, open for appending one line per step."""
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES if args.overwrite else ():
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    write_atomic(out / "config.json", json.dumps(config, indent=1))
    (out / "skipped.jsonl").unlink(missing_ok=True)
    if skipped:
        write_atomic(out / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
        print(f"--skip-bad-items: {len(skipped)} item(s) left out, listed in {out / 'skipped.jsonl'}")
    if args.resume:
        trim_log(out / "log.jsonl", step)
    return open(out / "log.jsonl", "a" if args.resume else "w")  # noqa: SIM115 -- one line per step


def trim_log(path, step):
    """Keep the log lines of steps 1..step: steps after the checkpoint are trained again, and a
    cut-off line (a full disk, a power loss) is dropped rather than read."""
    rows = []
    for line in (path.read_text(encoding="utf-8", errors="replace") if path.exists() else "").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", step + 1) <= step:
                rows.append(line + "\n")
    write_atomic(path, "".join(rows))


# ---- stopping on a signal: pre-emption (SIGTERM) and Ctrl-C (SIGINT) ----

class Stopped(Exception):
    """A signal stopped training at a step boundary, after its checkpoint was written."""

    def __init__(self, signum, step, out):
        self.signum, self.step = int(signum), step
        super().__init__(f"stopped by {signal.Signals(self.signum).name} after step {step}; the checkpoint "
                         f"is in {out / CHECKPOINT}: continue with the same command and --resume")


@contextlib.contextmanager
def signals_to_flag():
    """While training, SIGTERM (how schedulers pre-empt) and SIGINT (Ctrl-C) only set flag["signal"]:
    the loop saves a checkpoint at the next step boundary and stops. A second Ctrl-C stops at once.
    (Signal handlers can only be set in the main thread; elsewhere signals keep their behaviour.)"""
    flag = {"signal": 0}

    def handler(signum, frame):
        if signum == signal.SIGINT and flag["signal"] == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signal"] = signum

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def read_batch(processor, items, attn_dir, rank):
    """(batch, [(DM maps, words) or (None, None)]) of a micro-batch. Every item passed the checks
    before step 1; a failure now (a file changed during training) names the items and the rank."""
    try:
        return collate(processor, items), [read_dm_maps(attn_dir, it["id"]) for it in items]
    except Exception as err:
        raise RuntimeError(f"rank {rank}: items {[it['id'] for it in items]} could not be read "
                           f"({type(err).__name__}: {err}); they passed the checks before step 1, so a "
                           f"file changed since") from err


# ---- the training loop ----

def train(args):
    """Fine-tune with --loss ar or lavender; returns the run directory (the library entry of toy.py).
    Raises Stopped after saving a checkpoint when SIGTERM or SIGINT arrives."""
    args.out = args.out or f"runs/{args.model}-{args.loss}"
    rank, world, device, mesh = setup_distributed(args.dist_timeout)
    try:
        with signals_to_flag() as stop:  # from here on, SIGTERM/SIGINT stop at the next step boundary
            return fit(args, rank, world, device, mesh, stop)
    finally:
        if world > 1:
            dist.destroy_process_group()


def fit(args, rank, world, device, mesh, stop):
    master, out = rank == 0, Path(args.out)  # only rank 0 prints and writes; every rank runs every collective
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    # ---- before step 1: run folder, data, model, every item, the run's config ----
    saved = open_run_dir(args, out, rank, world)  # the checkpoint's train state (--resume) or None
    global_batch = world * args.grad_accum * args.batch_size  # items per optimizer step, over all ranks
    if saved:  # a changed setting is refused now, before the model is loaded
        given = {**vars(args), "world": world, "global_batch": global_batch}
        refuse_changes(saved["config"], given, only_given=True)
    items, attn_dir = read_data(args)
    model, processor, aligner, capture, layers = build(args, device, mesh)
    limit = max_length(args, model)
    items, skipped, counts = checked_items(args, items, attn_dir, processor, limit, rank, world, out)
    steps_per_epoch = len(items) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{args.data} has {len(items)} usable items, fewer than one step needs ({world} "
                         f"ranks x --grad-accum {args.grad_accum} x --batch-size {args.batch_size}); lower "
                         f"--batch-size or add data")
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    config = {**vars(args), "world": world, "global_batch": global_batch, "aligned_layers": layers, **counts,
              "data_sha256": file_sha256(args.data), "max_length_tokens": limit,
              "attn_dir": str(attn_dir.resolve()) if attn_dir else None,
              "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
    # ---- optimizer, schedule, and with --resume their state ----
    modules = trainable_modules(model, aligner)
    optimizer, scheduler, vlm_params, lavender_params = optimizer_and_schedule(args, modules, steps_per_epoch)
    step = 0
    if saved:
        refuse_changes(saved["config"], config)
        load_checkpoint(out, modules, optimizer, scheduler, saved, rank, world, args.seed)
        step = saved["step"]
    save = lambda step: save_checkpoint(  # noqa: E731 -- every rank calls it (DCP is a collective)
        out, modules, optimizer, scheduler, train_state(step, config), rank, world)
    if master:
        log = start_run_dir(args, out, config, skipped, step)
        if args.loss == "lavender" and counts["items_without_attention"]:
            print(f"{counts['items_without_attention']} of {len(items)} items have no attention file in "
                  f"{attn_dir}: they train with L_VLM alone")
    modules.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"train {args.loss}", disable=not master or not args.progress)
    t_start, last = time.time(), {}
    while step < total_steps:
        t0 = time.time()
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = epoch_order(len(items), args.seed, epoch)
        pretraining = step < args.pretrain_aligner_steps  # §6 (1): only the Aligner (+ projections) learn
        # ---- every micro-batch of the step first, so that losses can be weighted by global counts ----
        micro = []
        for idx in micro_batches(order, in_epoch, args.batch_size, args.grad_accum, rank, world):
            batch, dm = read_batch(processor, [items[i] for i in idx], attn_dir, rank)  # dm: [(maps, words)]
            micro.append((batch, dm))
        n_tokens = all_reduce_sum([sum(int((b["labels"][:, 1:] != -100).sum()) for b, _ in micro)], world)[0]
        sums = [0.0, 0.0, 0.0]  # this rank's summed CE, summed per-sample word MSE, aligned words
        for m, (batch, dm) in enumerate(micro):
            if mesh is not None:  # reduce-scatter gradients only after the last micro-batch
                for module in modules.values():
                    module.set_requires_gradient_sync(m == len(micro) - 1)
            ce_sum, att, n_aligned = micro_batch_losses(args, model, aligner, capture, batch, dm, device,
                                                        processor.tokenizer)
            # this rank's share of the global means; FSDP averages gradients over ranks, hence * world
            loss_vlm = ce_sum / max(n_tokens, 1) * world  # eq. 6, per answer token of the global batch
            share = len(batch["ids"]) / global_batch * world  # eq. 9: per sample of the global batch
            loss_att = att * share if att is not None else 0.0
            aligner_lib.total_loss(loss_vlm, loss_att, args.lam).backward()  # eq. 10/12
            sums[0] += ce_sum.item()
            sums[1] += att.item() * len(batch["ids"]) if att is not None else 0.0
            sums[2] += n_aligned
        ce, att_sum, n_words = all_reduce_sum(sums, world)
        loss_vlm, loss_att = ce / max(n_tokens, 1), att_sum / global_batch
        total = loss_vlm + args.lam * loss_att
        if not math.isfinite(total):  # every rank sees the same reduced value, so all stop together
            ids = gather_objects([i for b, _ in micro for i in b["ids"]], world)
            raise FloatingPointError(f"non-finite loss at step {step + 1} (loss_vlm {loss_vlm}, loss_att {loss_att}); "
                                     f"items of this step: {ids}. Nothing was saved from this step on; check these "
                                     f"items or lower --lr")
        if pretraining:
            for p in vlm_params:  # the VLM stays frozen: drop its gradients before clipping and the step
                p.grad = None
        params = [p for p in (lavender_params if pretraining else vlm_params + lavender_params) if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        last = {"step": step, "epoch": epoch, "loss": total, "loss_vlm": loss_vlm, "loss_att": loss_att,
                "aligned_words": int(n_words), "lr": lr, "phase": "aligner" if pretraining else "all",
                "grad_norm": float(getattr(grad_norm, "full_tensor", lambda: grad_norm)()),  # DTensor under FSDP
                "seconds": round(time.time() - t0, 4)}
        if master:
            log.write(json.dumps(last) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
        signum = any_rank(stop["signal"], world) if step < total_steps else 0  # one rank's signal stops all
        if signum or (args.save_every and step % args.save_every == 0 and step < total_steps):
            save(step)
        if signum:
            bar.close()
            if master:
                log.close()
            raise Stopped(signum, step, out)
    bar.close()
    # ---- outputs: checkpoint for --resume, adapter/ or model/, lavender.safetensors ----
    save(step)
    save_outputs(args, out, model, aligner, processor, rank)
    if capture is not None:
        capture.remove()
    if master:
        log.close()
        print(f"trained {args.loss} for {step} steps on {world} rank(s) in {time.time() - t_start:.1f}s; last loss "
              f"{last.get('loss', float('nan')):.4f} (vlm {last.get('loss_vlm', float('nan')):.4f}, att "
              f"{last.get('loss_att', float('nan')):.4f}); run in {out}")
    return str(out)


def optimizer_and_schedule(args, modules, steps_per_epoch):
    """(AdamW, its schedule, VLM parameters, Lavender parameters): one AdamW over two groups, so
    that Aligner pre-training (§6 (1)) can step the Lavender group (Aligner, parallel projections)
    alone."""
    is_lavender = lambda n: "lavender_" in n or n.startswith("aligner.")  # noqa: E731
    lavender_params = [p for n, p in modules.named_parameters() if p.requires_grad and is_lavender(n)]
    vlm_params = [p for n, p in modules.named_parameters() if p.requires_grad and not is_lavender(n)]
    optimizer = torch.optim.AdamW([{"params": vlm_params}, {"params": lavender_params}], lr=args.lr,
                                  weight_decay=args.weight_decay)
    # decay per epoch, like the authors' StepLR (gamma 0.85), after an optional linear warm-up (none in
    # the release): a function of the step alone, not of the total number of steps, so a run cut
    # short and resumed follows the same schedule as an uninterrupted one
    warmup = lambda s: min(1.0, (s + 1) / args.warmup_steps) if args.warmup_steps else 1.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup(s) * args.lr_gamma ** (s // steps_per_epoch))
    return optimizer, scheduler, vlm_params, lavender_params


def train_state(step, config):
    """train_state.json of a checkpoint: the step reached and the run's config, against which
    --resume checks its own (the data order follows from --seed, the items and the global batch)."""
    return dict(step=step, world=config["world"], global_batch=config["global_batch"], config=config)


# ---- command line ----

def build_parser():
    p = argparse.ArgumentParser(description="Lavender or autoregressive fine-tuning of a VLM (torchrun: many ranks).")
    add = p.add_argument
    # ---- model and data ----
    add("--model", default="tiny", choices=sorted(VLM_PRESETS), help="VLM preset")
    add("--model-path", default=None, help="local copy of the preset (a save_pretrained folder)")
    add("--data", default="data/train.jsonl", help="dataset JSONL (DESIGN.md format)")
    add("--attn", default=None, help="attention store of extract.py (default: attn/ beside --data: data/attn/)")
    add("--out", default=None, help="run directory to write (default: runs/<model>-<loss>)")
    add("--max-length", type=int, default=None,
        help="longest item in tokens (prompt + answer); a longer one is a bad item. Default: 2048, or the "
             "model's context if shorter")
    add("--skip-bad-items", action=argparse.BooleanOptionalAction, default=False,
        help="train without the items that fail the checks before step 1 (listed in <out>/skipped.jsonl); "
             "default: stop before step 1 and name them")
    # ---- method ----
    add("--loss", default="lavender", choices=["ar", "lavender"], help="ar: eq. 6 only; lavender: + λ·L_att (eq. 10)")
    add("--lam", type=float, default=10.0, help="λ of eq. 10 (= 1/σ², eq. 8); 10 as in the authors' release")
    add("--aggregate", default="learn", choices=aggregate.AGGREGATIONS,
        help="over heads-layers (§4.2); learn: parallel projections (eq. 15-16), best in Fig. 19")
    add("--projection-init", default="copy", choices=["copy", "random"],
        help="learn: W_Qd, W_Kd start as copies of W_Q, W_K (A_d = A) or random (the authors' release)")
    add("--layers", default="all", choices=aggregate.LAYER_SUBSETS, help="cross-attention layers aligned (Fig. 22)")
    add("--aligner", default="sim", choices=["none", *aligner_lib.VARIANTS], help="Aligner variant (§4.3)")
    add("--aligner-mode", default="auto", choices=aggregate.ALIGNER_MODES,
        help="auto: the release's placement (per layer for mean-mean, mean-max, learn; after the layers are "
             "combined for max-*, flow-*); per-layer; after (aggregate.aligner_placement)")
    add("--aligner-norm", default="instance", choices=sorted(aligner_lib.NORMS),
        help="Aligner normalisation (instance: no affine, the release's default)")
    add("--aligner-act", default="relu6", choices=sorted(aligner_lib.ACTIVATIONS),
        help="Aligner activation (the release: ReLU6, or LeakyReLU 0.1 for flow)")
    add("--match", default="exact", choices=["exact", "root"], help="word sampling (§6 (5)): same word or same stem")
    add("--align-words", default="predicted", choices=aggregate.ALIGN_WORDS,
        help="§6 (5): align the word the model predicts at a row (the paper and the release), or the label word")
    add("--pretrain-aligner-steps", type=int, default=0,
        help="first N steps train only the Aligner and parallel projections, VLM frozen (§6 (1), Fig. 21)")
    # ---- fine-tuning and optimisation ----
    add("--peft", default="lora", choices=["lora", "full"], help="LoRA on the language model's q/v, or full")
    add("--lora-r", type=int, default=8, help="LoRA rank")
    add("--lora-alpha", type=int, default=32, help="LoRA alpha")
    add("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    add("--frozen-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
        help="dtype of the frozen base weights (LoRA); auto: bfloat16 on a GPU, float32 on a CPU. Trained ones stay float32")
    add("--epochs", type=int, default=3, help="epochs (unless --max-steps)")
    add("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    add("--batch-size", type=int, default=4, help="items per rank per micro-batch")
    add("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    add("--lr", type=float, default=1e-4, help="AdamW learning rate")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    add("--lr-gamma", type=float, default=0.85, help="learning-rate decay per epoch")
    add("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up over the first N steps (0: none, as the release)")
    add("--clip", type=float, default=1.0, help="gradient-norm clipping")
    add("--seed", type=int, default=42, help="seed of LoRA/Aligner init, data order and dropout")
    add("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
        help="recompute layer activations in backward (non-reentrant)")
    # ---- checkpoints and output ----
    add("--save-every", type=int, default=500,
        help="write checkpoint/ every N steps (0: only at the end and on SIGTERM/SIGINT); a SIGKILL loses "
             "at most N steps")
    add("--resume", action=argparse.BooleanOptionalAction, default=False,
        help="continue the run in --out from its newest complete checkpoint; every setting must be the "
             "checkpoint's except " + may_change_flags() + "; the rank count may change when ranks x "
             "--grad-accum x --batch-size stays the same; --data and --attn may be spelled differently, "
             "but the data file's sha256 and the attention folder (resolved) must be the same")
    add("--overwrite", action=argparse.BooleanOptionalAction, default=False,
        help="replace the run in a non-empty --out (its run files are deleted once the checks pass)")
    add("--dist-timeout", type=float, default=10,
        help="minutes a collective waits for a stalled rank before the job fails")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar on rank 0")
    return p


def main():
    args = build_parser().parse_args()
    try:
        train(args)
    except Stopped as stopped:  # the checkpoint is written; 128 + signal, as a process killed by it
        if int(os.environ.get("RANK", "0")) == 0:
            print(stopped, file=sys.stderr)
        exit_if_torchrun(128 + stopped.signum)
        raise SystemExit(128 + stopped.signum) from None
    exit_if_torchrun()


def exit_if_torchrun(code=0):
    """Under torchrun, end the process at once. Call it after everything is saved and every rank has
    left the process group. On CPU/gloo we saw a rank abort during interpreter teardown ("terminate
    called without an active exception", about 1 run in 20), which turned a finished run into a
    failed torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
