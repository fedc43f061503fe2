"""aggregate.py: capture, tiles, aggregations, words. CPU, tiny Mllama from train.tiny_vlm(), no download.

    python -m pytest -q tests/test_aggregate.py
"""
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image

import aggregate as ag
import train
from aligner import Aligner, aligner_channels, attention_loss

LAYOUT_SIZES = {  # (rows, cols) of tiles -> an image (width, height) that the 56 px processor tiles so,
    # each leaving at least one whole row or column of 14 px patches as padding
    (1, 1): (56, 30), (1, 2): (112, 40), (2, 1): (40, 112), (1, 3): (150, 40),
    (3, 1): (40, 150), (1, 4): (224, 40), (4, 1): (40, 224), (2, 2): (112, 80)}


def make_batch(processor, items):
    """items: [(PIL image, question, answer)] -> processor batch + labels (answer tokens) + image_sizes."""
    texts = [processor.apply_chat_template([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
        {"role": "assistant", "content": [{"type": "text", "text": a}]}]) for _, q, a in items]
    batch = dict(processor(images=[[im] for im, _, _ in items], text=texts, padding=True, return_tensors="pt"))
    labels = torch.full_like(batch["input_ids"], -100)
    for b, (_, q, a) in enumerate(items):
        prompt = processor.apply_chat_template([
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
        start = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        n = int(batch["attention_mask"][b].sum())
        labels[b, start:n] = batch["input_ids"][b, start:n]
    batch["labels"] = labels
    batch["image_sizes"] = torch.tensor([[im.height, im.width] for im, _, _ in items])
    return batch


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("labels", "image_sizes")}


@pytest.fixture(scope="module")
def tiny():
    model, processor = train.tiny_vlm()
    # non-zero gates so that the cross-attention layers change the logits (random init leaves them at 0)
    for layer in ag.aligned_layers(model):
        block = model.model.language_model.layers[layer]
        torch.nn.init.constant_(block.cross_attn_attn_gate, 0.5)
        torch.nn.init.constant_(block.cross_attn_mlp_gate, 0.5)
    items = [(Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 120, 3), np.uint8)),
              "what colour is the circle?", "a red circle"),
             (Image.new("RGB", (100, 90), (90, 30, 200)), "what shape is red?", "two circles")]
    return model.eval(), processor, make_batch(processor, items)


# ---- tiles: a known patch lands on the known cell, for every Mllama layout ----

