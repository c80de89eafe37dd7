"""Distillation from a teacher CLIP (``model.distill``; vlm_lab/distillation.py): the term equals
open_clip's ``DistillClipLoss`` (up to a constant), the student trains on its loss plus the weighted
term, and the teacher stays out of the student's parameters, state dict and checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import vlm_lab
from interop_helpers import perturb, save_checkpoint
from vlm_lab.cli import main
from vlm_lab.distillation import TeacherCache, teacher_pixels
from vlm_lab.errors import ConfigError
from vlm_lab.interop import export, load_teacher
from vlm_lab.losses import SimilarityDistillation
from vlm_lab.towers.base import ImageConfig

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
# The teacher differs from the student in image size, image mean/std and embedding size.
TEACHER = ["model.vision.image_size=48", "model.vision.image_mean=[0.5,0.5,0.5]", "model.vision.image_std=[0.25,0.25,0.25]",
           "model.embed_dim=24"]
CAPTIONS = ["two small red circles left of a blue square", "a green cross", "a yellow triangle above a white circle",
            "three large purple squares"]


def build(*overrides: str, seed: int = 0) -> vlm_lab.VisionLanguageModule:
    torch.manual_seed(seed)
    return vlm_lab.build_module(vlm_lab.load_config(TINY, overrides=list(overrides)))


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> str:
    teacher = build(*TEACHER, seed=1)
    perturb(teacher, seed=2)  # a teacher with opinions of its own
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    save_checkpoint(teacher, path)
    return str(path)


def batch() -> dict:
    module = build()
    tokens = module.tokenize(CAPTIONS)
    return {"pixel_values": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
            "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
            "image_ids": torch.arange(4), "captions": list(CAPTIONS)}


# --------------------------------------------------------------------------------------------------
# The term


def test_the_term_is_open_clips_distill_loss_less_the_teachers_entropy():
    open_clip = pytest.importorskip("open_clip")
    generator = torch.Generator().manual_seed(0)
    image, text = (F.normalize(torch.randn(6, 8, generator=generator), dim=-1).requires_grad_() for _ in range(2))
    teacher_image, teacher_text = (F.normalize(torch.randn(6, 12, generator=generator), dim=-1) for _ in range(2))
    scale, teacher_scale = torch.tensor(14.0, requires_grad=True), torch.tensor(30.0)

    ours = SimilarityDistillation()(image, text, scale, teacher_image, teacher_text, teacher_scale)
    _, theirs = open_clip.loss.DistillClipLoss()(image, text, scale, teacher_image, teacher_text, teacher_scale)
    teacher_logits = teacher_scale * teacher_image @ teacher_text.T
    entropy = sum(-(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean() for logits in (teacher_logits, teacher_logits.T)) / 2
    assert ours.item() == pytest.approx((theirs - entropy).item(), abs=1e-6) and ours.item() > 0.01
    ours_grads = torch.autograd.grad(ours, (image, text, scale))
    theirs_grads = torch.autograd.grad(theirs, (image, text, scale))
    for a, b in zip(ours_grads, theirs_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_term_is_zero_when_the_student_agrees_with_the_teacher():
    features = F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(20.0)
    assert SimilarityDistillation()(features, features.flip(0), scale, features, features.flip(0), scale).item() \
        == pytest.approx(0.0, abs=1e-6)


def test_teacher_pixels_are_the_students_pixels_in_the_teachers_terms():
    student = ImageConfig(size=(32, 32), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    teacher = ImageConfig(size=(48, 48), mean=(0.5,) * 3, std=(0.25,) * 3)
    values = torch.rand(2, 3, 32, 32)
    normalised = (values - torch.tensor(student.mean).view(3, 1, 1)) / torch.tensor(student.std).view(3, 1, 1)
    assert teacher_pixels(normalised, student, student) is normalised  # same terms: untouched
    expected = F.interpolate(values, size=(48, 48), mode="bicubic", antialias=True).clamp(0, 1)
    expected = (expected - 0.5) / 0.25
    assert torch.allclose(teacher_pixels(normalised, student, teacher), expected, atol=1e-5)
    uint8 = (values * 255).round().to(torch.uint8)
    same_size = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.equal(teacher_pixels(uint8, student, same_size), (uint8.float() / 255 - 0.5) / 0.25)


# --------------------------------------------------------------------------------------------------
# The student and its teacher


def test_the_student_trains_on_its_loss_plus_the_weighted_term(teacher_checkpoint):
    student = build(f"model.distill.teacher={teacher_checkpoint}", "model.distill.weight=0.5")
    plain = build()
    assert student.state_dict().keys() == plain.state_dict().keys()  # the teacher is not part of the student
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in plain.parameters())

    data = batch()
    losses = student.losses(data)
    assert set(losses) == {"loss", "contrastive_loss", "distill_loss"}
    assert losses["loss"].item() == pytest.approx(losses["contrastive_loss"].item() + 0.5 * losses["distill_loss"].item())
    assert losses["contrastive_loss"].item() == pytest.approx(plain.losses(data)["loss"].item())  # otherwise as before

    teacher = load_teacher(teacher_checkpoint)  # what the student's teacher computes, by hand
    with torch.no_grad():
        image = teacher.encode_image(teacher_pixels(data["pixel_values"], student.image_config, teacher.image_config))
        text = teacher.encode_text(CAPTIONS)
        expected = SimilarityDistillation()(student.encode_image(data["pixel_values"]), student.encode_text(CAPTIONS),
                                            student.loss.logit_scale_value(), image, text,
                                            teacher.loss.logit_scale_value())
    assert losses["distill_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_term_is_the_same_with_chunked_contrastive_steps(teacher_checkpoint):
    """optim.contrastive_chunks (gradient caching): the term is computed on the whole batch's features,
    so a chunked step gives the same losses and gradients."""
    data = batch()
    results = []
    for chunks in (1, 2):
        student = build(f"model.distill.teacher={teacher_checkpoint}", f"optim.contrastive_chunks={chunks}")
        losses = student.losses(data)
        losses["loss"].backward()
        results.append(({k: v.item() for k, v in losses.items()},
                        {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
    (losses, grads), (chunked_losses, chunked_grads) = results
    assert losses == pytest.approx(chunked_losses, abs=1e-6) and losses["distill_loss"] > 0
    assert grads.keys() == chunked_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(chunked_grads[name], grad, atol=1e-5 * max(1.0, grad.abs().max().item())), name


def test_a_fit_distils_and_its_checkpoints_hold_only_the_student(teacher_checkpoint, tmp_path):
    cfg = vlm_lab.load_config(TINY, overrides=[f"model.distill.teacher={teacher_checkpoint}",
                                               "trainer.log_every_n_steps=1", "trainer.max_epochs=1"])
    vlm_lab.fit(cfg, run_dir=tmp_path / "run")
    with open(next((tmp_path / "run" / "logs").rglob("metrics.csv"))) as f:
        logged = [float(row["train/distill_loss"]) for row in csv.DictReader(f) if row.get("train/distill_loss")]
    assert len(logged) == 4 and all(value > 0 for value in logged)  # 64 images, batches of 16
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"].keys() == build().state_dict().keys()
    reloaded = vlm_lab.VisionLanguageModule.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert reloaded._teacher is None  # evaluation needs no teacher
    # The teacher never trained: its weights are the checkpoint's.
    teacher_weights = torch.load(teacher_checkpoint, weights_only=True)["state_dict"]
    student = vlm_lab.build_module(cfg)
    assert all(torch.equal(value, teacher_weights[key]) for key, value in student._teacher.module.state_dict().items())


def test_a_locked_student_tower_reads_pixels_when_an_uncached_teacher_needs_them(teacher_checkpoint, tmp_path):
    cfg = vlm_lab.load_config(TINY, overrides=[f"model.distill.teacher={teacher_checkpoint}", "model.distill.cache=false",
                                               "model.vision_lock.lock=true", "trainer.max_steps=2"])
    module = vlm_lab.build_module(cfg)
    assert module.vision_locked.fully_locked and not module.vision_outputs_cacheable
    trainer = vlm_lab.api.build_trainer(cfg, tmp_path / "run")
    trainer.fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
    cache = next(c for c in trainer.callbacks if type(c).__name__ == "LockedTowerCache")
    assert cache.report == {}  # not cached: the batches carried pixels for the teacher


def test_a_teacher_from_a_clip_folder(tmp_path):
    source = build(*TEACHER, seed=3)
    perturb(source, seed=4)
    export(source, "open_clip", tmp_path / "teacher")
    teacher = load_teacher(str(tmp_path / "teacher"))
    pixels = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(teacher.encode_image(pixels), source.eval().encode_image(pixels), atol=1e-5)
        assert torch.allclose(teacher.encode_text(CAPTIONS), source.encode_text(CAPTIONS), atol=1e-5)
    student = build(f"model.distill.teacher={tmp_path / 'teacher'}")
    assert student.losses(batch())["distill_loss"].item() > 0


# --------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("overrides, message", [
    (["model.distill.teacher=/no/such/teacher"], "model.distill.teacher: no checkpoint file or CLIP folder at /no/such"),
    (["model.distill.teacher=TEACHER", "model.distill.weight=0"], "model.distill.weight=0 should be above 0"),
    (["model.distill.teachr=x"], "unknown config key 'model.distill.teachr'. Did you mean 'teacher'?"),
    (["model.distill.teacher=TEACHER", "model.caption_weight=1", "model.contrastive_weight=0"],
     "model.distill distils image-text similarities, which a captioning-only model"),
    (["model.distill.teacher=TINY"], "model.distill.teacher: .*tiny.yaml is not a vlm-lab checkpoint"),
])
def test_bad_distillation_settings_are_one_line(teacher_checkpoint, overrides, message):
    overrides = [o.replace("TEACHER", teacher_checkpoint).replace("TINY", TINY) for o in overrides]
    with pytest.raises(ConfigError, match=message) as error:
        vlm_lab.build_module(vlm_lab.load_config(TINY, overrides=overrides))
    assert "\n" not in str(error.value)


def test_a_student_without_its_teacher_says_how_to_attach_it(teacher_checkpoint):
    cfg = vlm_lab.load_config(TINY, overrides=[f"model.distill.teacher={teacher_checkpoint}"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    student = vlm_lab.VisionLanguageModule(model=plain["model"], optim=plain["optim"])  # not build_module
    with pytest.raises(ConfigError, match="no teacher is attached; build the module with vlm_lab.build_module"):
        student.losses(batch())
    student.set_teacher(load_teacher(teacher_checkpoint))
    assert "distill_loss" in student.losses(batch())


def test_distillation_from_the_command_line(teacher_checkpoint, capsys, tmp_path):
    assert main(["check", TINY, f"model.distill.teacher={teacher_checkpoint}", "--run-dir", str(tmp_path)]) == 0
    assert main(["check", TINY, "model.distill.teacher=/no/such.ckpt", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint file or CLIP folder at /no/such.ckpt" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------------
# The teacher cache (model.distill.cache)


class TeacherCalls(L.Callback):
    """Teacher forward calls (vision and text towers) per training epoch, and what the batches held."""

    def __init__(self, teacher) -> None:
        self.per_epoch, self.batch_keys, self.epoch = [], set(), None
        for tower in (teacher.module.vision, teacher.module.text):
            tower.register_forward_hook(self.count)

    def count(self, *args) -> None:
        if self.epoch is not None:
            self.per_epoch[self.epoch] += 1

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch = len(self.per_epoch)
        self.per_epoch.append(0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_keys |= set(batch)


def distil(teacher_checkpoint: str, run_dir: Path, *overrides: str):
    """Fit the tiny student for two epochs with the teacher; return its weights, the teacher's calls per
    epoch, the batches' keys and the teacher cache's report."""
    cfg = vlm_lab.load_config(TINY, overrides=[f"model.distill.teacher={teacher_checkpoint}", "trainer.max_epochs=2",
                                               "trainer.enable_checkpointing=false", *overrides])
    L.seed_everything(0)
    module = vlm_lab.build_module(cfg)
    trainer = vlm_lab.api.build_trainer(cfg, run_dir)
    calls = TeacherCalls(module.teacher)
    trainer.callbacks.append(calls)
    trainer.fit(module, datamodule=vlm_lab.build_datamodule(cfg, module))
    cache = next((c for c in trainer.callbacks if isinstance(c, TeacherCache)), None)
    return module.state_dict(), calls, cache.report if cache else None


@pytest.mark.slow
def test_the_teacher_cache_gives_the_same_weights_and_no_teacher_calls_after_filling(teacher_checkpoint, tmp_path):
    plain, plain_calls, plain_report = distil(teacher_checkpoint, tmp_path / "plain", "model.distill.cache=false")
    cached, cached_calls, report = distil(teacher_checkpoint, tmp_path / "cached")

    assert plain.keys() == cached.keys()
    assert all(torch.equal(plain[key], cached[key]) for key in plain), "the cache changed the training"
    assert plain_calls.per_epoch == [8, 8] and plain_report == {}  # 4 batches x (vision + text) per epoch
    assert cached_calls.per_epoch == [0, 0]  # filled in setup, before the first epoch
    # 64 images; synthetic captions come with their paraphrase, some shared between images
    assert report["train"]["images"] == 64 and report["train"]["encoded_images"] == 64
    assert 64 < report["train"]["captions"] == report["train"]["encoded_captions"] <= 128
    assert "teacher_image_pooled" in cached_calls.batch_keys and "pixel_values" in cached_calls.batch_keys


@pytest.mark.slow
def test_with_a_locked_student_tower_both_caches_stand_in_for_the_pixels(teacher_checkpoint, tmp_path):
    locked = "model.vision_lock.lock=true"
    plain, plain_calls, _ = distil(teacher_checkpoint, tmp_path / "plain", locked, "model.distill.cache=false",
                                   "embedding_cache.enabled=false")
    cached, calls, report = distil(teacher_checkpoint, tmp_path / "cached", locked)
    assert all(torch.equal(plain[key], cached[key]) for key in plain)
    assert {"teacher_image_pooled", "vision_pooled"} <= calls.batch_keys and "pixel_values" not in calls.batch_keys
    assert plain_calls.per_epoch == [8, 8] and calls.per_epoch == [0, 0]
    assert report["train"]["encoded_images"] == 64


def stream_data(tmp_path: Path, workers: int, augment: bool = False) -> str:
    """cc3m-style shards (44 samples, one truncated JPEG and one empty caption among them)."""
    from test_embedding_cache_streams import write_source

    shards = write_source(tmp_path / "shards", 1, [24, 20], spoilt=True)
    return (f"data={{name: cc3m, train_shards: '{shards}', val_shards: '{shards}', batch_size: 8, shuffle_buffer: 16, "
            f"num_workers: {workers}, augment: {str(augment).lower()}}}")


@pytest.mark.slow
def test_the_teacher_cache_of_a_stream_reaches_the_loader_workers_and_changes_nothing(teacher_checkpoint, tmp_path):
    data = stream_data(tmp_path, workers=2)
    plain, plain_calls, _ = distil(teacher_checkpoint, tmp_path / "plain", data, "model.distill.cache=false")
    cached, calls, report = distil(teacher_checkpoint, tmp_path / "cached", data)
    assert all(torch.equal(plain[key], cached[key]) for key in plain)
    assert plain_calls.per_epoch == [12, 12] and calls.per_epoch == [0, 0]  # 6 batches an epoch
    # 44 samples: the empty caption's is left out, the truncated JPEG's row is unusable (the stream skips it)
    assert report["train"]["images"] == 44 and report["train"]["encoded_images"] == 42
    assert report["train"]["captions"] == 43  # all but the empty one (the truncated JPEG's caption reads as text)


def test_augmented_images_leave_the_teacher_running_with_one_line_saying_so(teacher_checkpoint, tmp_path, caplog):
    data = stream_data(tmp_path, workers=0, augment=True)
    with caplog.at_level("INFO", logger="vlm_lab.distillation"):
        _, calls, report = distil(teacher_checkpoint, tmp_path / "run", data, "trainer.max_epochs=1")
    assert report == {} and calls.per_epoch[0] == 12
    lines = [r.getMessage() for r in caplog.records if r.name == "vlm_lab.distillation"]
    assert lines == ["distillation: the train images are not cacheable (augmented, or a stream whose sample counts "
                     "are unknown); the teacher runs every step"]


def test_the_teacher_cache_setting_from_yaml_the_command_line_and_python(teacher_checkpoint, tmp_path, capsys):
    assert vlm_lab.load_config(TINY, overrides=[f"model.distill.teacher={teacher_checkpoint}"]).model.distill.cache
    yaml = tmp_path / "no_cache.yaml"
    yaml.write_text(f"model:\n  distill: {{teacher: {teacher_checkpoint}, cache: false}}\n")
    assert vlm_lab.load_config(TINY, yaml).model.distill.cache is False
    assert build(f"model.distill.teacher={teacher_checkpoint}", "model.distill.cache=false").distill.cache is False
    assert main(["check", TINY, f"model.distill.teacher={teacher_checkpoint}", "model.distill.cache=false",
                 "--run-dir", str(tmp_path)]) == 0
    assert main(["check", TINY, f"model.distill.teacher={teacher_checkpoint}", "model.distill.cache=maybe",
                 "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model.distill.cache" in err and err.count("\n") == 1


@pytest.mark.slow
def test_a_disk_teacher_cache_is_filled_once_and_reused_by_the_next_run(teacher_checkpoint, tmp_path):
    disk = ["embedding_cache.storage=disk", f"embedding_cache.dir={tmp_path / 'cache'}", "trainer.max_epochs=1"]
    first, _, report = distil(teacher_checkpoint, tmp_path / "first", *disk)
    assert report["train"]["encoded_images"] == 64 and report["train"]["encoded_captions"] > 64
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2  # images, and captions (keyed)
    second, calls, report = distil(teacher_checkpoint, tmp_path / "second", *disk)
    assert report["train"]["encoded_images"] == 0 and report["train"]["encoded_captions"] == 0
    assert calls.per_epoch == [0] and all(torch.equal(first[key], second[key]) for key in first)
