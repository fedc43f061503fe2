"""bench.py and bench_extract.py on CPU: the peer arms compute what their originals compute, the
train arms step, and `python bench_gpu.py --smoke` fills every row of its table.

Needs nothing downloaded (tiny SD, 1/16-width llama32 and qwen2vl from config). The smoke test
starts `python bench_gpu.py --smoke` (nine processes, about 150 CPU seconds); the rest take seconds.
Run: python -m pytest -q tests/test_bench.py
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aggregate
import bench
import bench_extract
import bench_gpu
import models
import qwen

ROOT = Path(__file__).resolve().parents[1]


# ---- the peers ----

@torch.no_grad()
def test_p2p_store_keeps_every_layer_up_to_32x32_summed_over_steps():
    """tiny-sd's UNet at 40x40 latents attends at 40x40 (1600 queries: Prompt-to-Prompt drops those
    maps) in down_blocks.0 and up_blocks.1, and at 20x20 (400: kept) in down_blocks.1, the mid block
    and up_blocks.0. Two UNet calls are two steps; the explicit-softmax processors leave the output
    as SDPA gives it; each kept map, self- or cross-attention, is a sum of two softmaxes."""
    unet = models.tiny_sd()["unet"]
    latents, context = torch.randn(1, 4, 40, 40), torch.randn(1, 77, 32)
    plain = dict(unet.attn_processors)
    expected = [unet(latents, t, encoder_hidden_states=context).sample for t in (1, 501)]
    store = bench_extract.p2p_store(len(plain))
    unet.set_attn_processor(bench_extract.p2p_processors(plain, store))
    for t, want in zip((1, 501), expected):
        got = unet(latents, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert store["steps"] == 2 and store["calls"] == 2 * len(plain) == 28 and store["step"] == {}
    kept = ("down_blocks.1.", "mid_block.", "up_blocks.0.")
    assert set(store["sum"]) == {n for n in plain if n.startswith(kept)}
    for name, m in store["sum"].items():
        # cross-attention: the context; self-attention: the grid
        keys = 77 if name.endswith("attn2.processor") else 400
        assert m.shape == (4, 400, keys)  # (B * 4 heads, queries, keys)
        torch.testing.assert_close(m.sum(-1), torch.full((4, 400), 2.0))
    for m in bench_extract.p2p_average(store).values():
        torch.testing.assert_close(m.sum(-1), torch.ones(4, 400))


def test_release_attention_equals_capture_and_leaves_logits():
    """The release's way (eager + output_attentions, rows read afterwards) and AttentionCapture
    (SDPA kept, hooks) give the same probabilities for the same rows; the logits agree with
    SDPA's."""
    model, batch, rows = bench.bench_model(tile_size=56, tiles=1)
    with torch.no_grad():
        logits, probs = bench.release_attention(model, batch, rows)
        with aggregate.AttentionCapture(model, aggregate.aligned_layers(model)) as capture:
            capture.set_rows(rows)
            plain = model(**batch).logits
            captured = capture.probs
    assert model.config._attn_implementation == "sdpa"  # switched back
    # (B, L, H, R, 4 tiles of 4x4 + CLS)
    assert probs.shape == captured.shape == (1, 8, 32, 32, 4 * 17)
    torch.testing.assert_close(probs, captured, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)


def test_qwen_geometry_builds_and_its_capture_leaves_logits():
    """bench.py aggregate --model qwen2vl: Qwen2-VL-7B's proportions at 1/16 width (28 layers, 28
    heads) with one 112 px image (4 x 4 merged tokens); the capture reads the 7 aligned layers'
    rows over the image tokens, each a distribution, and leaves SDPA's logits bit-identical."""
    model, batch, rows = qwen.bench_model(side=112)
    assert aggregate.aligned_layers(model) == [3, 7, 11, 15, 19, 23, 27]
    with torch.no_grad():
        plain = model(**batch).logits
        with aggregate.attention_capture(model, aggregate.aligned_layers(model)) as capture:
            capture.set_rows(rows)
            assert torch.equal(model(**batch).logits, plain)
            assert capture.probs.shape == (1, 7, 28, 32, 16)  # (B, L, H, R, 4 x 4 tokens)
            torch.testing.assert_close(capture.probs.sum(-1), torch.ones(1, 7, 28, 32))


# ---- the train arms ----

