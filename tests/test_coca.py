"""CoCa: attentional poolers, the multimodal decoder, loss weights, generation with a KV cache, CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlm_lab
from vlm_lab.cli import main
from vlm_lab.errors import ConfigError
from vlm_lab.generation import CaptionGenerator, DecodingCache, GenerationSettings, SpecialTokens
from vlm_lab.heads import CocaCaptionHead

from conftest import TINY_CONFIG

COCA = ["model.caption_weight=1.0", "model.caption_head.layers=2", "model.caption_head.heads=2",
        "model.caption_head.image_queries=4"]


def coca(*overrides: str) -> vlm_lab.VisionLanguageModule:
    torch.manual_seed(0)
    return vlm_lab.build_module(vlm_lab.load_config(TINY_CONFIG, overrides=[*COCA, *overrides]))


@pytest.fixture(scope="module")
def module():
    """A tiny CoCa whose EOS logit swings strongly with the input, so captions end at varied lengths."""
    m = coca().eval()
    with torch.no_grad():
        eos = SpecialTokens.of(m.tokenizer).eos
        m.caption_head.output.weight[eos] *= 12
    return m


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def tokens_of(m, images, **settings):
    options = GenerationSettings.from_config(None, **settings)
    generator = CaptionGenerator(m.text, m.caption_head, SpecialTokens.of(m.tokenizer))
    return generator.generate(m.vision_tower_output(images).tokens, options)


# ------------------------------------------------------------------------------------------------
# Model


def test_weights_choose_the_parts_that_are_built():
    both = coca()
    assert both.caption_head is not None and both.loss is not None
    assert both.vision_head.in_dim == both.caption_head.width  # CoCa's 1-query pooler feeds the head
    caption_only = coca("model.contrastive_weight=0")
    assert caption_only.loss is None and caption_only.vision_head is None
    assert caption_only.caption_head.contrastive_pooler is None
    contrastive_only = coca("model.caption_weight=0")
    assert contrastive_only.caption_head is None
    with pytest.raises(ConfigError, match="both 0"):
        coca("model.caption_weight=0", "model.contrastive_weight=0")
    with pytest.raises(ConfigError, match="text_dim.*set by vlm-lab"):
        vlm_lab.load_config(TINY_CONFIG, overrides=[*COCA, "model.caption_head.text_dim=4"])


@pytest.mark.slow
def test_losses_are_the_weighted_sum_and_captioning_only_trains():
    m = coca("model.contrastive_weight=0.5", "model.caption_weight=2.0")
    batch = {"pixel_values": torch.randn(3, 3, 32, 32), **m.tokenize(["a red cube", "two blue balls", "a cube"]),
             "image_ids": torch.arange(3)}
    losses = m.losses(batch)
    assert losses["loss"].item() == pytest.approx(0.5 * losses["contrastive_loss"].item()
                                                  + 2.0 * losses["caption_loss"].item(), rel=1e-6)
    only = coca("model.contrastive_weight=0")
    loss = only.losses(batch)
    assert set(loss) == {"loss"}
    loss["loss"].backward()
    assert only.caption_head.layers[0].cross_attn.q_proj.weight.grad.abs().sum() > 0
    assert only.vision.embeddings.patch_embedding.weight.grad.abs().sum() > 0  # through the caption pooler


def test_caption_loss_is_shifted_cross_entropy_ignoring_padding():
    head = CocaCaptionHead(in_dim=8, out_dim=11, text_dim=8, layers=1, heads=2, image_queries=2)
    logits = torch.randn(2, 4, 11)
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    expected = F.cross_entropy(torch.stack([logits[0, 0], logits[0, 1], logits[0, 2], logits[1, 0], logits[1, 1]]),
                               torch.tensor([5, 6, 2, 7, 2]))
    assert head.caption_loss(logits, ids, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    smooth = CocaCaptionHead(in_dim=8, out_dim=11, text_dim=8, layers=1, heads=2, image_queries=2, label_smoothing=0.1)
    assert smooth.caption_loss(logits, ids, mask).item() == pytest.approx(F.cross_entropy(
        torch.stack([logits[0, 0], logits[0, 1], logits[0, 2], logits[1, 0], logits[1, 1]]),
        torch.tensor([5, 6, 2, 7, 2]), label_smoothing=0.1).item(), rel=1e-6)


def test_decoder_is_causal_and_cached_states_match(module):
    image = module.caption_head.pool_caption(torch.randn(2, 17, 32))
    ids = torch.randint(1000, 2000, (2, 7))
    full = module.caption_head.decode(module.text(ids).tokens, image)
    changed = ids.clone()
    changed[:, 5] = 3000
    assert torch.allclose(module.caption_head.decode(module.text(changed).tokens, image)[:, :5], full[:, :5])
    cache = DecodingCache()
    steps = [module.caption_head.decode(module.text(ids[:, :3], cache=cache.text).tokens, image, cache.decoder)]
    steps += [module.caption_head.decode(module.text(ids[:, t:t + 1], cache=cache.text).tokens, image, cache.decoder)
              for t in range(3, 7)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.slow
def test_tied_output_embedding_and_grad_checkpointing():
    tied = coca("model.caption_head.tie_embedding=true")
    assert tied.caption_head.output.weight is tied.text.embeddings.token_embedding.weight
    with pytest.raises(ConfigError, match="tie_embedding needs width"):
        coca("model.caption_head.tie_embedding=true", "model.caption_head.width=16")
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), **tied.tokenize(["a red cube", "two balls"]),
             "image_ids": torch.arange(2)}
    grads = []
    for checkpointing in (False, True):
        m = coca(f"model.caption_head.grad_checkpointing={str(checkpointing).lower()}").train()
        m.losses(batch)["loss"].backward()
        grads.append(m.caption_head.layers[0].self_attn.q_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_decoder_dropout_draws_only_in_training(images):
    batch = {"pixel_values": images[:4], **coca().tokenize(["a red cube", "two balls", "a cat", "a blue disc"]),
             "image_ids": torch.arange(4)}
    plain, dropped = coca(), coca("model.caption_head.dropout=0.3")
    assert dropped.caption_head.layers[0].self_attn.dropout == 0.3
    # Dropout has no weights: the same seed builds the same model, with the same state dict keys.
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), dropped.state_dict().values()))

    def caption_loss(m, train, seed=7):
        m.train(train)
        torch.manual_seed(seed)
        with torch.no_grad():
            return m.losses(batch)["caption_loss"]

    # dropout 0 (the default) draws nothing: training computes what evaluation does, bit for bit,
    # and leaves torch's random stream where it was.
    torch.manual_seed(7)
    state = torch.get_rng_state()
    assert torch.equal(caption_loss(plain, train=True), caption_loss(plain, train=False))
    plain.train()
    with torch.no_grad():
        plain.losses(batch)
    assert torch.equal(torch.get_rng_state(), state)
    # dropout > 0 changes training (the same masks for the same seed, others for another) but not evaluation.
    assert not torch.equal(caption_loss(dropped, train=True), caption_loss(plain, train=True))
    assert torch.equal(caption_loss(dropped, train=True), caption_loss(dropped, train=True))
    assert not torch.equal(caption_loss(dropped, train=True, seed=8), caption_loss(dropped, train=True))
    assert torch.equal(caption_loss(dropped, train=False), caption_loss(plain, train=False))
    assert torch.equal(tokens_of(dropped.eval(), images), tokens_of(plain.eval(), images))
    with pytest.raises(ConfigError, match=r"dropout must be in \[0, 1\), got 1.0"):
        coca("model.caption_head.dropout=1.0")


def test_a_bidirectional_text_tower_is_refused():
    spec = "model.text={name: hf_text, config: {model_type: bert, hidden_size: 32, num_hidden_layers: 1, " \
           "num_attention_heads: 2, intermediate_size: 64, vocab_size: 30522}}"
    with pytest.raises(ConfigError, match="causal text tower"):
        coca(spec)


# ------------------------------------------------------------------------------------------------
# Generation


@pytest.mark.slow
def test_greedy_equals_beam_search_with_one_beam(module, images):
    greedy = tokens_of(module, images, max_new_tokens=12)
    lengths = (greedy != SpecialTokens.of(module.tokenizer).pad).sum(1)
    assert len(set(lengths.tolist())) > 1  # EOS handling is exercised: rows end at different steps
    assert torch.equal(tokens_of(module, images, max_new_tokens=12, num_beams=1), greedy)
    beam = CaptionGenerator(module.text, module.caption_head, SpecialTokens.of(module.tokenizer))
    tokens = module.vision_tower_output(images).tokens
    assert torch.equal(beam._beam_search(torch.full((6, 1), beam.special.bos), module.caption_head.pool_caption(tokens),
                                         GenerationSettings(max_new_tokens=12, num_beams=1)), greedy)


@pytest.mark.parametrize("settings", [
    {},
    {"num_beams": 3, "length_penalty": 0.6},
    {"do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 0.7, "seed": 3},
    {"repetition_penalty": 1.5, "min_new_tokens": 4},
    {"num_beams": 3, "no_repeat_ngram_size": 2},
])
@pytest.mark.slow
def test_cached_and_uncached_decoding_give_identical_tokens(module, images, settings):
    cached = tokens_of(module, images, max_new_tokens=10, **settings)
    assert torch.equal(tokens_of(module, images, max_new_tokens=10, use_cache=False, **settings), cached)


def repeated_ngrams(row: list[int], size: int, eos: int) -> int:
    """How many of a caption's n-grams (up to its EOS) occurred earlier in it."""
    row = row[:row.index(eos)] if eos in row else row
    grams = [tuple(row[i:i + size]) for i in range(len(row) - size + 1)]
    return len(grams) - len(set(grams))


