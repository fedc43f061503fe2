"""Mixed precision under FSDP2's bf16 parameter policy (distributed.shard, as on a GPU), on the CPU.

One process in a gloo group of one rank, so that fully_shard, its bf16 all-gathers and DTensor
gradients run here as on a node; the tiny preset, nothing downloaded. About 15 s.
Run: python -m pytest -q tests/test_precision.py
"""
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import aggregate
import aligner as aligner_lib
import data
import distributed
import train

CPU = torch.device("cpu")


@pytest.fixture
def mesh(tmp_path):
    """A gloo process group of one rank and its 1-D mesh, as distributed.setup_distributed makes."""
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    dist.destroy_process_group()


def sharded_step(param_dtype, mesh, dataset, seen):
    """One micro-batch's losses and gradients of the tiny Lavender set-up (learned aggregation,
    per-layer sim Aligner) sharded with `param_dtype`; `seen` collects the dtype each part computes
    in. Returns (ce_sum, att, modules)."""
    flags = ["--model", "tiny", "--lora-dropout", "0", "--align-words", "label"]
    args = train.build_parser().parse_args(flags)
    model, processor, aligner, capture, _ = train.build(args, CPU, None)  # the same weights
    model, aligner = distributed.shard(model, aligner, mesh, param_dtype)
    attn = Path(dataset).parent / "attn"
    items = data.read_items(dataset)[:3]
    batch = data.collate(processor, items)
    dm = [data.read_maps(attn, it["id"]) for it in items]
    q_proj = train.models.language_model(model).layers[0].self_attn.q_proj.base_layer
    # (a pre-hook that returns None leaves the inputs as they are)
    q_proj.register_forward_pre_hook(
        lambda m, x: seen.setdefault("decoder weights", m.weight.dtype) and None)
    aligner.net[0].register_forward_pre_hook(
        lambda m, x: seen.setdefault("aligner", (x[0].dtype, m.weight.dtype)) and None)
    ce_sum, att, n_aligned = train.micro_batch_losses(args, model, aligner, capture, batch, dm,
                                                      CPU, processor.tokenizer)
    seen["captured attention"] = capture.probs.dtype
    assert n_aligned > 0
    (ce_sum + args.lam * att).backward()
    return ce_sum.item(), att.item(), train.trainable_modules(model, aligner)


def test_bf16_policy_keeps_the_maps_and_losses_in_float32(mesh, tiny_dataset, monkeypatch):
    """Under the bf16 policy the decoder computes in bf16 while the captured attention, the Aligner
    (weights and input), both min-max normalisations and the MSE are float32; the gradients are
    fp32 DTensors, and clip_grad_norm_ over them gives their norm and clips to --clip.
    One step's loss_att in bf16 agrees with fp32 to 2^-8 = 3.9e-3 relative, one bf16 rounding
    (8 significant bits): the bf16 part ends at the attention scores (q, k and their product),
    the softmax, maps and MSE are fp32, so the scores' rounding errors reach the loss through the
    maps, not compounded by rounding after them. Measured: 6.5e-4 for loss_att, 6e-5 for the
    answer's cross-entropy."""
    seen = {}
    min_max, attention_loss = aggregate.min_max, aligner_lib.attention_loss

    def recorded_min_max(x):
        seen.setdefault("min_max", []).append(x.dtype)
        return min_max(x)

    def recorded_loss(p, t, m, *rest):
        seen.update(mse=(p.dtype, t.dtype))
        return attention_loss(p, t, m, *rest)

    monkeypatch.setattr(aggregate, "min_max", recorded_min_max)
    monkeypatch.setattr(aligner_lib, "attention_loss", recorded_loss)
    ce32, att32, _ = sharded_step(torch.float32, mesh, tiny_dataset, {})
    seen.clear()  # what the bf16 step computes in
    ce16, att16, modules = sharded_step(torch.bfloat16, mesh, tiny_dataset, seen)
    assert seen["decoder weights"] == torch.bfloat16  # the policy is in force
    assert seen["captured attention"] == torch.float32
    assert seen["aligner"] == (torch.float32, torch.float32)
    assert seen["min_max"] == [torch.float32] * 2  # the token maps, then the word maps
    assert seen["mse"] == (torch.float32, torch.float32)
    print(f"loss_att fp32 {att32:.6g} bf16 {att16:.6g} ({abs(att16 / att32 - 1):.2g} relative); "
          f"ce {ce32:.6g} {ce16:.6g} ({abs(ce16 / ce32 - 1):.2g})")
    assert att16 != att32 and att16 == pytest.approx(att32, rel=2 ** -8)
    assert ce16 == pytest.approx(ce32, rel=2 ** -8)
    # gradient clipping over DTensors (train.optimizer_step's call)
    grads = [p for p in modules.parameters() if p.grad is not None]
    assert grads and all(isinstance(p.grad, DTensor) for p in grads)
    assert all(p.grad.dtype == torch.float32 for p in grads)
    norm = math.sqrt(sum(float(p.grad.full_tensor().double().pow(2).sum()) for p in grads))
    clip = norm / 4
    reported = torch.nn.utils.clip_grad_norm_(grads, clip)
    assert float(reported.full_tensor()) == pytest.approx(norm, rel=1e-5)
    clipped = math.sqrt(sum(float(p.grad.full_tensor().double().pow(2).sum()) for p in grads))
    assert clipped == pytest.approx(clip, rel=1e-4)
