import textwrap

import pytest
import torch.nn as nn

from vlm_lab import registry
from vlm_lab.errors import ConfigError


def test_decorator_returns_the_object_unchanged(clean_registry):
    class Tower(nn.Module):
        def __init__(self, width: int = 8):
            super().__init__()
            self.width = width

    decorated = registry.register_vision_tower("unit_tower")(Tower)
    assert decorated is Tower
    built = registry.build("vision_tower", {"name": "unit_tower", "width": 3})
    assert isinstance(built, Tower) and built.width == 3


def test_function_call_registration(clean_registry):
    def make_head(in_dim: int, out_dim: int):
        return nn.Linear(in_dim, out_dim)

    assert registry.register_head("unit_head", make_head) is make_head
    head = registry.build("head", {"name": "unit_head"}, in_dim=4, out_dim=2)
    assert head.weight.shape == (2, 4)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ConfigError, match=r"unknown vision_tower 'clip_vt'.*Did you mean 'clip_vit'"):
        registry.build("vision_tower", {"name": "clip_vt"})


def test_unknown_name_of_another_kind_says_which_kind():
    with pytest.raises(ConfigError, match="is a text_tower"):
        registry.build("vision_tower", {"name": "clip_text"})


def test_unknown_argument_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        registry.build("vision_tower", {"name": "clip_vit", "layer": 2})
    message = str(err.value)
    assert "has no argument 'layer'" in message and "Did you mean 'layers'" in message
    assert "Valid arguments:" in message and "patch_size" in message
    assert "\n" not in message


def test_missing_argument_lists_the_valid_ones(clean_registry):
    @registry.register_loss("needs_margin")
    class NeedsMargin(nn.Module):
        def __init__(self, margin: float, scale: float = 1.0):
            super().__init__()

    with pytest.raises(ConfigError, match=r"missing required argument\(s\) margin.*Valid arguments: margin, scale"):
        registry.build("loss", {"name": "needs_margin"})


def test_wrong_types_are_named():
    with pytest.raises(ConfigError, match=r"argument layers='four' should be an integer"):
        registry.build("vision_tower", {"name": "clip_vit", "layers": "four"})
    with pytest.raises(ConfigError, match=r"pooling='cls' is not one of 'eot', 'argmax'"):
        registry.build("text_tower", {"name": "clip_text", "pooling": "cls"})


def test_framework_arguments_cannot_be_set_in_a_spec():
    with pytest.raises(ConfigError, match="'in_dim' is set by vlm-lab"):
        registry.build("head", {"name": "linear", "in_dim": 3}, in_dim=4, out_dim=2)


def test_spec_without_name():
    with pytest.raises(ConfigError, match="needs a 'name'"):
        registry.build("loss", {"temperature": 1.0})


def test_list_filters_with_wildcards():
    assert {"clip_vit", "clip_vit_tiny", "clip_vit_b16"} <= set(registry.list_vision_towers("clip_vit*"))
    assert registry.list_vision_towers("no_such_*") == []
    assert registry.list_losses() == sorted(registry.list_losses())
    assert {"clip", "siglip", "align"} <= set(registry.list_losses())


def test_reregistering_the_same_definition_is_fine(clean_registry):
    source = textwrap.dedent("""
        import torch.nn as nn
        from vlm_lab.registry import register_head

        @register_head("cell_head")
        class CellHead(nn.Module):
            def __init__(self, in_dim: int, out_dim: int):
                super().__init__()
    """)
    first, second = {"__name__": "__main__"}, {"__name__": "__main__"}
    exec(source, first)   # a notebook cell ...
    exec(source, second)  # ... run twice
    assert registry.constructors("head")["cell_head"] is second["CellHead"]


def test_a_different_object_under_a_taken_name_fails_unless_override(clean_registry):
    class Other(nn.Module):
        pass

    with pytest.raises(ConfigError, match="already registered.*override=True"):
        registry.register_vision_tower("clip_vit", Other)
    registry.register_vision_tower("clip_vit", Other, override=True)
    assert registry.constructors("vision_tower")["clip_vit"] is Other


def test_cards_preset_arguments_and_spec_overrides_win():
    tower = registry.build("vision_tower", {"name": "clip_vit_tiny", "layers": 1})
    assert tower.output_dim == 128  # from the card
    assert len(tower.encoder.layers) == 1  # from the spec


def test_cards_are_read_from_a_catalog_folder(tmp_path, user_catalogs):
    (tmp_path / "loss").mkdir()
    (tmp_path / "loss" / "hot_clip.yaml").write_text(
        "builds: clip\ndescription: CLIP loss starting hot.\nargs:\n  init_logit_scale: 4.0\n")
    registry.add_catalog(tmp_path)
    assert "hot_clip" in registry.list_losses("hot*")
    loss = registry.build("loss", {"name": "hot_clip"})
    assert float(loss.logit_scale.detach()) == pytest.approx(4.0)


def test_a_card_naming_an_unknown_constructor(tmp_path, user_catalogs):
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "bad.yaml").write_text("builds: linar\n")
    registry.add_catalog(tmp_path)
    with pytest.raises(ConfigError, match=r"builds 'linar'.*Did you mean 'linear'"):
        registry.build("head", {"name": "bad"}, in_dim=2, out_dim=2)


def test_describe_shows_signature_doc_and_source(capsys):
    text = registry.describe("clip_vit_tiny")
    assert "card:" in text and "clip_vit_tiny.yaml" in text
    assert "signature:" in text and "patch_size" in text
    assert "clip_vit.py:" in text
    assert capsys.readouterr().out.strip() == text.strip()


def test_describe_unknown_name_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'siglip'"):
        registry.describe("sigclip")


def test_unknown_kind():
    with pytest.raises(ConfigError, match="unknown registry kind 'tower'"):
        registry.list_names("tower")