@pytest.mark.parametrize("layout", list(LAYOUT_SIZES))
def test_known_patch_lands_on_known_cell(layout, tiny):
    model, processor, _ = tiny
    ip = processor.image_processor
    tile, patch, P = 56, 14, 4
    width, height = LAYOUT_SIZES[layout]
    supported = [tuple(r) for r in model.config.vision_config.supported_aspect_ratios]
    for cy, cx in [(0.2, 0.3), (0.8, 0.7), (0.5, 0.1)]:
        y0, x0 = int(cy * height), int(cx * width)
        pixels = np.full((height, width, 3), 160, np.uint8)  # grey image with a white 3x3 block
        pixels[y0 - 1:y0 + 2, x0 - 1:x0 + 2] = 255
        out = ip(images=[[Image.fromarray(pixels)]], return_tensors="pt")
        aid = int(out["aspect_ratio_ids"][0, 0])
        assert supported[aid - 1] == layout
        tiles = out["pixel_values"][0, 0].mean(1)  # (4, 56, 56) grey levels of the real processor output
        per_patch = tiles.unfold(1, patch, patch).unfold(2, patch, patch)  # (4, P, P, 14, 14)
        t, py, px = np.unravel_index(int(per_patch.amax(dim=(-2, -1)).argmax()), (4, P, P))
        attn = torch.zeros(4 * (1 + P * P))
        attn[t * (1 + P * P) + 1 + py * P + px] = 1.0  # all mass on the brightest patch (CLS is index 0)
        grid = ag.tiles_to_grid(attn, aid, (height, width), tile, patch, 4, supported)  # (32, 32)
        assert grid.shape == (32, 32)
        # the map is the patch's footprint on the original image: its centroid is within half a
        # patch (in original pixels) of the block, and the block's cells are covered
        ys, xs = (torch.arange(32) + 0.5) / 32 * height, (torch.arange(32) + 0.5) / 32 * width
        w = grid / grid.sum()
        cen_y, cen_x = float((w.sum(1) * ys).sum()), float((w.sum(0) * xs).sum())
        # every LAYOUT_SIZES image is upscaled or kept (never shrunk), so a patch spans <= 14 original px
        half = patch / 2 + max(height, width) / 32
        assert abs(cen_y - (y0 + 0.5)) <= half and abs(cen_x - (x0 + 0.5)) <= half, (layout, cy, cx, cen_y, cen_x)
        cells_y = slice(int((y0 - 1) / height * 32), int((y0 + 1) / height * 32) + 1)  # cells under the block
        cells_x = slice(int((x0 - 1) / width * 32), int((x0 + 1) / width * 32) + 1)
        assert grid[cells_y, cells_x].max() > 0
    # padding: a patch entirely in the processor's padding (normalised 0 everywhere) maps to nothing,
    # a patch entirely inside the image maps to something; padding tiles and CLS too map to nothing
    pad_value = float(((0 - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)).mean())
    per_patch = out["pixel_values"][0, 0].unfold(2, patch, patch).unfold(3, patch, patch)  # (4, 3, P, P, 14, 14)
    is_pad = (per_patch - pad_value).abs().amax(dim=(1, 4, 5)) < 1e-4  # (4, P, P)
    n_tiles = layout[0] * layout[1]
    assert is_pad[:n_tiles].any()  # the layout really has padding patches to crop
    one_hot = torch.eye(4 * (1 + P * P))  # every image token in turn
    totals = ag.tiles_to_grid(one_hot, aid, (height, width), tile, patch, 4, supported).sum(dim=(1, 2)).view(4, 1 + P * P)
    assert (totals[:, 0] == 0).all()  # CLS tokens
    for t in range(4):
        for py in range(P):
            for px in range(P):
                total = float(totals[t, 1 + py * P + px])
                if t >= n_tiles or is_pad[t, py, px]:
                    assert total == 0, (layout, t, py, px)
                else:
                    assert total > 0, (layout, t, py, px)


def test_uniform_attention_gives_uniform_map():
    # uniform mass over the real (non-padding) patches -> a flat 32x32 map: the crop is exact
    supported = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    attn = torch.zeros(4, 17)
    attn[:3, 1:] = 1.0  # 1x3 layout, 4x4 patches per tile
    grid = ag.tiles_to_grid(attn.flatten(), 3, (56, 168), 56, 14, 4, supported)  # no padding: 168 = 3*56
    assert torch.allclose(grid, torch.ones(32, 32))


# ---- aggregations on small hand-computed tensors ----

def test_simple_aggregations_worked_example():
    maps = torch.tensor([[1.0, 3.0], [5.0, 7.0]]).view(2, 2, 1, 1)  # (L, H, 1, 1): layer 0 heads 1, 3; layer 1 heads 5, 7
    expect = {"max-max": 7.0, "max-mean": 5.0, "mean-max": 6.0, "mean-mean": 4.0, "learn": 4.0}
    for name, value in expect.items():
        assert float(ag.aggregate(maps, name)) == value, name


def test_flow_worked_example():
    a1 = torch.tensor([0.5, 0.5]).view(1, 2)
    a2 = torch.tensor([0.8, 0.2]).view(1, 2)
    maps = torch.stack([a1, a2])  # (L=2, h=1, w=2)
    assert torch.allclose(ag.flow(maps, multiply=True), torch.tensor([[0.8, 0.2]]))
    assert torch.allclose(ag.flow(maps, multiply=False), torch.tensor([[0.65, 0.35]]))
    # flow-* average the heads first: two heads [1, 0] and [0, 1] on layer 1 -> [.5, .5]
    heads = torch.stack([torch.stack([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]), torch.stack([a2, a2])])
    assert torch.allclose(ag.aggregate(heads, "flow-multi"), torch.tensor([[0.8, 0.2]]))
    # no underflow over 8 layers of near-uniform maps over 6400 patches
    many = torch.full((8, 80, 80), 1 / 6400)
    many[:, 3, 4] *= 2
    out = ag.flow(many, multiply=True)
    assert torch.isfinite(out).all() and int(out.argmax()) == 3 * 80 + 4


