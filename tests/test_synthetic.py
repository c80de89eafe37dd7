import numpy as np
import pytest

from vlm_lab.data.synthetic import COLOURS, SyntheticShapes, all_compositions


def test_deterministic_given_a_seed():
    a, b = SyntheticShapes("train", 20, 64, seed=3), SyntheticShapes("train", 20, 64, seed=3)
    c = SyntheticShapes("train", 20, 64, seed=4)
    for i in range(20):
        assert a[i]["captions"] == b[i]["captions"]
        assert np.array_equal(np.asarray(a[i]["image"]), np.asarray(b[i]["image"]))
    assert any(a[i]["captions"] != c[i]["captions"] for i in range(20))


def test_evaluation_compositions_are_held_out_and_distinct():
    train = SyntheticShapes("train", 5000, 32)
    val = SyntheticShapes("val", 300, 32)
    test = SyntheticShapes("test", 300, 32)
    train_set = {train.composition(i) for i in range(len(train))}
    val_set = {val.composition(i) for i in range(len(val))}
    test_set = {test.composition(i) for i in range(len(test))}
    assert len(val_set) == 300 and len(test_set) == 300  # one caption per composition
    assert not train_set & val_set and not train_set & test_set and not val_set & test_set
    assert len(train_set) > 3000  # training still covers most compositions


def test_captions_describe_the_composition():
    composition = all_compositions()[0]
    assert composition.captions() == [
        "a small red circle left of a red square",
        "a red square right of a small red circle",
    ]
    crosses = [c for c in all_compositions() if c.count == 3 and c.shape == "cross"][0]
    assert "three" in crosses.captions()[0] and "crosses" in crosses.captions()[0]


def test_pixels_follow_the_caption():
    ds = SyntheticShapes("train", 40, 64, seed=1)
    checked = 0
    for index in range(len(ds)):
        composition = ds.composition(index)
        if composition.colour != composition.other_colour:  # else positions are not separable by colour
            check_pixels(composition, np.asarray(ds[index]["image"]).astype(int))
            checked += 1
    assert checked >= 20


def check_pixels(composition, pixels):
    def centre(colour):
        ys, xs = np.nonzero((np.abs(pixels - COLOURS[colour]).sum(-1) < 10))
        assert len(xs) > 0, f"no {colour} pixels"
        return xs.mean(), ys.mean()

    gx, gy = centre(composition.colour)
    ox, oy = centre(composition.other_colour)
    expected = {"left of": gx < ox, "right of": gx > ox, "above": gy < oy, "below": gy > oy}
    assert expected[composition.relation]


def test_datamodule_batches(tiny_module):
    from vlm_lab import registry

    dm = registry.build("datamodule", {"name": "synthetic_shapes", "batch_size": 8, "train_size": 16,
                                       "val_size": 8}, tokenizer=tiny_module.tokenizer,
                        image_config=tiny_module.image_config, max_length=tiny_module.max_length)
    train = next(iter(dm.train_dataloader()))
    assert train["pixel_values"].shape == (8, 3, 32, 32)
    assert train["input_ids"].shape[0] == 8 and train["text_image_index"].tolist() == list(range(8))
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape[0] == 16  # every caption and its paraphrase
    assert val["text_image_index"].tolist() == [i // 2 for i in range(16)]
    assert val["image_ids"].tolist() == list(range(8))
    # dynamic padding: the longest caption in the batch fixes the width, and it is not padded
    assert val["attention_mask"].sum(1).max() == val["input_ids"].shape[1]
