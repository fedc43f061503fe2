"""The Flamingo-style family (flamingo.py, `tiny-idefics`): capture against the module's own eager
weights, the image geometry with and without the resampler, prompts, LoRA targets, and one
`torchrun --nproc_per_node 2` FSDP2 run against one rank (about 15 s). Nothing is downloaded.
Run: python -m pytest -q tests/test_idefics.py
"""
import json

import pytest
import torch
from conftest import write_dataset
from PIL import Image
from test_train import run, same_steps, torchrun

import aggregate as ag
import data
import flamingo
import models
import runs
import train
from capture import answer_rows


QA = [("what colour is the circle?", "red circle"), ("how many?", "two")]


def batch_of(processor, tmp_path):
    """Two items with noise images of two sizes, and their training batch."""
    items = [dict(id=f"i{i}", image_path=str(tmp_path / f"i{i}.png"), question=q, answer=a)
             for i, (q, a) in enumerate(QA)]
    for i, item in enumerate(items):
        Image.effect_noise((90, 40 + 30 * i), 64).convert("RGB").save(item["image_path"])
    return items, data.collate(processor, items)


def eager_rows(model, inputs, layers, rows):
    """The cross-attention modules' own eager weights (IdeficsAttention returns them under "eager";
    output_attentions gives self-attention only), at the captured rows: (B, L, H, R, N)."""
    model.set_attn_implementation("eager")
    got = {}
    hooks = [models.attention_module(model, layer).register_forward_hook(
        lambda m, args, out, layer=layer: got.__setitem__(layer, out[1])) for layer in layers]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    model.set_attn_implementation("sdpa")
    ref = torch.stack([got[layer] for layer in layers], dim=1)  # (B, L, H, T, N)
    at = rows.clamp(min=0)[:, None, None, :, None]  # (B, 1, 1, R, 1)
    idx = at.expand(*ref.shape[:3], rows.shape[1], ref.shape[-1])
    return ref.gather(3, idx) * (rows >= 0)[:, None, None, :, None]


@pytest.mark.parametrize("resampler,qk_norms", [(False, False), (True, False), (False, True)],
                         ids=["patches", "resampler", "qk-norms"])
def test_capture_equals_the_modules_eager_weights(tmp_path, resampler, qk_norms):
    """Hooks on q_proj / k_proj (or q_layer_norm / k_layer_norm) and the image mask give the gated
    cross-attention's own eager softmax rows (1e-5), under SDPA, leaving the logits unchanged; with
    init="copy" the parallel attention A_d (eq. 15-16) equals them too."""
    model, processor = models.tiny_idefics(resampler=resampler, qk_norms=qk_norms)
    model.eval()
    items, batch = batch_of(processor, tmp_path)
    rows = answer_rows(batch["labels"])
    layers = ag.aligned_layers(model)
    inputs = data.model_inputs(batch)
    assert layers == [0, 1] and rows.shape[1] > 0
    with torch.no_grad():
        plain = model(**inputs).logits
        with ag.AttentionCapture(model, layers) as capture:
            capture.set_rows(rows)
            assert torch.equal(model(**inputs).logits, plain)
            probs = capture.probs  # (B, L, H, R, N)
    keys = 16 if resampler else 1 + 4 * 4  # latents, or CLS + 4 x 4 patches
    assert probs.shape == (2, 2, 4, rows.shape[1], keys)
    assert (probs - eager_rows(model, inputs, layers, rows)).abs().max() < 1e-5
    ag.add_parallel_projections(model, layers, init="copy")
    with torch.no_grad(), ag.AttentionCapture(model, layers, learned=True) as learned:
        learned.set_rows(rows)
        model(**inputs)
        assert (learned.probs - probs).abs().max() < 1e-5


