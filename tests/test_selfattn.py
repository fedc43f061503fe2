"""selfattn.py and the qwen2vl family: capture against eager attention, the image grid through the
real processor and vision tower, every aggregation on top, FSDP2 over 2 ranks, reload with PEFT.

CPU, tiny Qwen2-VL / Qwen2.5-VL from models.tiny_qwen2vl(), nothing downloaded. One test starts
`torchrun --nproc_per_node 2` (about 20 s).
Run: python -m pytest -q tests/test_selfattn.py
"""
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import run, same_steps, torchrun

import aggregate as ag
import data
import models
import qwen
import runs
import selfattn
import train
from aligner import Aligner, aligner_channels, attention_loss
from capture import answer_rows

QWEN = ["--model", "tiny-qwen2vl"]


def qwen_batch(processor, items, folder):
    """items: [(PIL image, question, answer)] -> data.collate's batch (right padding, labels), the
    images written to `folder` as PNG files for it to read."""
    rows = []
    for i, (image, question, answer) in enumerate(items):
        path = Path(folder) / f"{i}.png"
        image.save(path)
        rows.append({"id": str(i), "image_path": str(path), "question": question, "answer": answer})
    return data.collate(processor, rows)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny(request, tmp_path_factory):
    """A tiny model of each class, and a batch of two images of different sizes (so different
    numbers of image tokens) and answers of different lengths (so right padding)."""
    model, processor = models.tiny_qwen2vl(model_type=request.param)
    model.requires_grad_(False)  # each test asks for the gradients it checks
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 255, (60, 130, 3), np.uint8))
    tall = Image.fromarray(rng.integers(0, 255, (200, 90, 3), np.uint8))
    items = [(wide, "what colour is the circle?", "a red circle left of a blue square"),
             (tall, "two", "yes")]
    batch = qwen_batch(processor, items, tmp_path_factory.mktemp(request.param))
    return model.eval(), processor, batch


def inputs(batch):
    return data.model_inputs(batch)