def test_flow_weights_and_merge_rows():
    rows = torch.tensor([[3, 4, -1]])
    r = ag.flow_weights(rows, torch.ones(1, 5))
    assert torch.allclose(r, torch.tensor([[0.8, 1.0, 0.0]]))
    maps = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 4.0), torch.full((2, 2), 100.0)])[None]  # (1, R=3, 2, 2)
    row_word = torch.tensor([[0, 0, -1]])  # rows 0 and 1 are one word (two tokens); row 2 is padding
    assert torch.allclose(ag.merge_rows(maps, row_word, 1), torch.full((1, 1, 2, 2), 2.5))
    weighted = ag.merge_rows(maps, row_word, 1, r)  # (0.8 * 1 + 1.0 * 4) / 1.8
    assert torch.allclose(weighted, torch.full((1, 1, 2, 2), 4.8 / 1.8))


# ---- words ----

def test_match_exact_vs_root():
    assert ag.normalize_word("Circle,") == "circle"
    assert ag.match_words(["circles", "Red", "the"], ["red", "circle"], "exact") == [None, 0, None]
    assert ag.match_words(["circles", "Red", "the"], ["red", "circle"], "root") == [1, 0, None]
    assert ag.match_words(["running"], ["runs"], "root") == [0]
    assert ag.match_words(["running"], ["runs"], "exact") == [None]


def test_plan_words_multi_token_and_positions(tiny):
    _, processor, batch = tiny
    tok = processor.tokenizer
    plan = ag.plan_words(tok, batch["input_ids"], batch["labels"], [["a", "red", "circle"], ["circle"]], "exact")
    ids = batch["input_ids"][0]
    # sample 0, "a red circle": "red" and "circle" are two tokens each in the tiny BPE -> rows merged
    assert plan["words"][0] == ["a", "red", "circle"]
    assert plan["dm_index"][0].tolist() == [0, 1, 2]
    for w, word in enumerate(["a", "red", "circle"]):
        rows = plan["rows"][0][plan["row_word"][0] == w]
        # the rows are the positions before the word's tokens (teacher forcing: row t-1 predicts token t)
        assert tok.decode(ids[rows + 1]).strip() == word
    assert int((plan["row_word"][0] == 1).sum()) == 2  # "re" "d"
    # sample 1, "two circles" vs DM word "circle": no exact match, a root match
    assert plan["words"][1] == [] and (plan["dm_index"][1] == -1).all() and (plan["row_word"][1] == -1).all()
    root = ag.plan_words(tok, batch["input_ids"], batch["labels"], [None, ["circle"]], "root")
    assert root["words"] == [[], ["circles"]] and root["dm_index"][1].tolist() == [0]
    rows = root["rows"][1][root["row_word"][1] == 0]
    assert tok.decode(batch["input_ids"][1][rows + 1]).strip() == "circles"


def test_plan_words_repeated_word_is_one_word(tiny):
    _, processor, _ = tiny
    img = Image.new("RGB", (56, 56))
    batch = make_batch(processor, [(img, "what shape is red?", "a circle and a square")])
    plan = ag.plan_words(processor.tokenizer, batch["input_ids"], batch["labels"], [["a", "square"]])
    assert plan["words"] == [["a", "square"]]
    assert int((plan["row_word"][0] == 0).sum()) == 2  # both "a" occurrences, merged


# ---- capture ----

def test_hooks_leave_logits_bit_identical(tiny):
    model, processor, batch = tiny
    plan = ag.plan_words(processor.tokenizer, batch["input_ids"], batch["labels"], [["a", "red", "circle"], ["circle"]])
    with torch.no_grad():
        ref = model(**model_inputs(batch)).logits
        with ag.AttentionCapture(model, ag.aligned_layers(model)) as capture:
            capture.set_rows(plan["rows"])
            out = model(**model_inputs(batch)).logits
            assert capture.probs.shape[:4] == (2, 2, 4, plan["rows"].shape[1])
    assert torch.equal(ref, out)


