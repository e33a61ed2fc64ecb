"""Sweep configs: validation errors name the key; run keys identify runs."""

import pytest

from attnlab.arena.config import ConfigError, load_sweep, parse_sweep, read_toml
from attnlab.arena.search import space_of, split_config

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
    ({"mechanisms": [{"mechanism": "softplus", "eval_kwargs": {"reweight": 3}}]},
     "contestant 'softplus'"),
    ({"train": {"lr": [1e-3, 1e-3]}}, "non-empty and distinct"),
    ({"train": {"lr": [1e-3, -1.0]}}, "lr must be > 0"),
    ({"train": {"warmup": 1.5}}, "warmup is a fraction"),
    ({"train": {"dtype": "float16"}}, "train.dtype"),
    ({"train": {"device": "tpu9"}}, "not a device"),
    ({"reference": "linear"}, "reference 'linear' is not a contestant"),
    # issue 41: each of these was accepted (nan trains nothing; "3" and true are no counts)
    ({"train": {"lr": float("nan")}}, r"train.lr: Input should be a finite number \(got nan\)"),
    ({"train": {"lr": [1e-3, float("inf")]}}, r"train.lr.1: .*finite number \(got inf\)"),
    ({"train": {"weight_decay": float("nan")}}, "train.weight_decay: .*finite"),
    ({"model": {"depth": -1}}, r"model key 'depth' = -1: Input should be greater than 0"),
    ({"mechanisms": [{"mechanism": "softmax", "model": {"heads": 0}}]},
     r"mechanism 'softmax': model key 'heads' = 0"),
    ({"model": {"positions": "absolute"}}, "model key 'positions' = 'absolute'"),
    ({"model": {"dropout": 1.0}}, "model key 'dropout' = 1.0: Input should be less than 1"),
    ({"seeds": "3"}, r"seeds: Input should be a valid integer \(got '3'\)"),
    ({"seeds": True}, "seeds: Input should be a valid integer"),
    ({"train": {"steps": 2.5}}, "train.steps"),
    ({"mechanisms": [{"mechanism": "softmax", "kwargs": {"causal": "yes"}}]},
     "contestant 'softmax': softmax: causal must be True, False or None, got 'yes'"),
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
    assert runs[0].train["device"] in ("cpu", "cuda")  # "auto" is resolved in the key
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


def test_a_config_that_is_not_utf8_is_a_clean_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'task = "copy"\nname = "\xff"\n')
    with pytest.raises(ConfigError, match=r"not UTF-8 text .*byte 0xff at offset 22"):
        read_toml(path)


def test_shipped_configs_are_valid():
    from pathlib import Path

    from attnlab.cli.arena import DEFAULT_CONFIG

    root = Path(__file__).parents[2] / "docs" / "results"
    paths = [DEFAULT_CONFIG, *sorted(root.glob("*.toml"))]
    assert len(paths) >= 5
    for path in paths:
        data = read_toml(path)
        if "search" in data:  # an architecture search: its sweep keys and its space
            base, found = split_config(data, str(path))
            space = space_of(found)
            assert parse_sweep({**base, "mechanisms": list(space.mechanisms)}).runs()
            continue
        assert load_sweep(path).runs()


def test_a_list_of_train_values_is_a_grid_every_contestant_trains_on():
    sweep = parse_sweep({"task": "copy", "mechanisms": ["softmax", "sigmoid"], "seeds": 2,
                         "train": {"lr": [1e-3, 3e-3], "weight_decay": [0.0, 0.1]}})
    assert sweep.train.grid() == {"lr": [1e-3, 3e-3], "weight_decay": [0.0, 0.1]}
    runs = sweep.runs()
    assert len(runs) == 2 * 2 * 4 and len({r.key for r in runs}) == 16
    points = {(r.label, r.train["lr"], r.train["weight_decay"]) for r in runs}
    assert len(points) == 8  # every contestant on every combination
    # a grid point's run is the same run as a single-valued sweep's (shared, not redone)
    single = parse_sweep({"task": "copy", "mechanisms": ["softmax"], "seeds": 2,
                          "train": {"lr": 1e-3, "weight_decay": 0.0}}).runs()
    assert {r.key for r in single} <= {r.key for r in runs}


def test_defaults_seeds_per_task_and_eval_kwargs_in_the_key():
    assert parse_sweep(BASE | {"seeds": None}).seed_list == [0, 1, 2, 3, 4]  # cheap task
    assert len(parse_sweep({"task": "char_lm", "mechanisms": ["softmax"]}).seed_list) == 3
    plain = parse_sweep({"task": "copy", "mechanisms": ["softplus"], "seeds": 1}).runs()[0]
    evald = parse_sweep({"task": "copy", "seeds": 1, "mechanisms": [
        {"mechanism": "softplus", "kwargs": {"reweight_p": 0},
         "eval_kwargs": {"reweight_p": 15}}]}).runs()[0]
    assert evald.eval_kwargs == {"reweight_p": 15} and evald.key != plain.key
    assert evald.config_id != plain.config_id and plain.config_id == parse_sweep(
        {"task": "copy", "mechanisms": ["softplus"], "seeds": [3]}).runs()[0].config_id


def test_a_stored_cuda_sweep_can_be_read_back_on_a_machine_without_cuda():
    import torch

    from attnlab.arena.config import stored_sweep
    from attnlab.arena.sweep import definition

    data = definition(parse_sweep({**BASE, "train": {"steps": 2}}))
    data["train"]["device"] = "cuda"  # as a GPU machine stored it
    sweep = stored_sweep(data)
    assert sweep.train.device == "cuda" and sweep.runs()[0].train["device"] == "cuda"
    if not torch.cuda.is_available():  # running it here is still refused
        with pytest.raises(ConfigError, match="CUDA is not available"):
            parse_sweep(data)
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        stored_sweep({**data, "trian": {}})
