"""The config schema: includes, overrides, and errors that name the file and key."""

import pytest

from dbgen.config import Config, ConfigError, FlowPPConfig, RVAEConfig, load_config, schema_markdown


def write(path, text):
    path.write_text(text)
    return path


def test_include_merge_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "model: {name: rvae, width: 64}\ntrain: {batch_size: 16, max_steps: 5}\n")
    cfg_path = write(tmp_path / "x.yaml", "include: base.yaml\ntrain: {max_steps: 7}\noptimizer: {lr: 1e-3}\n")
    cfg = load_config(cfg_path, ["train.max_steps=20", "model.binary_weights=true", "optimizer.betas=[0.5, 0.9]"])
    assert isinstance(cfg, Config) and isinstance(cfg.model, RVAEConfig)
    assert cfg.model.width == 64 and cfg.model.binary_weights is True
    assert cfg.train.batch_size == 16 and cfg.train.max_steps == 20
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.betas == (0.5, 0.9)
    # a round trip through to_dict gives the same config
    assert load_config(cfg.to_dict()) == cfg


def test_model_name_selects_section_and_replaces_included_model(tmp_path):
    write(tmp_path / "base.yaml", "model: {name: rvae, width: 64}\n")
    cfg = load_config(write(tmp_path / "f.yaml", "include: base.yaml\nmodel: {name: flowpp, hdim: 16}\n"))
    assert isinstance(cfg.model, FlowPPConfig) and cfg.model.hdim == 16


@pytest.mark.parametrize(
    "text, overrides, pattern",
    [
        ("model: {name: rvae, widht: 3}\n", [], r"x.yaml: unknown key 'model.widht'"),
        ("model: {name: rvae}\ntrian: {}\n", [], r"unknown key 'trian'"),
        ("model: {name: rvae}\n", ["train.max_steps=ten"], r"'train.max_steps' = 'ten': expected int"),
        ("model: {name: rvae}\n", ["train.max_steps=1.5"], r"'train.max_steps' = 1.5: expected int"),
        ("model: {name: rvae}\n", ["model.binary_weights=3"], r"'model.binary_weights' = 3: expected bool"),
        ("model: {name: rvae}\n", ["scale.zero_stage=3"], r"'scale.zero_stage' = 3: expected one of 0, 1, 2"),
        ("model: {name: gan}\n", [], r"'model.name' = 'gan': expected one of rvae, flowpp"),
        ("model: {width: 3}\n", [], r"'model' needs a 'name'"),
        ("train: {}\n", [], r"missing required key 'model'"),
        ("model: [1, 2]\n", [], r"'model' needs a 'name'"),
        ("model: {name: rvae}\n", ["train.max_steps"], r"expected dotted.key=value"),
        ("- a\n- b\n", [], r"expected a mapping at the top level"),
        ("model: {name: rvae\n", [], r"invalid YAML"),
        # Values that pass the types but would train on NaN, an exploding learning rate, or nothing at all.
        ("model: {name: rvae}\n", ["optimizer.betas=[0.9,1.5]"], r"'optimizer.betas' = \(0.9, 1.5\): expected two"),
        ("model: {name: rvae}\n", ["optimizer.betas=[-0.1,0.9]"], r"'optimizer.betas' = \(-0.1, 0.9\)"),
        ("model: {name: rvae}\n", ["optimizer.lr=.inf"], r"'optimizer.lr' = inf: expected a finite number > 0"),
        ("model: {name: rvae}\n", ["optimizer.lr=.nan"], r"'optimizer.lr' = nan: expected a finite number > 0"),
        ("model: {name: rvae}\n", ["optimizer.eps=0"], r"'optimizer.eps' = 0"),
        ("model: {name: rvae}\n", ["schedule.decay=2"], r"'schedule.decay' = 2.0: expected a number in \(0, 1\]"),
        ("model: {name: rvae}\n", ["schedule.decay=0"], r"'schedule.decay' = 0"),
        ("model: {name: rvae}\n", ["schedule.min_lr=.inf"], r"'schedule.min_lr' = inf"),
        ("model: {name: rvae}\n", ["train.max_steps=0"], r"'train.max_steps' = 0: expected an int >= 1"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, overrides, pattern):
    path = write(tmp_path / "x.yaml", text)
    with pytest.raises(ConfigError, match=pattern):
        load_config(path, overrides)


def test_missing_file_and_include_cycle(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")


def test_float_accepts_yaml_exponent_strings_and_ints(tmp_path):
    cfg = load_config(write(tmp_path / "x.yaml", "model: {name: rvae}\noptimizer: {lr: 2e-3}\nschedule: {min_lr: 1}\n"))
    assert cfg.optimizer.lr == 2e-3 and cfg.schedule.min_lr == 1.0


def test_schema_markdown_lists_every_key():
    md = schema_markdown()
    for key in ("train.max_steps", "scale.num_workers", "comm.binary_weights", "model.width", "model.hdim"):
        assert f"`{key}`" in md


def test_section_validation_names_the_file(tmp_path):
    path = write(tmp_path / "x.yaml", "model: {name: rvae, image_size: 31}\n")
    with pytest.raises(ConfigError, match=r"x.yaml: 'model.image_size' = 31"):
        load_config(path)