def test_capture_equals_eager_output_attentions(tiny):
    model, processor, batch = tiny
    rows = torch.tensor([[30, 33, 36], [25, 34, -1]])  # includes a padding row
    layers = ag.aligned_layers(model)
    with torch.no_grad(), ag.AttentionCapture(model, layers) as capture:
        capture.set_rows(rows)
        model(**model_inputs(batch))  # SDPA: the model itself returns no weights
        probs = capture.probs  # (B, L, H, R, N)
        model.set_attn_implementation("eager")
        try:
            ref = model(**model_inputs(batch), output_attentions=True).attentions
        finally:
            model.set_attn_implementation("sdpa")
    for i, layer in enumerate(layers):
        for b in range(2):
            for r, t in enumerate(rows[b].tolist()):
                expect = ref[layer][b, :, t] if t >= 0 else torch.zeros_like(probs[b, i, :, r])
                assert torch.allclose(probs[b, i, :, r], expect, atol=1e-6), (layer, b, t)
    assert torch.allclose(probs[0].sum(-1), torch.ones(2, 4, 3))


def test_learned_copy_equals_pretrained_at_init(tiny):
    model, processor, batch = tiny
    model2, _ = train.tiny_vlm()
    model2.load_state_dict(model.state_dict())
    layers = ag.aligned_layers(model2)
    new = ag.add_parallel_projections(model2, layers, init="copy")
    assert len(new) == 2 * len(layers) and all(p.weight.requires_grad for p in new)
    rows = torch.tensor([[30, 33], [25, 34]])
    with torch.no_grad():
        with ag.AttentionCapture(model2, layers) as plain:
            plain.set_rows(rows)
            model2(**model_inputs(batch))
            a = plain.probs
        ref = model2(**model_inputs(batch)).logits
        with ag.AttentionCapture(model2, layers, learned=True) as learned:
            learned.set_rows(rows)
            logits = model2(**model_inputs(batch)).logits
            a_d = learned.probs
    assert torch.allclose(a, a_d, atol=1e-6)
    assert torch.equal(ref, logits)  # the parallel attention is computed beside the model, not in it
    ag.add_parallel_projections(model2, layers, init="random")
    with torch.no_grad(), ag.AttentionCapture(model2, layers, learned=True) as learned:
        learned.set_rows(rows)
        model2(**model_inputs(batch))
        assert not torch.allclose(a, learned.probs, atol=1e-3)


def _att_loss(model, processor, batch, capture, aggregation, aligner, mode):
    plan = ag.plan_words(processor.tokenizer, batch["input_ids"], batch["labels"], [["a", "red", "circle"], ["circle"]])
    capture.set_rows(plan["rows"])
    out = model(**model_inputs(batch), labels=batch["labels"])
    maps = ag.vlm_word_maps(capture, plan, batch, aggregation, aligner, mode)  # (B, W, 32, 32)
    target = torch.rand_like(maps)
    return out.loss, attention_loss(maps, target, plan["dm_index"] >= 0), maps


