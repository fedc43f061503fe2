"""aggregate.py: capture, tiles, aggregations, words. CPU, tiny Mllama from models.tiny_vlm(), no
download.

    python -m pytest -q tests/test_aggregate.py
"""
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image

import aggregate as ag
import data
import mllama
import models
import train
from aligner import Aligner, aligner_channels, attention_loss
from capture import answer_rows

# (rows, cols) of tiles -> an image (width, height) that the 56 px processor tiles so, each leaving
# at least one whole row or column of 14 px patches as padding
LAYOUT_SIZES = {
    (1, 1): (56, 30), (1, 2): (112, 40), (2, 1): (40, 112), (1, 3): (150, 40),
    (3, 1): (40, 150), (1, 4): (224, 40), (4, 1): (40, 224), (2, 2): (112, 80)}


def make_batch(processor, items):
    """items: [(PIL image, question, answer)] -> processor batch + labels (answer tokens) +
    image_sizes."""
    texts = [processor.apply_chat_template([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
        {"role": "assistant", "content": [{"type": "text", "text": a}]}]) for _, q, a in items]
    images = [[im] for im, _, _ in items]
    batch = dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
    labels = torch.full_like(batch["input_ids"], -100)
    for b, (_, q, a) in enumerate(items):
        question = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}
        prompt = processor.apply_chat_template([question], add_generation_prompt=True)
        start = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        n = int(batch["attention_mask"][b].sum())
        labels[b, start:n] = batch["input_ids"][b, start:n]
    batch["labels"] = labels
    batch["image_sizes"] = torch.tensor([[im.height, im.width] for im, _, _ in items])
    return batch


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("labels", "image_sizes")}


def label_plan(tokenizer, batch, dm_words, match="exact"):
    """The plan of the label words: every answer row captured, each read for the token it
    predicts."""
    return ag.label_plan(tokenizer, batch["input_ids"], batch["labels"], dm_words, match)[1]


@pytest.fixture(scope="module")
def tiny():
    model, processor = models.tiny_vlm()
    # non-zero gates so that the cross-attention layers change the logits (random init: 0)
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
        # the grey levels of the real processor output
        tiles = out["pixel_values"][0, 0].mean(1)  # (4, 56, 56)
        per_patch = tiles.unfold(1, patch, patch).unfold(2, patch, patch)  # (4, P, P, 14, 14)
        t, py, px = np.unravel_index(int(per_patch.amax(dim=(-2, -1)).argmax()), (4, P, P))
        attn = torch.zeros(4 * (1 + P * P))
        # all mass on the brightest patch (CLS is index 0)
        attn[t * (1 + P * P) + 1 + py * P + px] = 1.0
        grid = ag.tiles_to_grid(attn, aid, (height, width), tile, patch, 4, supported)  # (32, 32)
        assert grid.shape == (32, 32)
        # the map is the patch's footprint on the original image: its centroid is within half a
        # patch (in original pixels) of the block, and the block's cells are covered
        ys, xs = (torch.arange(32) + 0.5) / 32 * height, (torch.arange(32) + 0.5) / 32 * width
        w = grid / grid.sum()
        cen_y, cen_x = float((w.sum(1) * ys).sum()), float((w.sum(0) * xs).sum())
        # LAYOUT_SIZES images are upscaled or kept (never shrunk): a patch spans <= 14 original px
        half = patch / 2 + max(height, width) / 32
        near = abs(cen_y - (y0 + 0.5)) <= half and abs(cen_x - (x0 + 0.5)) <= half
        assert near, (layout, cy, cx, cen_y, cen_x)
        # the cells under the block
        cells_y = slice(int((y0 - 1) / height * 32), int((y0 + 1) / height * 32) + 1)
        cells_x = slice(int((x0 - 1) / width * 32), int((x0 + 1) / width * 32) + 1)
        assert grid[cells_y, cells_x].max() > 0
    # padding: a patch entirely in the processor's padding (normalised 0 everywhere) maps to
    # nothing, a patch entirely inside the image maps to something; padding tiles and CLS too map
    # to nothing
    pad_value = float(((0 - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)).mean())
    processed = out["pixel_values"][0, 0]  # (4, 3, 56, 56): the last image's tiles
    per_patch = processed.unfold(2, patch, patch).unfold(3, patch, patch)  # (4, 3, P, P, 14, 14)
    is_pad = (per_patch - pad_value).abs().amax(dim=(1, 4, 5)) < 1e-4  # (4, P, P)
    n_tiles = layout[0] * layout[1]
    assert is_pad[:n_tiles].any()  # the layout really has padding patches to crop
    one_hot = torch.eye(4 * (1 + P * P))  # every image token in turn
    grids = ag.tiles_to_grid(one_hot, aid, (height, width), tile, patch, 4, supported)
    totals = grids.sum(dim=(1, 2)).view(4, 1 + P * P)
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
    # no padding: 168 = 3 * 56
    grid = ag.tiles_to_grid(attn.flatten(), 3, (56, 168), 56, 14, 4, supported)
    assert torch.allclose(grid, torch.ones(32, 32))