def eager(model, batch):
    model.set_attn_implementation("eager")
    try:
        return model(**inputs(batch), output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")


# ---- capture ----

def test_capture_equals_eager_attention_with_padding_and_two_image_sizes(tiny):
    """Rows of the capture == the model's own eager probabilities at the image columns (raw), and
    the same renormalised over them (the default); the logits are bit-identical with the hooks."""
    model, processor, batch = tiny
    grid = batch["image_grid_thw"]
    assert grid[0].prod() != grid[1].prod() and (batch["attention_mask"] == 0).any()
    rows = answer_rows(batch["labels"])  # (B, R): -1 pads the shorter answer
    layers = models.attention_layers(model)
    probs = {}
    with torch.no_grad():
        plain = model(**inputs(batch)).logits
        for renormalise in (False, True):
            with selfattn.SelfAttentionCapture(model, layers, renormalise=renormalise) as capture:
                capture.set_rows(rows)
                assert torch.equal(model(**inputs(batch)).logits, plain)
                probs[renormalise] = capture.probs  # (B, L, H, R, N)
        ref = eager(model, batch).attentions
    keys, valid = selfattn.image_positions(batch["input_ids"], model.config.image_token_id)
    n = valid.sum(dim=1)
    # (h/2)(w/2) tokens each
    assert n.tolist() == [int(t * h * w) // 4 for t, h, w in grid.tolist()]
    for i, layer in enumerate(layers):
        for b in range(2):
            for r, t in enumerate(rows[b].tolist()):
                got_raw, got = probs[False][b, i, :, r], probs[True][b, i, :, r]  # (H, N)
                if t < 0:
                    assert got.abs().max() == 0 and got_raw.abs().max() == 0
                    continue
                expect = ref[layer][b, :, t, keys[b, :n[b]]]  # (H, n image tokens)
                assert torch.allclose(got_raw[:, :n[b]], expect, atol=1e-5)
                renormalised = expect / expect.sum(-1, keepdim=True)
                assert torch.allclose(got[:, :n[b]], renormalised, atol=1e-5)
                # (the other's longer image)
                assert got[:, n[b]:].abs().sum() == got_raw[:, n[b]:].abs().sum() == 0


def test_capture_gradients_equal_eager_gradients(tiny):
    """d(Σ w · probs)/dW_Q through the hooks == through eager attention's own probabilities."""
    model, processor, batch = tiny
    rows = answer_rows(batch["labels"])[:, :3]
    layer = models.attention_layers(model)[1]
    w_q = models.attention_module(model, layer).q_proj.weight
    keys, valid = selfattn.image_positions(batch["input_ids"], model.config.image_token_id)
    weights = torch.rand(2, model.config.text_config.num_attention_heads, 3, keys.shape[1],
                         generator=torch.Generator().manual_seed(0)) * valid[:, None, None, :]
    w_q.requires_grad_(True)
    with selfattn.SelfAttentionCapture(model, [layer], renormalise=False) as capture:
        capture.set_rows(rows)
        model(**inputs(batch))
        ours = torch.autograd.grad((capture.probs[:, 0] * weights).sum(), w_q)[0]
    attn = eager(model, batch).attentions[layer]  # (B, H, T, T)
    theirs = attn.gather(2, rows[:, None, :, None].expand(-1, attn.shape[1], -1, attn.shape[-1]))
    columns = keys[:, None, None, :].expand(-1, attn.shape[1], 3, -1)
    theirs = theirs.gather(3, columns)  # (B, H, R, N)
    theirs = torch.autograd.grad((theirs * weights).sum(), w_q)[0]
    w_q.requires_grad_(False)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-7)


def test_learned_copy_equals_pretrained_and_hooks_see_lora(tiny):
    """Parallel projections copied from W_Q, W_K (biases shared) give A_d == the pretrained A, with
    the hooks registered after PEFT wrapped q_proj: a LoRA update of q_proj moves A, not A_d."""
    model, processor, batch = tiny
    # the same seed: the same weights
    copy, _ = models.tiny_qwen2vl(model_type=model.config.model_type)
    args = train.build_parser().parse_args(["--lora-dropout", "0"])
    copy = train.apply_peft(copy, args).eval()
    layers = ag.aligned_layers(copy)
    ag.add_parallel_projections(copy, layers, init="copy")
    rows = answer_rows(batch["labels"])
    with torch.no_grad():
        for name, p in copy.named_parameters():
            if "lora_B" in name:
                # LoRA moves q_proj / v_proj away from the copy
                p.fill_(0.01)
        a, a_d = [], []
        for learned, out in ((False, a), (True, a_d)):
            with ag.attention_capture(copy, layers, learned=learned) as capture:
                capture.set_rows(rows)
                copy(**inputs(batch))
                out.append(capture.probs)
        with ag.attention_capture(copy, layers) as capture, copy.disable_adapter():
            capture.set_rows(rows)
            copy(**inputs(batch))
            base = capture.probs
    assert isinstance(capture, selfattn.SelfAttentionCapture)
    # layer 0 (later layers' inputs change with LoRA too): A_d at init is the pretrained attention
    assert layers[0] == 0 and torch.allclose(a_d[0][:, 0], base[:, 0], atol=1e-6)
    assert not torch.allclose(a[0][:, 0], base[:, 0], atol=1e-4)  # the hooks read LoRA's q_proj


def test_every_aggregation_and_the_aligner_train_on_top(tiny):
    """aggregate.vlm_word_maps with each aggregation (and an Aligner where the release places one):
    finite maps in [0, 1] and a loss whose gradient reaches the model."""
    model, processor, batch = tiny
    layers = ag.aligned_layers(model)
    dm_words = [["red", "circle", "square"], ["yes"]]
    rows, plan = ag.label_plan(processor.tokenizer, batch["input_ids"], batch["labels"], dm_words)
    assert plan["dm_index"].shape[1] >= 2
    dm = ag.dm_targets([torch.rand(3, 32, 32), torch.rand(1, 32, 32)], plan["dm_index"])
    heads = model.config.text_config.num_attention_heads
    if not hasattr(models.attention_module(model, layers[0]), "lavender_q_proj"):
        ag.add_parallel_projections(model, layers)
    w_q = models.attention_module(model, layers[-1]).q_proj.weight
    for aggregation in ag.AGGREGATIONS:
        aligner = None
        if aggregation != "mean-max":
            aligner = Aligner("light", aligner_channels(aggregation, heads))
        learned = aggregation == "learn"
        last = models.attention_module(model, layers[-1])
        param = last.lavender_q_proj.weight if learned else w_q
        w_q.requires_grad_(not learned)
        with ag.attention_capture(model, layers, learned=learned) as capture:
            capture.set_rows(rows)
            model(**inputs(batch))
            maps = ag.vlm_word_maps(capture, plan, batch, aggregation, aligner)  # (B, W, 32, 32)
        assert (maps.shape == dm.shape and torch.isfinite(maps).all() and maps.min() >= 0
                and maps.max() <= 1)
        loss = attention_loss(maps, dm, plan["dm_index"] >= 0)
        assert torch.autograd.grad(loss, param)[0].abs().sum() > 0, aggregation
    w_q.requires_grad_(False)


def test_one_image_per_sample_is_required(tiny):
    model, processor, batch = tiny
    two = torch.tensor([[5, 9, 9, 6, 9, 7]])
    with pytest.raises(ValueError, match="sample 0 of the batch has 2 images"):
        selfattn.image_positions(two, 9)
    with pytest.raises(ValueError, match="sample 1 of the batch has 0 images"):
        selfattn.image_positions(torch.tensor([[5, 9, 6], [5, 6, 7]]), 9)
    with pytest.raises(ValueError, match="3 images for 2 samples"):
        qwen.grid_maps(torch.rand(2, 4), torch.tensor([[1, 2, 2]] * 3), 2)


# ---- the image grid ----

@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_known_patch_lands_on_known_cell(model_type):
    """A bright square drawn into an image changes one image token after the real processor and
    vision tower (attention switched off in the vision blocks, so a token sees only its own 2x2
    patches; Qwen2.5-VL's window order included); a one-hot map at that token, through grid_maps,
    peaks on the 32x32 cells under the square."""
    model, processor = models.tiny_qwen2vl(model_type=model_type)
    for block in model.model.visual.blocks:
        torch.nn.init.zeros_(block.attn.proj.weight)
        torch.nn.init.zeros_(block.attn.proj.bias)
    height, width = 150, 200  # smart_resize: 140 x 196 -> 10 x 14 patches, 5 x 7 tokens
    base = np.full((height, width, 3), 90, np.uint8)
    for y0, x0 in ((20, 150), (100, 30), (60, 90)):
        drawn = base.copy()
        drawn[y0:y0 + 16, x0:x0 + 16] = 250
        tokens = []
        for pixels in (base, drawn):
            out = processor.image_processor(images=[Image.fromarray(pixels)], return_tensors="pt")
            with torch.no_grad():
                visual = model.model.visual(out["pixel_values"], grid_thw=out["image_grid_thw"])
                tokens.append(visual.pooler_output)
        changed = (tokens[1] - tokens[0]).abs().sum(dim=-1)  # (n tokens,)
        one_hot = (changed == changed.max()).float()[None]  # (1, N)
        cell = qwen.grid_maps(one_hot, out["image_grid_thw"], 2)[0]  # (32, 32)
        cy, cx = int((y0 + 8) * 32 / height), int((x0 + 8) * 32 / width)  # the square's centre cell
        assert cell[cy, cx] == cell.max() > 0, (model_type, y0, x0)


def test_grid_maps_worked_example_and_default_layers():
    one = torch.zeros(1, 8)
    one[0, 3] = 1.0  # 2 x 4 tokens: row 0, column 3
    m = qwen.grid_maps(one, torch.tensor([[1, 4, 8]]), 2)[0]
    assert m[:16, 24:].min() == 1 and m.sum() == 16 * 8
    stub = lambda n: types.SimpleNamespace(model=types.SimpleNamespace(  # noqa: E731
        language_model=types.SimpleNamespace(layers=[None] * n)))
    assert qwen.attention_layers(stub(28)) == [3, 7, 11, 15, 19, 23, 27]
    assert qwen.attention_layers(stub(4)) == [0, 1, 2, 3]


def test_a_saved_folder_loads_and_missing_weights_say_where(tmp_path, monkeypatch):
    """A save_pretrained folder loads as the preset (--model-path) with the same logits and images
    bounded by QWEN_MAX_PIXELS; without weights the error names the preset, the hub id and the
    fix."""
    model, processor = models.tiny_qwen2vl()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, again = models.load_vlm("qwen2vl", str(tmp_path))
    assert type(again) is qwen.QwenImageTextProcessor
    assert again.image_processor.size["longest_edge"] <= qwen.QWEN_MAX_PIXELS
    (tmp_path / "images").mkdir()
    item = (Image.new("RGB", (80, 60), (200, 10, 10)), "what colour?", "red")
    batch = qwen_batch(processor, [item], tmp_path / "images")
    with torch.no_grad():
        assert torch.equal(model(**inputs(batch)).logits, loaded(**inputs(batch)).logits)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = r"(?s)--model qwen25vl .*Qwen/Qwen2.5-VL-7B-Instruct.*--model-path DIR"
    with pytest.raises(SystemExit, match=names):
        models.load_vlm("qwen25vl", str(tmp_path / "nowhere"))


# ---- training: FSDP2 over 2 ranks, reload ----

def test_two_ranks_match_one_rank_and_the_adapter_reloads(tmp_path, tiny_dataset):
    """torchrun 2 ranks x batch 1 (FSDP2 per decoder layer and vision block, activation
    checkpointing) == 1 rank x 2 accumulated micro-batches of 1 over 2 steps; the adapter loads
    with PeftModel.from_pretrained and gives load_run's logits; items are checked with their image
    tokens counted."""
    flags = [*QWEN, "--lora-dropout", "0", "--lr", "1e-3", "--batch-size", "1", "--max-steps", "2",
             "--aggregate", "mean-mean"]
    _, one = run(tiny_dataset, tmp_path / "one", "--grad-accum", "2", *flags)
    two = torchrun(tiny_dataset, tmp_path / "two", "--activation-checkpointing", *flags)
    same_steps(one, two)
    from peft import PeftModel
    base = models.tiny_qwen2vl()[0]
    model = PeftModel.from_pretrained(base, str(tmp_path / "two" / "adapter")).eval()
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    loaded, processor, lavender, config = runs.load_run(tmp_path / "two")
    batch = data.collate(processor, data.read_items(tiny_dataset)[:2])
    with torch.no_grad():
        batch_inputs = data.model_inputs(batch)
        assert torch.equal(model(**batch_inputs).logits, loaded(**batch_inputs).logits)
    assert config["aligned_layers"] == [0, 1, 2, 3] and lavender["aligner"] is not None
    item = data.read_items(tiny_dataset)[0]
    image = data.open_image(item["image_path"])
    tokens = int((batch["input_ids"][0] == processor.image_token_id).sum())
    assert data.image_tokens(processor, image) == tokens - 1  # the max-length check counts them
