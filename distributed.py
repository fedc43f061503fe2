"""torchrun, plainly (§5 (4): FSDP for Llama-3.2): the rank set-up, the FSDP2 sharding of
train.py's model, and the few collectives that train.py, evaluate.py and runs.py use.

torchrun starts one process per GPU and sets RANK, WORLD_SIZE and LOCAL_RANK; each process joins
the process group (nccl on GPU, gloo on CPU) and an explicit 1-D device mesh (pure data
parallelism; shard puts FSDP2 on it). Plain `python script.py` is rank 0 of 1 with no process
group at all, and every collective below then does nothing but return its input. Only rank 0
prints and writes, but every rank calls every collective: a rank that skips one hangs the
others. Multi-node is torchrun's own rendezvous; nothing here is home-made. (extract.py needs
no collective: its ranks share only the output folder.)

    torchrun --nproc_per_node 8 train.py --model llama32
"""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import models


# ---- the ranks, their process group and mesh ----

def setup_distributed(timeout_minutes=10):
    """(rank, world, device, mesh). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is
    rank 0 of 1 with no process group at all (FSDP over one rank shards nothing, and the toy demo
    runs many small trainings on 2 CPU cores: no group, no collectives, no overhead).
    timeout_minutes: how long a collective waits for a stalled rank before the job fails (gloo's
    own default is 30 minutes, NCCL's 10)."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device, None
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    timeout = timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    from torch.distributed.device_mesh import init_device_mesh
    # 1-D: pure data parallel
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    return rank, world, device, mesh


def teardown(world):
    """Leave the process group (every rank, at the end, also after an error)."""
    if world > 1:
        dist.destroy_process_group()


# ---- FSDP2: one unit per layer that is always used whole ----

def shard(model, aligner, mesh, param_dtype=torch.float32):
    """FSDP2 (§5 (4)): every `_no_split_modules` layer (vision encoder layer, self-attention and
    cross-attention decoder layer) is one unit: the largest piece that is always used whole, so
    only one layer's full weights exist at a time; then the root (embeddings, lm_head, norms).
    Parallel projections live inside their cross-attention layer and so shard with it. The
    Aligner runs outside the model's forward, so it is its own FSDP root over the same mesh: all
    trainable parameters are then DTensors on one mesh and one AdamW, one clip_grad_norm_ and one
    DCP checkpoint cover them (a replicated Aligner would mix plain tensors and DTensors in the
    optimizer). The model computes in param_dtype (train.build: bf16 on a GPU, fp32 on a CPU) with
    fp32 master weights and gradient reduction; the Aligner in fp32, as the maps it reads (fp32
    softmax).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    units = set(models.base_model(model)._no_split_modules)
    for module in list(model.modules()):
        if type(module).__name__ in units:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # A rank whose batch aligns no word leaves the parallel projections without a gradient while
    # another rank has one: reduce-scatter zeros for them so the collectives still match.
    model.set_reduce_scatter_unused_params(True)
    if aligner is not None:  # no cast: fp32 weights on the fp32 maps
        fully_shard(aligner, mesh=mesh, mp_policy=MixedPrecisionPolicy())
    return model, aligner


# ---- the collectives: every rank calls each one ----

def all_reduce_sum(values, world):
    """Sum a list of floats over ranks (every rank must call it)."""
    on_gpu = world > 1 and dist.get_backend() == "nccl"  # nccl reduces GPU tensors only
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if on_gpu else "cpu")
    if world > 1:
        dist.all_reduce(t)
    return t.cpu().tolist()


def any_rank(value, world):
    """The largest of a number over ranks (every rank must call it): e.g. a signal seen by one
    rank."""
    on_gpu = world > 1 and dist.get_backend() == "nccl"
    t = torch.tensor([float(value)], device="cuda" if on_gpu else "cpu")
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def gather_objects(values, world):
    """Concatenate a list from every rank (every rank must call it)."""
    parts = [values] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def barrier(world):
    """Wait until every rank is here (every rank must call it)."""
    if world > 1:
        dist.barrier()


# ---- the end of a torchrun process ----

def exit_if_torchrun(code=0):
    """Under torchrun, end the process at once. Call it after everything is saved and every rank
    has left the process group. On CPU/gloo a rank can abort during interpreter teardown
    ("terminate called without an active exception", about 1 run in 20), which would turn a
    finished run into a failed torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