# ---- aggregations on small hand-computed tensors ----

def test_simple_aggregations_worked_example():
    # (L, H, 1, 1): layer 0 heads 1, 3; layer 1 heads 5, 7
    maps = torch.tensor([[1.0, 3.0], [5.0, 7.0]]).view(2, 2, 1, 1)
    expect = {"max-max": 7.0, "max-mean": 5.0, "mean-max": 6.0, "mean-mean": 4.0, "learn": 4.0}
    for name, value in expect.items():
        assert float(ag.aggregate(maps, name)) == value, name


def test_flow_worked_example():
    a1 = torch.tensor([0.5, 0.5]).view(1, 2)
    a2 = torch.tensor([0.8, 0.2]).view(1, 2)
    maps = torch.stack([a1, a2])  # (L=2, h=1, w=2)
    assert torch.allclose(ag.flow(maps, multiply=True), torch.tensor([[0.8, 0.2]]))
    assert torch.allclose(ag.flow(maps, multiply=False), torch.tensor([[0.65, 0.35]]))
    # flow-* flow each head over the layers, then average the heads (the release keeps a flow per
    # head): heads [1, 0] and [0, 1] on layer 1, both [.8, .2] on layer 2 -> multi [1, 0] and [0, 1]
    # -> [.5, .5]; sum [.9, .1] and [.4, .6] -> [.65, .35]
    layer_1 = torch.stack([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])])
    heads = torch.stack([layer_1, torch.stack([a2, a2])])
    assert torch.allclose(ag.aggregate(heads, "flow-multi"), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(ag.aggregate(heads, "flow-sum"), torch.tensor([[0.65, 0.35]]))
    # no underflow over 8 layers of near-uniform maps over 6400 patches
    many = torch.full((8, 80, 80), 1 / 6400)
    many[:, 3, 4] *= 2
    out = ag.flow(many, multiply=True)
    assert torch.isfinite(out).all() and int(out.argmax()) == 3 * 80 + 4


def test_flow_weights_and_merge_rows():
    rows = torch.tensor([[3, 4, -1]])
    r = ag.flow_weights(rows, torch.ones(1, 5))
    assert torch.allclose(r, torch.tensor([[0.8, 1.0, 0.0]]))
    per_row = [torch.full((2, 2), 1.0), torch.full((2, 2), 4.0), torch.full((2, 2), 100.0)]
    maps = torch.stack(per_row)[None]  # (1, R=3, 2, 2)
    # rows 0 and 1 are one word (two tokens); row 2 is padding
    row_word = torch.tensor([[0, 0, -1]])
    assert torch.allclose(ag.merge_rows(maps, row_word, 1), torch.full((1, 1, 2, 2), 2.5))
    weighted = ag.merge_rows(maps, row_word, 1, r)  # (0.8 * 1 + 1.0 * 4) / 1.8
    assert torch.allclose(weighted, torch.full((1, 1, 2, 2), 4.8 / 1.8))


# ---- words ----

def test_match_exact_vs_root():
    assert data.normalize_word("Circle,") == "circle"
    exact = data.match_words(["circles", "Red", "the"], ["red", "circle"], "exact")
    assert exact == [None, 0, None]
    assert data.match_words(["circles", "Red", "the"], ["red", "circle"], "root") == [1, 0, None]
    assert data.match_words(["running"], ["runs"], "root") == [0]
    assert data.match_words(["running"], ["runs"], "exact") == [None]


def test_plan_words_multi_token_and_positions(tiny):
    _, processor, batch = tiny
    tok = processor.tokenizer
    plan = label_plan(tok, batch, [["a", "red", "circle"], ["circle"]], "exact")
    ids = batch["input_ids"][0]
    rows = plan["rows"]
    # every answer token t's row t - 1 is captured (the closing <|eot_id|>'s too)
    answer = (batch["labels"][0] != -100).nonzero().flatten().tolist()
    assert rows[0][rows[0] >= 0].tolist() == [t - 1 for t in answer]
    # sample 0, "a red circle": "red", "circle" are two tokens each in the tiny BPE: rows merged
    assert plan["words"][0] == ["a", "red", "circle"]
    assert plan["dm_index"][0].tolist() == [0, 1, 2]
    for w, word in enumerate(["a", "red", "circle"]):
        word_rows = rows[0][plan["row_word"][0] == w]
        # the rows are the positions before the word's tokens (teacher forcing: t-1 predicts t)
        assert tok.decode(ids[word_rows + 1]).strip() == word
    assert int((plan["row_word"][0] == 1).sum()) == 2  # "re" "d"
    # sample 1, "two circles" vs DM word "circle": no exact match, a root match
    assert (plan["words"][1] == [] and (plan["dm_index"][1] == -1).all()
            and (plan["row_word"][1] == -1).all())
    root = label_plan(tok, batch, [None, ["circle"]], "root")
    assert root["words"] == [[], ["circles"]] and root["dm_index"][1].tolist() == [0]
    word_rows = rows[1][root["row_word"][1] == 0]
    assert tok.decode(batch["input_ids"][1][word_rows + 1]).strip() == "circles"


def test_predicted_words_follow_the_argmax(tiny):
    """§6 (5): a row is read for the word the model predicts there. Logits that predict the label
    everywhere give the label plan; predicting "blue" where the label says "red" leaves "red" out,
    and "blue" is aligned only if the DM has a map for it."""
    _, processor, batch = tiny
    tok = processor.tokenizer
    rows = answer_rows(batch["labels"])
    T, V = batch["input_ids"].shape[1], len(tok)
    logits = torch.zeros(2, T, V)
    # each position predicts the next token
    logits[:, :-1].scatter_(2, batch["input_ids"][:, 1:, None], 1.0)
    dm_words = [["a", "red", "circle", "blue"], None]
    predicted = ag.plan_words(tok, rows, ag.row_tokens(rows, batch["input_ids"], logits), dm_words)
    label = label_plan(tok, batch, dm_words)
    assert predicted["words"] == label["words"] == [["a", "red", "circle"], []]
    assert torch.equal(predicted["row_word"], label["row_word"])
    red = rows[0][label["row_word"][0] == 1]  # the two rows that predict "re" "d"
    blue = tok("blue", add_special_tokens=False)["input_ids"]
    wrong = logits.clone()
    wrong[0, red] = 0.0
    for r, t in zip(red.tolist(), (blue + blue)[:len(red)]):
        wrong[0, r, t] = 1.0
    plan = ag.plan_words(tok, rows, ag.row_tokens(rows, batch["input_ids"], wrong), dm_words)
    assert "red" not in plan["words"][0] and "circle" in plan["words"][0]
    with pytest.raises(ValueError, match="align_words"):
        ag.row_tokens(rows, batch["input_ids"], logits, "both")


def test_plan_words_repeated_word_is_one_word(tiny):
    _, processor, _ = tiny
    img = Image.new("RGB", (56, 56))
    batch = make_batch(processor, [(img, "what shape is red?", "a circle and a square")])
    plan = label_plan(processor.tokenizer, batch, [["a", "square"]])
    assert plan["words"] == [["a", "square"]]
    assert int((plan["row_word"][0] == 0).sum()) == 2  # both "a" occurrences, merged


@pytest.mark.parametrize("text", ["naïve café", "dog's bowl, don't", "über 25 mp3s",
                                  "t-shirt_blue"])
def test_both_sides_reach_the_same_words(tiny, text):
    """The VLM side (byte-level BPE ids -> answer_words) and the DM side (CLIP ->
    extract.text_words) split a text into the same words, also where a byte-level token ends
    inside a UTF-8 character and where CLIP splits clitics off; every token of a word's characters
    belongs to it."""
    import extract
    _, processor, _ = tiny
    tok = processor.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    vlm = data.answer_words(tok, ids)
    dm = extract.text_words(models.tiny_sd()["tokenizer"], text)[0]
    assert [w for w, _ in vlm] == [w for w, _, _ in data.split_words(text)]
    assert list(dict.fromkeys(w.lower() for w, _ in vlm)) == dm
    # the word's tokens decode to exactly the word (no byte left out)
    for word, toks in vlm:
        assert tok.decode([ids[t] for t in toks]).strip().lower() == word


def test_token_spans_keep_partial_characters_with_their_word(tiny):
    _, processor, _ = tiny
    tok = processor.tokenizer
    ids = tok("naïve", add_special_tokens=False)["input_ids"]
    text, spans = data.token_spans(tok, ids)
    # "ï" is two bytes, split over tokens in the tiny BPE
    assert text == "naïve" and len(ids) > 2
    assert spans[0][0] == 0 and spans[-1][1] == len(text) and all(a < b for a, b in spans)


# ---- capture ----

def test_hooks_leave_logits_bit_identical(tiny):
    model, processor, batch = tiny
    plan = label_plan(processor.tokenizer, batch, [["a", "red", "circle"], ["circle"]])
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
    model2, _ = models.tiny_vlm()
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
    # the parallel attention is computed beside the model, not in it
    assert torch.equal(ref, logits)
    ag.add_parallel_projections(model2, layers, init="random")
    with torch.no_grad(), ag.AttentionCapture(model2, layers, learned=True) as learned:
        learned.set_rows(rows)
        model2(**model_inputs(batch))
        assert not torch.allclose(a, learned.probs, atol=1e-3)


def _att_loss(model, processor, batch, capture, aggregation, aligner, mode):
    plan = label_plan(processor.tokenizer, batch, [["a", "red", "circle"], ["circle"]])
    capture.set_rows(plan["rows"])
    out = model(**model_inputs(batch), labels=batch["labels"])
    maps = ag.vlm_word_maps(capture, plan, batch, aggregation, aligner, mode)  # (B, W, 32, 32)
    target = torch.rand_like(maps)
    return out.loss, attention_loss(maps, target, plan["dm_index"] >= 0), maps


def test_gradients_reach_aligner_lora_and_parallel_projections():
    model, processor = models.tiny_vlm()
    red = (Image.new("RGB", (120, 40), (200, 10, 10)), "what colour is the circle?", "a red circle")
    black = (Image.new("RGB", (56, 56)), "what shape is red?", "two circles")
    batch = make_batch(processor, [red, black])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    model = get_peft_model(model, config)
    # LoRA B starts at 0; perturb so both LoRA factors get gradients
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    layers = ag.aligned_layers(model)
    ag.add_parallel_projections(model, layers, init="copy")
    aligner = Aligner("sim", aligner_channels("mean-mean", 4))
    # the pretrained-attention path: the attention loss alone reaches the Aligner and LoRA on q_proj
    with ag.AttentionCapture(model, layers) as capture:
        _, loss_att, maps = _att_loss(model, processor, batch, capture, "mean-mean", aligner,
                                      "per-layer")
        assert maps.shape == (2, 3, 32, 32) and maps.min() >= 0 and maps.max() <= 1
        loss_att.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aligner.parameters())
    attn = mllama.cross_attention(model, layers[0])
    assert attn.q_proj.lora_A["default"].weight.grad.abs().sum() > 0
    assert attn.q_proj.lora_B["default"].weight.grad.abs().sum() > 0
    assert attn.lavender_q_proj.weight.grad is None  # not used by the pretrained path
    # the learned path (eq. 15-16): the attention loss reaches the parallel projections
    model.zero_grad()
    with ag.AttentionCapture(model, layers, learned=True) as capture:
        _, loss_att, _ = _att_loss(model, processor, batch, capture, "learn", None, "per-layer")
        loss_att.backward()
    for layer in layers:
        attn = mllama.cross_attention(model, layer)
        assert attn.lavender_q_proj.weight.grad.abs().sum() > 0
        assert attn.lavender_k_proj.weight.grad.abs().sum() > 0