def test_gradients_reach_aligner_lora_and_parallel_projections():
    model, processor = train.tiny_vlm()
    batch = make_batch(processor, [(Image.new("RGB", (120, 40), (200, 10, 10)), "what colour is the circle?", "a red circle"),
                                   (Image.new("RGB", (56, 56)), "what shape is red?", "two circles")])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    model = get_peft_model(model, config)
    for module in model.modules():  # LoRA B starts at 0; perturb so both LoRA factors get gradients
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    layers = ag.aligned_layers(model)
    ag.add_parallel_projections(model, layers, init="copy")
    aligner = Aligner("sim", aligner_channels("mean-mean", "per-layer", 4))
    # the pretrained-attention path: the attention loss alone reaches the Aligner and LoRA on q_proj
    with ag.AttentionCapture(model, layers) as capture:
        _, loss_att, maps = _att_loss(model, processor, batch, capture, "mean-mean", aligner, "per-layer")
        assert maps.shape == (2, 3, 32, 32) and maps.min() >= 0 and maps.max() <= 1
        loss_att.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aligner.parameters())
    attn = ag.cross_attention(model, layers[0])
    assert attn.q_proj.lora_A["default"].weight.grad.abs().sum() > 0
    assert attn.q_proj.lora_B["default"].weight.grad.abs().sum() > 0
    assert attn.lavender_q_proj.weight.grad is None  # not used by the pretrained path
    # the learned path (eq. 15-16): the attention loss reaches the parallel projections
    model.zero_grad()
    with ag.AttentionCapture(model, layers, learned=True) as capture:
        _, loss_att, _ = _att_loss(model, processor, batch, capture, "learn", None, "per-layer")
        loss_att.backward()
    for layer in layers:
        attn = ag.cross_attention(model, layer)
        assert attn.lavender_q_proj.weight.grad.abs().sum() > 0
        assert attn.lavender_k_proj.weight.grad.abs().sum() > 0