@pytest.mark.parametrize("beams", [1, 3])
def test_no_repeat_ngram_size_keeps_every_ngram_of_a_caption_unique(module, images, beams):
    eos = SpecialTokens.of(module.tokenizer).eos
    free = tokens_of(module, images, max_new_tokens=16, num_beams=beams, min_new_tokens=16)
    assert sum(repeated_ngrams(row, 1, eos) for row in free.tolist()) > 0  # the untrained model repeats tokens
    banned = tokens_of(module, images, max_new_tokens=16, num_beams=beams, min_new_tokens=16, no_repeat_ngram_size=1)
    assert [repeated_ngrams(row, 1, eos) for row in banned.tolist()] == [0] * len(images)


def test_a_negative_no_repeat_ngram_size_is_refused():
    with pytest.raises(ConfigError, match="no_repeat_ngram_size must be 0"):
        GenerationSettings.from_config({"no_repeat_ngram_size": -1}, where="model.generation")


@pytest.mark.parametrize("part", ["mlp", "self_attn", "layer"])
def test_a_change_in_a_text_tower_layer_reaches_training_and_decoding_alike(module, images, part, monkeypatch):
    """Decoding runs the tower's own layers (with a cache), so no change to them can leave it behind."""
    batch = {"pixel_values": images[:3], **module.tokenize(["a red cube", "two blue balls", "a cube"]),
             "image_ids": torch.arange(3)}
    with torch.no_grad():
        before_loss = module.losses(batch)["loss"]
    before = tokens_of(module, images, max_new_tokens=8)
    layer = module.text.encoder.layers[0]

    def plant(output):  # a shift that differs across channels: no LayerNorm downstream undoes it
        return output + torch.linspace(-1.0, 1.0, output.shape[-1])

    if part == "mlp":  # planted in the layer's MLP
        forward = layer.mlp.forward
        monkeypatch.setattr(layer.mlp, "forward", lambda hidden: plant(forward(hidden)))
        handle = None
    else:  # or in the attention's output, or in the whole layer's
        handle = getattr(layer, part, layer).register_forward_hook(lambda _, __, output: plant(output))
    try:
        with torch.no_grad():
            after_loss = module.losses(batch)["loss"]
        cached = tokens_of(module, images, max_new_tokens=8)
        uncached = tokens_of(module, images, max_new_tokens=8, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    assert not torch.allclose(after_loss, before_loss)  # training sees the change ...
    assert not torch.equal(cached, before)  # ... and so does decoding,
    assert torch.equal(cached, uncached)  # with and without the cache alike


@pytest.mark.slow
def test_sampling_is_deterministic_for_a_seed_and_lengths_are_bounded(module, images):
    sample = {"do_sample": True, "top_k": 50, "seed": 7, "max_new_tokens": 9}
    first = tokens_of(module, images, **sample)
    assert torch.equal(tokens_of(module, images, **sample), first)
    assert not torch.equal(tokens_of(module, images, **{**sample, "seed": 8}), first)
    assert first.shape[1] <= 10 and (first[:, 0] == SpecialTokens.of(module.tokenizer).bos).all()
    special = SpecialTokens.of(module.tokenizer)
    at_least = tokens_of(module, images, min_new_tokens=5, max_new_tokens=9)
    assert not (at_least[:, 1:6] == special.eos).any()
    after_eos = torch.cumsum(at_least == special.eos, dim=1) > 0
    assert ((at_least == special.pad) | (at_least == special.eos) | ~after_eos).all()  # padded after EOS


def test_beam_search_finds_a_likelier_caption_than_greedy(module, images):
    def log_likelihood(ids):
        logits = module.caption_head.decode(module.text(ids).tokens,
                                            module.caption_head.pool_caption(module.vision_tower_output(images).tokens))
        logp = logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        real = torch.cumsum(ids[:, 1:] == SpecialTokens.of(module.tokenizer).eos, 1) - \
            (ids[:, 1:] == SpecialTokens.of(module.tokenizer).eos).long() == 0
        return (logp * real).sum(1)

    with torch.no_grad():
        greedy = tokens_of(module, images, max_new_tokens=6)
        beam = tokens_of(module, images, max_new_tokens=6, num_beams=4, length_penalty=0.0)
        assert (log_likelihood(beam) >= log_likelihood(greedy) - 1e-4).all()


def test_generation_settings_errors():
    with pytest.raises(ConfigError, match="Did you mean 'num_beams'"):
        GenerationSettings.from_config(None, num_beam=2)
    with pytest.raises(ConfigError, match="num_beams=1 only"):
        GenerationSettings.from_config(None, num_beams=2, do_sample=True)


# ------------------------------------------------------------------------------------------------
# Training, evaluation and the command line


@pytest.mark.slow
def test_fit_test_and_caption_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    args = [TINY_CONFIG, *COCA, "model.generation.max_new_tokens=6", "model.generation.max_images=8",
            "trainer.log_every_n_steps=1",
            "--run-dir", str(run)]
    assert main(["fit", *args]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/bleu4", "val/cider", "val/i2t_R@1", "val/loss", "val/caption_loss", "val/contrastive_loss"} <= set(metrics)
    logged = (run / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "train/caption_loss" in logged and "train/contrastive_loss" in logged
    ckpt = run / "checkpoints" / "last.ckpt"
    assert main(["test", TINY_CONFIG, *COCA, f"ckpt_path={ckpt}", "--run-dir", str(tmp_path / "test")]) == 0
    tested = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert 0 <= tested["test/bleu4"] <= 1 and tested["test/cider"] >= 0
    assert "test/bleu4" in capsys.readouterr().out
    # decoding settings come from the config evaluated with, not from the checkpoint
    evaluated = vlm_lab.api._module_to_evaluate(
        vlm_lab.load_config(TINY_CONFIG, overrides=[*COCA, "model.generation.num_beams=3"]), str(ckpt))
    assert evaluated.hparams.model["generation"]["num_beams"] == 3

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
    assert main(["caption", "--ckpt", str(ckpt), *paths, "--num-beams", "2", "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == paths
    module = vlm_lab.VisionLanguageModule.load_from_checkpoint(str(ckpt), weights_only=True)
    from vlm_lab.data.collate import image_to_tensor

    pixels = torch.stack([image_to_tensor(Image.open(p), module.image_config) for p in paths])
    assert [line.split("\t")[1] for line in lines] == module.generate(pixels, num_beams=2, max_new_tokens=5)
    assert main(["caption", "--ckpt", str(ckpt), *paths, "--num-beams", "2", "--max-new-tokens", "5",
                 "--no-repeat-ngram-size", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == module.generate(pixels, num_beams=2, max_new_tokens=5,
                                                                       no_repeat_ngram_size=1)
    assert main(["caption", "--ckpt", str(ckpt), str(tmp_path / "missing.png")]) == 2