def test_a_known_patch_lands_on_its_cell_and_latents_fill_a_square():
    """No resampler: a one-hot on patch (r, c) of the 4 x 4 grid lights exactly the 8 x 8 block of
    the 32 x 32 map at (r, c), and CLS lights nothing (the whole image is stretched to the square,
    as the DM's image is). Resampler: latent j of 16 sits at (j // 4, j % 4), the paper's square."""
    patches = flamingo.vision_geometry(models.tiny_idefics(resampler=False)[0])
    assert (patches["tokens"], patches["patches"]) == (17, 4)
    one_hot = torch.eye(17).view(1, 1, 1, 17, 17)  # row k: all mass on key k
    maps = ag.image_maps(one_hot, {}, patches)[0, 0, 0]  # (17, 32, 32)
    assert maps[0].abs().sum() == 0  # CLS
    for r in range(4):
        for c in range(4):
            block = torch.zeros(32, 32)
            block[8 * r:8 * r + 8, 8 * c:8 * c + 8] = 1
            assert torch.allclose(maps[1 + 4 * r + c], block)
    latents = flamingo.vision_geometry(models.tiny_idefics(resampler=True)[0])
    assert (latents["tokens"], latents["patches"]) == (16, None)
    maps = ag.image_maps(torch.eye(16).view(1, 1, 1, 16, 16), {}, latents)[0, 0, 0]  # (16, 32, 32)
    peaks = [divmod(int(m.argmax()), 32) for m in maps]
    assert peaks[5] == (8, 8) and maps[5, 8:16, 8:16].min() == 1
    # the docstring's worked examples: a square count is only reshaped, another interpolated first
    assert flamingo.latents_to_square(torch.tensor([1., 2, 3, 4])).tolist() == [[1, 2], [3, 4]]
    assert flamingo.latents_to_square(torch.tensor([0., 3])).tolist() == [[0, 1], [2, 3]]
    # IDEFICS-9B, OpenFlamingo
    assert flamingo.latents_to_square(torch.rand(2, 64)).shape == (2, 8, 8)


def test_prompts_labels_and_the_image_mask(tmp_path):
    """The instruct dialogue: labels are the answer and its <end_of_utterance>; every answer row
    sees the image; encode() (tokens counted before step 1) gives the batch's tokens; an item
    holding the end-of-sequence token, after which IDEFICS' tokens no longer see the image, is
    refused by name."""
    _, processor = models.tiny_idefics()
    items, batch = batch_of(processor, tmp_path)
    tok = processor.tokenizer
    for b, item in enumerate(items):
        answer = batch["labels"][b][batch["labels"][b] != -100]
        assert tok.decode(answer) == " " + item["answer"] + flamingo.END_OF_UTTERANCE
        ids = batch["input_ids"][b][batch["attention_mask"][b] == 1]
        assert tok.decode(ids).startswith("<s>User:" + flamingo.IMAGE_TOKENS + item["question"])
        assert torch.equal(data.encode(processor, item)[0][0], ids)
        assert batch["image_attention_mask"][b, batch["labels"][b] != -100, 0].all()
    prompts = data.collate(processor, items, with_answer=False)
    assert (prompts["attention_mask"][:, -1] == 1).all()  # left padded for generate()
    bad = dict(items[1], answer="two</s>", line=2)
    with pytest.raises(ValueError, match="item 'i1': its answer 'two</s>' holds '</s>'"):
        data.collate(processor, [items[0], bad])
    problem = data.check_item(bad, processor)[0]
    assert problem.startswith("item 'i1' (line 2): its answer 'two</s>' holds '</s>'")


def test_lora_targets_the_language_model_and_idefics_needs_its_weights(monkeypatch):
    args = train.build_parser().parse_args(["--model", "tiny-idefics"])
    model = train.apply_peft(models.tiny_idefics()[0], args)
    wrapped = {n.split(".lora_A")[0].removeprefix("base_model.model.model.")
               for n, _ in model.named_parameters() if "lora_A" in n}
    # no vision tower, no perceiver
    assert wrapped == {f"{part}.{i}.{attn}.{proj}" for part, attn, n in
                       (("layers", "self_attn", 4), ("gated_cross_attn_layers", "cross_attn", 2))
                       for i in range(n) for proj in ("q_proj", "v_proj")}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="HuggingFaceM4/idefics-9b-instruct.*--model-path"):
        models.load_vlm("idefics")