def test_learned_capture_with_bf16_frozen_weights_and_fp32_projections():
    """One GPU without FSDP (python train.py on a GPU): frozen weights in bf16, trained ones (LoRA,
    parallel projections) in fp32, as train.build sets them up; the learned capture must take the
    bf16 hidden states into its fp32 projections, and the loss reach them. On the CPU here."""
    model, processor = train.tiny_vlm()
    model = get_peft_model(model.to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    layers = ag.aligned_layers(model)
    ag.add_parallel_projections(model, layers, init="copy")
    train.trainable_in_float32(model)
    attn = ag.cross_attention(model, layers[0])
    assert attn.lavender_q_proj.weight.dtype == torch.float32 and attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    batch = make_batch(processor, [(Image.new("RGB", (56, 56), (200, 10, 10)), "what colour is the circle?", "a red circle")])
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with ag.AttentionCapture(model, layers, learned=True) as capture:
        _, loss_att, maps = _att_loss(model, processor, batch, capture, "learn", None, "per-layer")
        assert torch.isfinite(maps).all()
        loss_att.backward()
    assert attn.lavender_q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("learned", [False, True])
def test_gradient_checkpointing_gives_the_same_maps_and_gradients(learned):
    grads, maps = [], []
    for checkpointing in (False, True):
        model, processor = train.tiny_vlm()
        batch = make_batch(processor, [(Image.new("RGB", (120, 40), (200, 10, 10)), "what colour is the circle?", "a red circle")])
        layers = ag.aligned_layers(model)
        ag.add_parallel_projections(model, layers, init="copy")
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        calls = []  # cross-attention forwards: twice per layer when checkpointing recomputes in backward
        counter = ag.cross_attention(model, layers[0]).register_forward_hook(lambda *a: calls.append(1))
        with ag.AttentionCapture(model, layers, learned=learned) as capture:
            loss_vlm, loss_att, m = _att_loss(model, processor, batch, capture, "learn" if learned else "max-mean", None, None)
            (loss_vlm + 10 * loss_att).backward()
            maps.append(m.detach())
        counter.remove()
        assert len(calls) == (2 if checkpointing else 1)
        attn = ag.cross_attention(model, layers[0])
        grads.append((attn.lavender_q_proj if learned else attn.q_proj).weight.grad.clone())
    assert torch.allclose(maps[0], maps[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_aligner_after_mode_and_no_aligned_word(tiny):
    model, processor, batch = tiny
    layers = ag.aligned_layers(model, "last")
    assert layers == [3] and ag.aligned_layers(model, "first") == [1]
    with ag.AttentionCapture(model, layers) as capture:
        plan = ag.plan_words(processor.tokenizer, batch["input_ids"], batch["labels"], [["zebra"], None])
        assert plan["rows"].shape == (2, 0)
        capture.set_rows(plan["rows"])
        model(**model_inputs(batch))
        aligner = Aligner("light", aligner_channels("flow-sum", "after", 4))
        maps = ag.vlm_word_maps(capture, plan, batch, "flow-sum", aligner, "after")
        assert maps.shape == (2, 0, 32, 32)
        loss = attention_loss(maps, torch.zeros_like(maps), plan["dm_index"] >= 0)
        assert float(loss.detach()) == 0.0 and loss.requires_grad


FSDP_SCRIPT = r"""
import sys, tempfile
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from peft import LoraConfig, get_peft_model
from PIL import Image
import aggregate as ag, train
from test_aggregate import make_batch, model_inputs
dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
results = []
for shard in (False, True):
    model, processor = train.tiny_vlm()
    batch = make_batch(processor, [(Image.new("RGB", (120, 40), (200, 10, 10)), "what colour is the circle?", "a red circle")])
    model = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    assert hasattr(ag.cross_attention(model, 1).q_proj, "lora_A"), "LoRA did not wrap q_proj"
    layers = ag.aligned_layers(model)
    ag.add_parallel_projections(model, layers)  # after PEFT, before fully_shard
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if shard:  # each decoder / encoder layer is a unit, then the root
        for m in model.modules():
            if type(m).__name__ in ("MllamaVisionEncoderLayer", "MllamaCrossAttentionDecoderLayer",
                                    "MllamaSelfAttentionDecoderLayer"):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.train()
    plan = ag.plan_words(processor.tokenizer, batch["input_ids"], batch["labels"], [["a", "red", "circle"]])
    with ag.AttentionCapture(model, layers, learned=True) as capture:
        capture.set_rows(plan["rows"])
        out = model(**model_inputs(batch), labels=batch["labels"])
        maps = ag.vlm_word_maps(capture, plan, batch, "learn")
        (out.loss + 10 * ((maps - 0.5) ** 2).mean()).backward()
    grad = ag.cross_attention(model, layers[0]).lavender_q_proj.weight.grad
    results.append((maps.detach(), grad.full_tensor() if hasattr(grad, "full_tensor") else grad))
assert torch.allclose(results[0][0], results[1][0], atol=1e-6), "maps differ under FSDP2"
assert torch.allclose(results[0][1], results[1][1], atol=1e-6) and results[0][1].abs().sum() > 0, "grads differ"
dist.destroy_process_group()
print("FSDP2 OK")
"""


def test_capture_under_fsdp2_lora_and_checkpointing(tmp_path):
    """fully_shard per layer (1 process, gloo) + LoRA + non-reentrant checkpointing: same maps and
    gradients of the parallel projections as unsharded. A subprocess keeps the process group
    out of the other tests."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and "FSDP2 OK" in run.stdout, run.stderr[-3000:]


def _tiles_first_reference(probs, plan, batch, geometry, aggregation, aligner, mode):
    """The pipeline in its textbook order: every row's and head's tiles rebuilt, then rows merged,
    then aggregated (or the Aligner per layer / after), as vlm_word_maps did before it merged first."""
    maps = ag.image_maps(probs, batch, geometry)  # (B, L, H, R, 32, 32)
    weights = ag.flow_weights(plan["rows"], batch["attention_mask"]) if aggregation.startswith("flow") else None
    words = ag.merge_rows(maps, plan["row_word"], plan["dm_index"].shape[1], weights)  # (B, L, H, W, 32, 32)
    B, L, H, W = words.shape[:4]
    if aligner is not None and mode == "per-layer":
        y = aligner(words.transpose(2, 3).reshape(B * L * W, H, 32, 32)).view(B, L, W, 32, 32)
        return ag.min_max(ag.combine_layers(y.transpose(1, 2), aggregation))
    out = ag.aggregate(words.permute(0, 3, 1, 2, 4, 5), aggregation)  # (B, W, 32, 32)
    if aligner is not None:
        out = aligner(out.reshape(B * W, 1, 32, 32)).view(B, W, 32, 32)
    return ag.min_max(out)


@pytest.mark.parametrize("mode", ["none", "per-layer", "after"])
def test_merge_and_head_mean_before_tiles_equal_tiles_first(mode, monkeypatch):
    """vlm_word_maps merges rows (and averages heads for mean-over-heads aggregations) on the image-
    token probabilities before rebuilding tiles; the maps and gradients equal the tiles-first order,
    for every aggregation, two layouts with padding, multi-row words, a padding row."""
    geometry = (56, 14, 4, [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)])
    monkeypatch.setattr(ag, "vision_geometry", lambda model: geometry)
    batch = dict(aspect_ratio_ids=torch.tensor([[6], [2]]), image_sizes=torch.tensor([[100, 90], [40, 100]]),
                 attention_mask=torch.ones(2, 12, dtype=torch.long))
    plan = dict(rows=torch.tensor([[3, 4, 5, 6, 7, -1], [2, 3, 4, 5, 6, 7]]),
                row_word=torch.tensor([[0, 0, 1, 2, 1, -1], [0, 1, 1, 0, 2, 2]]), dm_index=torch.tensor([[0, 1, 2]] * 2))
    B, L, H, R, N = 2, 3, 4, 6, 4 * 17
    for aggregation in ag.AGGREGATIONS:
        torch.manual_seed(0)
        aligner = None if mode == "none" else Aligner("sim", aligner_channels(aggregation, mode, H))
        scores = torch.randn(B, L, H, R, N, requires_grad=True)
        probs = torch.softmax(scores, dim=-1) * (plan["rows"] >= 0)[:, None, None, :, None]
        capture = type("Capture", (), dict(probs=probs, learned=aggregation == "learn", model=None))()
        ours = ag.vlm_word_maps(capture, plan, batch, aggregation, aligner, "per-layer" if mode == "none" else mode)
        ref = _tiles_first_reference(probs, plan, batch, geometry, aggregation, aligner, mode)
        assert ours.shape == (B, 3, 32, 32) and torch.allclose(ours, ref, atol=1e-5), aggregation
        w = torch.rand(B, 3, 32, 32)
        g_ours, = torch.autograd.grad((ours * w).sum(), scores, retain_graph=True)  # probs is shared
        g_ref, = torch.autograd.grad((ref * w).sum(), scores)
        assert torch.allclose(g_ours, g_ref, atol=1e-5 * g_ref.abs().max()), aggregation


def test_recompute_gives_the_same_maps_and_gradients(monkeypatch):
    """recompute=True (per-layer Aligner under checkpoint, layer by layer) = recompute=False."""
    geometry = (56, 14, 4, [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)])
    monkeypatch.setattr(ag, "vision_geometry", lambda model: geometry)
    batch = dict(aspect_ratio_ids=torch.tensor([[7]]), image_sizes=torch.tensor([[150, 40]]),
                 attention_mask=torch.ones(1, 9, dtype=torch.long))
    plan = dict(rows=torch.tensor([[2, 3, 5, 6]]), row_word=torch.tensor([[0, 0, 1, 1]]), dm_index=torch.tensor([[0, 1]]))
    torch.manual_seed(0)
    aligner = Aligner("sim", 4)
    scores = torch.randn(1, 3, 4, 4, 4 * 17, requires_grad=True)
    outs, grads = [], []
    for recompute in (False, True):
        capture = type("Capture", (), dict(probs=torch.softmax(scores, dim=-1), learned=False, model=None))()
        out = ag.vlm_word_maps(capture, plan, batch, "mean-max", aligner, "per-layer", recompute=recompute)
        outs.append(out)
        grads.append(torch.autograd.grad((out * torch.linspace(0, 1, out.numel()).view(out.shape)).sum(),
                                         [scores, *aligner.parameters()]))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max()) and b.abs().sum() > 0
    # BatchNorm: one call over every layer's maps (statistics across layers), as the textbook order
    bn = Aligner("sim", 4, norm="batch")
    capture = type("Capture", (), dict(probs=torch.softmax(scores, dim=-1), learned=False, model=None))()
    ours = ag.vlm_word_maps(capture, plan, batch, "mean-max", bn, "per-layer")
    ref = _tiles_first_reference(capture.probs, plan, batch, geometry, "mean-max", bn, "per-layer")
    assert torch.allclose(ours, ref, atol=1e-5)
    with pytest.raises(ValueError, match="norm='instance'"):
        ag.vlm_word_maps(capture, plan, batch, "mean-max", Aligner("sim", 4, norm="batch"), "per-layer", recompute=True)
