import pytest

from draftforge.config import (
    Config,
    ConfigError,
    describe_options,
    dump_config,
    from_dict,
    load_config,
    to_dict,
)


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = Config()
    cfg.training.lr = 3e-4
    cfg.target.aux_layers = [2, 5, 9]
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  lr: 0.001\n")
    cfg = load_config(
        path,
        [
            "training.lr=3e-4",
            "training.betas=[0.9, 0.99]",
            "data.path=1e4",
            "target.aux_layers=[1, 2, 3]",
            "draft.init_from=null",
            "training.warmup_steps=7",
        ],
    )
    assert cfg.training.lr == 3e-4
    assert cfg.training.betas == [0.9, 0.99]
    assert cfg.data.path == "1e4"  # a text field keeps the text
    assert cfg.target.aux_layers == [1, 2, 3]
    assert cfg.draft.init_from is None
    assert cfg.training.warmup_steps == 7


def test_int_widens_to_float_but_not_back():
    assert load_config(None, ["training.lr=1"]).training.lr == 1.0
    with pytest.raises(ConfigError, match=r"training\.max_steps: expected int, got 1\.5"):
        load_config(None, ["training.max_steps=1.5"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("training:\n  lrr: 0.1\n", r"unknown config key 'training\.lrr' \(did you mean 'lr'\?\)"),
        ("trainng:\n  lr: 0.1\n", r"unknown config key 'trainng' \(did you mean 'training'\?\)"),
        ("training:\n  lr: fast\n", r"training\.lr: expected float, got 'fast'"),
        ("training:\n  max_steps: true\n", r"training\.max_steps: expected int, got True"),
        (
            "data:\n  mode: sideways\n",
            r"data\.mode: 'sideways' is not one of 'online' \| 'offline'",
        ),
        ("target:\n  aux_layers: [1, x, 3]\n", r"target\.aux_layers"),
        ("training: 3\n", r"training: expected a mapping"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_bad_override_names_the_key():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'training\.lrate'.*valid keys: .*lr"
    ):
        load_config(None, ["training.lrate=1"])
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        load_config(None, ["training.lr"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["training=1"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_option_is_documented():
    rows = describe_options()
    keys = [r[0] for r in rows]
    assert "training.lr" in keys and "target.aux_layers" in keys and "parallel.tp" in keys
    assert all(doc.strip() for *_, doc in rows)
    assert len(keys) == len(set(keys))