def test_a_save_pretrained_folder_loads_with_its_processor(tmp_path):
    """--model-path (and a --peft full run's model/): the same weights, the same batches, and
    generation still stops at <end_of_utterance>."""
    model, processor = models.tiny_idefics()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    loaded, loaded_processor = models.load_vlm("tiny-idefics", str(tmp_path / "m"))
    pairs = zip(model.state_dict().values(), loaded.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    items, batch = batch_of(processor, tmp_path)
    again = data.collate(loaded_processor, items)
    keys = ("input_ids", "pixel_values", "image_attention_mask", "labels")
    assert all(torch.equal(batch[k], again[k]) for k in keys)
    stop = processor.tokenizer.convert_tokens_to_ids(flamingo.END_OF_UTTERANCE)
    assert stop in loaded.generation_config.eos_token_id


def test_two_ranks_match_one_rank_and_the_adapter_reloads(tmp_path):
    """torchrun 2 ranks x batch 1 (FSDP2 over gloo, activation checkpointing) == 1 rank x 2
    accumulated micro-batches for 3 Lavender steps of tiny-idefics (resampler); the LoRA adapter
    and Aligner reload with runs.load_run and give the trained model's logits."""
    dataset = write_dataset(tmp_path / "data")
    flags = ["--model", "tiny-idefics", "--lora-dropout", "0", "--lr", "1e-3", "--batch-size", "1",
             "--max-steps", "3"]
    one_dir, one = run(dataset, tmp_path / "one", "--grad-accum", "2", *flags)
    two = torchrun(dataset, tmp_path / "two", "--activation-checkpointing", *flags)
    same_steps(one, two)
    model, processor, lavender, config = runs.load_run(tmp_path / "two")
    reference, _, _, _ = runs.load_run(one_dir)
    assert (models.family(model) == "idefics" and lavender["aligner"] is not None
            and config["world"] == 2)
    adapter = json.loads((tmp_path / "two" / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == flamingo.LORA_TARGETS
    inputs = data.model_inputs(data.collate(processor, data.read_items(dataset)[:2]))
    with torch.no_grad():
        logits = model(**inputs).logits
        assert torch.allclose(logits, reference(**inputs).logits, atol=1e-4)
        base = models.tiny_idefics()[0](**inputs).logits
        assert not torch.allclose(logits, base, atol=1e-4)  # it trained


def test_evaluation_with_its_own_maps_as_targets(tmp_path):
    """evaluate.py end to end on tiny-idefics: its own answer maps written as the 'DM' store give an
    alignment MSE of ~0 (float16 storage), so words and maps pair up; with the resampler the maps
    have no positions, so no VLM pointing is reported, while the DM's is."""
    import evaluate as E
    dataset = write_dataset(tmp_path / "data", n=3)
    model, processor = models.load_vlm("tiny-idefics")
    items = data.read_items(dataset)
    flags = ["--model", "tiny-idefics", "--data", dataset, "--quiet"]
    own_args = E.build_parser().parse_args([*flags, "--out", str(tmp_path)])
    own, _ = E.capture_settings(None, model, own_args)
    attn = tmp_path / "data" / "attn"
    dm_store = {it["id"]: data.load_maps(data.maps_path(attn, it["id"]))[:2] for it in items}
    lines = []
    answer_maps = E.answer_maps(model.eval(), processor, items, dm_store, own, show=False)
    for it, m in zip(items, answer_maps):
        data.save_maps(tmp_path / "own" / f"{it['id']}.safetensors", m["own"], m["words"],
                       {"dm": "own", "text": it["answer"]})
        lines.append(json.dumps({k: it[k] for k in ("id", "image", "question", "answer")} |
                                {"boxes": {w: [0, 0, 4, 4] for w in m["words"]}}))
    (tmp_path / "data" / "data.jsonl").write_text("\n".join(lines) + "\n")
    args = E.build_parser().parse_args([*flags, "--attn", str(tmp_path / "own"), "--out",
                                        str(tmp_path / "report"), "--max-new-tokens", "2"])
    report = E.evaluate(args)
    run = report["runs"][0]
    assert run["matched_words"] > 0 and run["alignment_mse"]["mean"] < 1e-6
    assert run["pointing"] is None and report["dm"]["pointing"]["n"] == run["matched_words"]
