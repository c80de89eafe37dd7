"""experiments/coca/decoding_search.py: each decoding spelt out in full, scored once on dev, tabulated;
and the recipe decodes as the search chose."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from vlm_lab.yaml_text import load_yaml

ROOT = Path(__file__).resolve().parents[1]


def load_search_script():
    spec = importlib.util.spec_from_file_location("coca_decoding_search", ROOT / "experiments" / "coca" / "decoding_search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


search = load_search_script()


def test_each_decoding_is_validated_on_dev_once_with_every_setting_spelt_out(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_call(command, log_file, cwd):
        assert cwd == search.ROOT
        calls.append(command)
        run_dir = Path(command[command.index("--run-dir") + 1])
        run_dir.mkdir(parents=True)
        beams = int(next(a for a in command if a.startswith("model.generation.num_beams=")).split("=")[1])
        (run_dir / "metrics.json").write_text(json.dumps({"val/bleu4": 0.2, "val/cider": 0.5 + beams / 100}))
        return 0

    monkeypatch.setattr(search, "run_logged", fake_call)
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_text("")
    out = tmp_path / "out"
    assert search.main(["--ckpt", str(ckpt), "--out", str(out), "--try", "num_beams=2,length_penalty=0.5"]) == 0
    assert len(calls) == len(search.GRID) + 1
    first = calls[0]
    assert first[:4] == ["validate", str(search.RECIPE), str(search.DEV_SPLIT), f"ckpt_path={ckpt}"]
    assert first[4:7] == ["model.generation.num_beams=3", "model.generation.length_penalty=1.0",
                          "model.generation.no_repeat_ngram_size=0"]  # START, with the entry on top
    assert calls[-1][4:7] == ["model.generation.num_beams=2", "model.generation.length_penalty=0.5",
                              "model.generation.no_repeat_ngram_size=0"]
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| num_beams=8 | 20.00 | 0.5800 |")  # best dev CIDEr first
    assert any(line.startswith("| num_beams=5 (the start) |") for line in table)
    calls.clear()
    assert search.main(["--ckpt", str(ckpt), "--out", str(out)]) == 0  # all scored: nothing runs again
    assert calls == []


def test_a_failed_validation_is_reported_and_the_exit_status_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(search, "run_logged", lambda command, log_file, cwd: 1)
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_text("")
    assert search.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out")]) == 1
    assert "num_beams=3: vlm-lab validate exited 1" in capsys.readouterr().err


def test_bad_arguments_stop_in_one_line(tmp_path, capsys):
    assert search.main(["--ckpt", str(tmp_path / "missing.ckpt")]) == 2
    assert capsys.readouterr().err.strip() == f"decoding_search: --ckpt {tmp_path / 'missing.ckpt'} is not a file"
    (tmp_path / "best.ckpt").write_text("")
    with pytest.raises(SystemExit, match="'beams=2' sets beams; the search varies num_beams, length_penalty"):
        search.main(["--ckpt", str(tmp_path / "best.ckpt"), "--try", "beams=2"])
    with pytest.raises(SystemExit, match="'num_beams' is not key=value"):
        search.main(["--ckpt", str(tmp_path / "best.ckpt"), "--try", "num_beams"])


def test_the_recipe_decodes_as_the_search_chose():
    generation = load_yaml((ROOT / "experiments" / "coca_flickr8k.yaml").read_text())["model"]["generation"]
    chosen = search.settings_of("num_beams=3,no_repeat_ngram_size=3")
    assert {key: str(generation.get(key, search.START[key])) for key in chosen} == chosen
