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

    python train.py --model tiny --data data.jsonl --attn attn/ --out runs/lav --max-steps 10
    torchrun --nproc_per_node 8 train.py --model llama32 --data data.jsonl --attn attn/ --out runs/lav
    python bench.py train      # CPU: Lavender step vs autoregressive step, time and peak memory
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
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
from data import check_images, collate, epoch_order, micro_batches, model_inputs, read_dm_maps  # collate: public API


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

def setup_distributed():
    """(rank, world, device, mesh). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is rank 0
    of 1 with no process group at all (FSDP over one rank shards nothing, and the toy demo runs
    many small trainings on 2 CPU cores: no group, no collectives, no overhead)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
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


def save_checkpoint(out, modules, optimizer, scheduler, state, rank, world):
    """Sharded checkpoint for --resume: every rank writes its own shards (torch.distributed.checkpoint)
    and its own RNG state; rank 0 writes the step, epoch and data order. Written to checkpoint.tmp
    and renamed only when complete, so an interrupted save never leaves a corrupt checkpoint/."""
    tmp, final = Path(out) / "checkpoint.tmp", Path(out) / "checkpoint"
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    barrier(world)
    sd = {"model": get_model_state_dict(modules), "optim": get_optimizer_state_dict(modules, optimizer)}
    dcp.save(sd, checkpoint_id=str(tmp))  # a collective: every rank calls it
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        (tmp / "train_state.json").write_text(json.dumps({**state, "scheduler": scheduler.state_dict()}))
    barrier(world)
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier(world)


def load_checkpoint(out, modules, optimizer, scheduler, rank, world, global_batch, seed):
    """Restore what save_checkpoint wrote; returns the train state (step, epoch, order, ...).

    Another rank count works when the global batch (ranks x --grad-accum x --batch-size) is the same,
    say 8 x 1 x 4 resumed as 4 x 2 x 4: every step then sees the same items (data.micro_batches),
    the losses are normalised by global counts, and DCP reshards model and optimizer onto the new
    ranks. Only the random streams (dropout) cannot carry over: each rank is then seeded from
    (--seed, step, rank)."""
    ckpt = Path(out) / "checkpoint"
    if not (ckpt / "train_state.json").exists():
        raise SystemExit(f"--resume: no complete checkpoint in {ckpt}; train without --resume first")
    state = json.loads((ckpt / "train_state.json").read_text())
    saved_batch = state.get("global_batch")  # None in checkpoints written before it was recorded
    same_batch = saved_batch == global_batch if saved_batch is not None else state["world"] == world
    if not same_batch:
        raise SystemExit(f"--resume: the checkpoint was written by {state['world']} ranks with a global batch of "
                         f"{saved_batch or 'unknown size'}; this run has {world} ranks and a global batch of "
                         f"{global_batch} (ranks x --grad-accum x --batch-size). Keep the global batch: the data "
                         f"order per step depends on it")
    sd = {"model": get_model_state_dict(modules), "optim": get_optimizer_state_dict(modules, optimizer)}
    dcp.load(sd, checkpoint_id=str(ckpt))  # every rank reads the shards it needs (resharded if ranks differ)
    set_model_state_dict(modules, sd["model"])
    set_optimizer_state_dict(modules, optimizer, sd["optim"])
    scheduler.load_state_dict(state.pop("scheduler"))
    if state["world"] == world:
        rng = torch.load(ckpt / f"rng_rank{rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        stream = seed * 1_000_003 + state["step"] * 1_009 + rank  # one stream per (seed, step, rank)
        torch.manual_seed(stream)
        random.seed(stream)
        if rank == 0:
            print(f"--resume: {state['world']} ranks -> {world}, same global batch {global_batch}: the same items "
                  f"per step; dropout draws new random numbers")
    return state


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


# ---- the training loop ----

def train(args):
    """Fine-tune with --loss ar or lavender; returns the run directory (the library entry of toy.py)."""
    rank, world, device, mesh = setup_distributed()
    try:
        return fit(args, rank, world, device, mesh)
    finally:
        if world > 1:
            dist.destroy_process_group()


def fit(args, rank, world, device, mesh):
    master, out = rank == 0, Path(args.out)  # only rank 0 prints and writes; every rank runs every collective
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    # ---- data, checked up front ----
    items = extract.read_items(args.data)
    problems = gather_objects(check_images(items[rank::world]), world)  # each rank checks a share
    if problems:
        raise SystemExit(f"{len(problems)} image(s) cannot be used; fix or remove these items:\n  "
                         + "\n  ".join(problems[:20]))
    attn_dir = (Path(args.attn) if args.attn else Path(args.data).parent / "attn") if args.loss == "lavender" else None
    no_attn = sum(not extract.maps_path(attn_dir, it["id"]).exists() for it in items) if attn_dir else len(items)
    steps_per_epoch = len(items) // (world * args.grad_accum * args.batch_size)
    if steps_per_epoch == 0:
        raise SystemExit(f"{args.data} has {len(items)} items, fewer than one step needs ({world} ranks x --grad-accum "
                         f"{args.grad_accum} x --batch-size {args.batch_size}); lower --batch-size or add data")
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    global_batch = world * args.grad_accum * args.batch_size  # items per optimizer step, over all ranks
    # ---- model, optimizer, schedule ----
    model, processor, aligner, capture, layers = build(args, device, mesh)
    modules = trainable_modules(model, aligner)
    is_lavender = lambda n: "lavender_" in n or n.startswith("aligner.")  # Aligner + parallel projections
    lavender_params = [p for n, p in modules.named_parameters() if p.requires_grad and is_lavender(n)]
    vlm_params = [p for n, p in modules.named_parameters() if p.requires_grad and not is_lavender(n)]
    optimizer = torch.optim.AdamW([{"params": vlm_params}, {"params": lavender_params}], lr=args.lr,
                                  weight_decay=args.weight_decay)
    # decay per epoch, like the authors' StepLR (gamma 0.85), after an optional linear warm-up (none in
    # the release): a function of the step alone, not of the total number of steps, so a run cut
    # short and resumed follows the same schedule as an uninterrupted one
    warmup = lambda s: min(1.0, (s + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup(s) * args.lr_gamma ** (s // steps_per_epoch))
    step = 0
    if args.resume:
        state = load_checkpoint(out, modules, optimizer, scheduler, rank, world, global_batch, args.seed)
        step = state["step"]
        if state["order"] != epoch_order(len(items), args.seed, state["epoch"]):
            raise SystemExit(f"--resume: {args.data} or --seed changed since the checkpoint (the data order differs)")
        if master:  # forget log lines written after the checkpoint (a crash after --save-every)
            lines = (out / "log.jsonl").read_text().splitlines()
            (out / "log.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= step))
    if master:
        out.mkdir(parents=True, exist_ok=True)
        config = {**vars(args), "world": world, "aligned_layers": layers, "items": len(items),
                  "items_without_attention": no_attn, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
        (out / "config.json").write_text(json.dumps(config, indent=1))
        if args.loss == "lavender" and no_attn:
            print(f"{no_attn} of {len(items)} items have no attention file in {attn_dir}: they train with L_VLM alone")
        log = open(out / "log.jsonl", "a" if args.resume else "w")  # noqa: SIM115 -- one line per step
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
            batch = collate(processor, [items[i] for i in idx])
            micro.append((batch, [read_dm_maps(attn_dir, items[i]["id"]) for i in idx]))  # [(maps, words) or Nones]
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
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            save_checkpoint(out, modules, optimizer, scheduler, dict(step=step, world=world, global_batch=global_batch,
                                                                     epoch=epoch, order=order), rank, world)
    bar.close()
    # ---- outputs: checkpoint for --resume, adapter/ or model/, lavender.safetensors ----
    epoch = step // steps_per_epoch
    save_checkpoint(out, modules, optimizer, scheduler,
                    dict(step=step, world=world, global_batch=global_batch, epoch=epoch,
                         order=epoch_order(len(items), args.seed, epoch)), rank, world)
    save_outputs(args, out, model, aligner, processor, rank)
    if capture is not None:
        capture.remove()
    if master:
        log.close()
        print(f"trained {args.loss} for {step} steps on {world} rank(s) in {time.time() - t_start:.1f}s; last loss "
              f"{last.get('loss', float('nan')):.4f} (vlm {last.get('loss_vlm', float('nan')):.4f}, att "
              f"{last.get('loss_att', float('nan')):.4f}); run in {out}")
    return str(out)


# ---- command line ----

def build_parser():
    p = argparse.ArgumentParser(description="Lavender or autoregressive fine-tuning of a VLM (torchrun: many ranks).")
    add = p.add_argument
    # ---- model and data ----
    add("--model", default="tiny", choices=sorted(VLM_PRESETS), help="VLM preset")
    add("--model-path", default=None, help="local copy of the preset (a save_pretrained folder)")
    add("--data", help="dataset JSONL (DESIGN.md format)")
    add("--attn", default=None, help="attention store of extract.py (default: attn/ beside --data)")
    add("--out", default="runs/run", help="run directory to write")
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
    add("--save-every", type=int, default=0, help="write checkpoint/ every N steps (0: at the end only)")
    add("--resume", action=argparse.BooleanOptionalAction, default=False,
        help="continue from <out>/checkpoint (any rank count with the same ranks x --grad-accum x --batch-size)")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar on rank 0")
    return p


def main():
    args = build_parser().parse_args()
    if not args.data:
        raise SystemExit("--data is required (a JSONL file, see DESIGN.md)")
    train(args)
    exit_if_torchrun()


def exit_if_torchrun():
    """Under torchrun, end the process at once. Call it after everything is saved and every rank has
    left the process group. On CPU/gloo we saw a rank abort during interpreter teardown ("terminate
    called without an active exception", about 1 run in 20), which turned a finished run into a
    failed torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