def test_bench_train_arms_step_and_count_the_aligner_flops():
    """bench.py's train benchmark builds and steps each arm at its real geometry (so it keeps up
    with train.py's internals), and its FLOP count is the formula worked by hand for one word, one
    layer, one head: convs 1->32 3x3, 32->32 3x3, the squeeze 32->1 3x3 and 1->1 1x1 on 32x32,
    forward + recompute + two backward."""
    for arm in ("ar", "lavender"):
        bench.step_setup(arm, words=1)()
    # the train-gpu geometry's code path (one tile, a batch, bf16 frozen weights), on the CPU
    bench.step_setup("lavender", words=1, tiles=1, tile=56, dtype=torch.bfloat16, batch_size=2)()
    step, gflop = bench.aligner_alone_setup(words=1, layers=1, heads=1)
    step()
    # 2·h·w·C_out·C_in·k² per conv
    per_pass = 2 * 1024 * (32 * 1 * 9 + 32 * 32 * 9 + 1 * 32 * 9 + 1 * 1 * 1)
    assert gflop == pytest.approx(4 * per_pass / 1e9)
    # the default arm: 32 heads in, 16 words, 8 layers: (3 · 32·32·9 + 32) per pixel, 4 passes
    default_gflop = 2 * 1024 * (3 * 9216 + 32) * 16 * 8 * 4 / 1e9
    assert bench.aligner_alone_setup(words=16)[1] == pytest.approx(default_gflop)


# ---- python bench_gpu.py ----

FAKE_PART = """import json, sys, time
name = sys.argv[2]
if name == "extract-b1":
    sys.exit("RuntimeError: CUDA out of memory (a made-up failure)")
if name == "train":
    time.sleep(30)
print("progress on stdout")
print(json.dumps([dict(part=name, arm="a", time="1 s", memory="2.00 GiB", ratio="", note="")]))
"""


def test_gpu_parts_fail_and_time_out_alone(tmp_path, monkeypatch):
    """A part that fails or hangs gets a FAILED / TIMEOUT row with the reason; the others still run.
    (Each part is a stand-in script here, so that the test takes a second.)"""
    script = tmp_path / "fake_bench.py"
    script.write_text(FAKE_PART)
    monkeypatch.setattr(bench_gpu, "__file__", str(script))
    monkeypatch.setattr(bench_gpu, "GPU_PARTS", dict(bench_gpu.GPU_PARTS, train=1))
    rows = bench_gpu.bench_gpu(smoke=True, out=tmp_path / "table.md")
    by_part = {r["part"]: r for r in rows}
    failed = by_part["extract-b1"]
    assert failed["arm"] == "FAILED" and "made-up failure" in failed["note"]
    limit = f"within {1 * bench_gpu.SMOKE_TIME_FACTOR} s"  # train=1 s, stretched under --smoke
    assert by_part["train"]["arm"] == "TIMEOUT" and limit in by_part["train"]["note"]
    assert [by_part[p]["memory"] for p in ("extract-b8", "aggregate", "fsdp")] == ["2.00 GiB"] * 3
    assert "| train | TIMEOUT |" in (tmp_path / "table.md").read_text()


def test_gpu_smoke_fills_every_row(tmp_path):
    """`python bench_gpu.py --smoke`: the GPU command's code at tiny sizes on the CPU; every part
    succeeds and every row has a time and a peak memory."""
    out = tmp_path / "bench_gpu_smoke.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "bench_gpu.py"), "--smoke", "--out", str(out)]
    # ~150 CPU s of parts; a busy machine doubles the wall time
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = out.read_text()
    assert table in done.stdout and "Device: CPU" in table
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    rows = [line.split(" | ") for line in lines][1:]
    parts = [r[0].lstrip("| ") for r in rows]
    expected = (["extract 32 px"] * 6 + ["train step"] * 2 + ["VLM forward"] * 8 + ["torchrun"]
                + ["train.py loop"] * 2 * len(bench_gpu.LOOP_ARMS))
    assert [p.split(",")[0] for p in parts] == expected, parts
    for r in rows:
        assert "FAILED" not in r[1] and "TIMEOUT" not in r[1], r
        time_digits = r[2].split()[0].replace(".", "")
        assert time_digits.isdigit() and r[3].endswith(("GiB", "GiB host RSS")), r
