"""Sweep configs: validation errors name the key; run keys identify runs."""

import pytest

from attnlab.arena.config import ConfigError, load_sweep, parse_sweep

BASE = {"task": "copy", "mechanisms": ["softmax"], "seeds": 2}


@pytest.mark.parametrize("change, message", [
    ({"trian": {}}, "unknown key 'trian'"),
    ({"train": {"stepz": 3}}, "unknown key 'train.stepz'"),
    ({"model": {"width": 3}}, "unknown model key 'width'"),
    ({"mechanisms": ["softmx"]}, "unknown attention mechanism 'softmx'"),
    ({"mechanisms": [{"mechanism": "softmax", "kwarg": {}}]}, "unknown key 'mechanisms.0"),
    ({"mechanisms": ["softmax", "softmax"]}, "both labelled 'softmax'"),
    ({"task_params": {"lenght": 3}}, "no parameter 'lenght'"),
    ({"task": "cpy"}, "unknown task 'cpy'"),
    ({"seeds": 0}, "seeds must be"),
    ({"train": {"steps": -1}}, "train.steps"),
    ({"mechanisms": [{"mechanism": "dma", "kwargs": {"windw": 4}}]}, "contestant 'dma'"),
])
def test_bad_configs_are_errors_that_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep({**BASE, **change})


def test_runs_merge_task_defaults_config_and_variant_overrides():
    sweep = parse_sweep({"task": "mqar", "seeds": [3, 5], "model": {"dim": 48},
                         "train": {"steps": 7},
                         "mechanisms": ["softmax", {"mechanism": "linear", "label": "lin-h1",
                                                    "model": {"heads": 1}}]})
    runs = sweep.runs()
    assert [(r.label, r.seed) for r in runs] == [("softmax", 3), ("lin-h1", 3),
                                                 ("softmax", 5), ("lin-h1", 5)]
    assert runs[1].model == {"dim": 48, "depth": 2, "heads": 1}
    assert runs[0].train["steps"] == 7 and runs[0].train["batch_size"] == 64  # task default
    assert len({r.key for r in runs}) == 4
    again = parse_sweep({"task": "mqar", "seeds": [3, 5], "model": {"dim": 48},
                         "train": {"steps": 7},
                         "mechanisms": ["softmax", {"mechanism": "linear", "label": "lin-h1",
                                                    "model": {"heads": 1}}]}).runs()
    assert [r.key for r in again] == [r.key for r in runs]  # stable across processes
    longer = parse_sweep({"task": "mqar", "seeds": [3], "model": {"dim": 48},
                          "train": {"steps": 8}, "mechanisms": ["softmax"]}).runs()
    assert longer[0].key != runs[0].key  # another budget is another run


def test_toml_file_with_overrides_and_its_errors(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('task = "copy"\nmechanisms = ["softmax", "sigmoid"]\nseeds = 2\n'
                    '[task_params]\nlength = 8\n[train]\nsteps = 5\n')
    sweep = load_sweep(path, seeds=1, store=str(tmp_path / "s"))
    assert sweep.seed_list == [0] and sweep.task_params == {"length": 8}
    path.write_text('task = "copy"\nmechanisms = ["softmax"]\nsteps = 5\n')
    with pytest.raises(ConfigError, match="unknown key 'steps'"):
        load_sweep(path)
    path.write_text('task = "copy"\nmechanisms = [')
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_sweep(path)
    with pytest.raises(ConfigError, match="TOML files"):
        load_sweep(tmp_path / "sweep.yaml")


def test_shipped_configs_are_valid():
    from pathlib import Path

    from attnlab.cli_arena import DEFAULT_CONFIG

    root = Path(__file__).parents[2] / "docs" / "results"
    paths = [DEFAULT_CONFIG, *sorted(root.glob("*.toml"))]
    assert len(paths) >= 5
    for path in paths:
        assert load_sweep(path).runs()