def test_learned_capture_with_bf16_frozen_weights_and_fp32_projections():
    """One GPU without FSDP (python train.py on a GPU): frozen weights in bf16, trained ones (LoRA,
    parallel projections) in fp32, as train.build sets them up; the learned capture must take the
    bf16 hidden states into its fp32 projections, and the loss reach them. On the CPU here."""
    model, processor = models.tiny_vlm()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    model = get_peft_model(model.to(torch.bfloat16), config)
    layers = ag.aligned_layers(model)
    ag.add_parallel_projections(model, layers, init="copy")
    train.trainable_in_float32(model)
    attn = mllama.cross_attention(model, layers[0])
    assert (attn.lavender_q_proj.weight.dtype == torch.float32
            and attn.q_proj.base_layer.weight.dtype == torch.bfloat16)
    red = (Image.new("RGB", (56, 56), (200, 10, 10)), "what colour is the circle?", "a red circle")
    batch = make_batch(processor, [red])
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
        model, processor = models.tiny_vlm()
        red = (Image.new("RGB", (120, 40), (200, 10, 10)), "what colour is the circle?",
               "a red circle")
        batch = make_batch(processor, [red])
        layers = ag.aligned_layers(model)
        ag.add_parallel_projections(model, layers, init="copy")
        if checkpointing:
            non_reentrant = {"use_reentrant": False}
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
        model.train()
        # cross-attention forwards: twice per layer when checkpointing recomputes in backward
        calls = []
        first = mllama.cross_attention(model, layers[0])
        counter = first.register_forward_hook(lambda *a: calls.append(1))
        aggregation = "learn" if learned else "max-mean"
        with ag.AttentionCapture(model, layers, learned=learned) as capture:
            loss_vlm, loss_att, m = _att_loss(model, processor, batch, capture, aggregation, None,
                                              "auto")
            (loss_vlm + 10 * loss_att).backward()
            maps.append(m.detach())
        counter.remove()
        assert len(calls) == (2 if checkpointing else 1)
        attn = mllama.cross_attention(model, layers[0])
        grads.append((attn.lavender_q_proj if learned else attn.q_proj).weight.grad.clone())
    assert torch.allclose(maps[0], maps[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_aligner_after_mode_and_no_aligned_word(tiny):
    model, processor, batch = tiny
    layers = ag.aligned_layers(model, "last")
    assert layers == [3] and ag.aligned_layers(model, "first") == [1]
    with ag.AttentionCapture(model, layers) as capture:
        plan = label_plan(processor.tokenizer, batch, [["zebra"], None])
        assert plan["dm_index"].shape == (2, 0) and (plan["row_word"] == -1).all()
        capture.set_rows(plan["rows"])
        model(**model_inputs(batch))
        aligner = Aligner("light", aligner_channels("flow-sum", 4))
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
import aggregate as ag, mllama, models
from test_aggregate import label_plan, make_batch, model_inputs
dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
results = []
for shard in (False, True):
    model, processor = models.tiny_vlm()
    red = (Image.new("RGB", (120, 40), (200, 10, 10)), "what colour is the circle?", "a red circle")
    batch = make_batch(processor, [red])
    config = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    model = get_peft_model(model, config)
    assert hasattr(mllama.cross_attention(model, 1).q_proj, "lora_A"), "LoRA did not wrap q_proj"
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
    plan = label_plan(processor.tokenizer, batch, [["a", "red", "circle"]])
    with ag.AttentionCapture(model, layers, learned=True) as capture:
        capture.set_rows(plan["rows"])
        out = model(**model_inputs(batch), labels=batch["labels"])
        maps = ag.vlm_word_maps(capture, plan, batch, "learn")
        (out.loss + 10 * ((maps - 0.5) ** 2).mean()).backward()
    grad = mllama.cross_attention(model, layers[0]).lavender_q_proj.weight.grad
    results.append((maps.detach(), grad.full_tensor() if hasattr(grad, "full_tensor") else grad))
assert torch.allclose(results[0][0], results[1][0], atol=1e-6), "maps differ under FSDP2"
same_grads = torch.allclose(results[0][1], results[1][1], atol=1e-6)
assert same_grads and results[0][1].abs().sum() > 0, "grads differ"
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
    path = os.pathsep.join([os.path.dirname(here), here])
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0 and "FSDP2 OK" in run.stdout, run.stderr[-3000:]
