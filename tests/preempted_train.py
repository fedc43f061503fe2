"""train.py's command line, where one rank alone is pre-empted: rank $PREEMPT_RANK sends itself
SIGTERM while step $PREEMPT_STEP computes (one micro-batch a step). test_train.py runs it under
`torchrun --nproc_per_node 2` to check that every rank stops at the same step boundary, after one
complete checkpoint.

    PREEMPT_RANK=1 PREEMPT_STEP=2 torchrun --nproc_per_node 2 tests/preempted_train.py \
        --model tiny ...
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

losses = train.micro_batch_losses
calls = {"n": 0}


def preempted(*args, **kwargs):
    """train.micro_batch_losses, after a SIGTERM to this process on rank $PREEMPT_RANK's
    $PREEMPT_STEP-th call."""
    calls["n"] += 1
    this_step = calls["n"] == int(os.environ["PREEMPT_STEP"])
    this_rank = os.environ["RANK"] == os.environ["PREEMPT_RANK"]
    if this_step and this_rank:
        os.kill(os.getpid(), signal.SIGTERM)
    return losses(*args, **kwargs)


train.micro_batch_losses = preempted
train.main()
