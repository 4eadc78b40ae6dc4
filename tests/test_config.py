from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from common import config as C
from common.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_file_equals_dataclass_defaults_and_every_key_has_a_comment():
    cfg = C.load_config([ROOT / "configs" / "default.yaml"])
    want = C.Config()
    C.resolve_paths(want)  # paths are made absolute when loaded
    assert cfg == want
    text = (ROOT / "configs" / "default.yaml").read_text()
    data = yaml.safe_load(text)
    for sec, cls in C.SECTIONS.items():
        assert set(data[sec]) == {f.name for f in dataclasses.fields(cls)}, sec
    for line in text.splitlines():
        if re.match(r"^  \w+:", line):
            assert "  # " in line, f"no comment: {line}"


def test_reference_defaults():
    cfg = C.Config()
    assert cfg.model.backbone == "seresnext50_32x4d" and cfg.model.image_size == 224
    assert (cfg.train.batch_size, cfg.train.learning_rate, cfg.train.temperature) == (32, 0.016, 0.07)
    assert cfg.train.epochs == 1000 and cfg.train.cosine and cfg.train.save_freq == 50
    assert (cfg.split.train, cfg.split.val, cfg.split.test) == (0.70, 0.15, 0.15)


def test_files_layer_and_overrides_win(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("train:\n  epochs: 5\n  batch_size: 8\nmodel:\n  backbone: resnet18\n")
    b = tmp_path / "b.yaml"
    b.write_text("train:\n  epochs: 7\n")
    cfg = C.load_config([a, b], ["train.batch_size=16", "train.lr_decay_epochs=[1, 2]", "lut.thresholds=[0.9, 0.95]"])
    assert cfg.train.epochs == 7
    assert cfg.train.batch_size == 16
    assert cfg.model.backbone == "resnet18"
    assert cfg.train.lr_decay_epochs == [1, 2]
    assert cfg.lut.thresholds == [0.9, 0.95]


def test_int_widens_to_float_and_null_for_optional():
    cfg = C.load_config([], ["train.learning_rate=1", "prune.threshold=null", "inference.reject_below=0.5"])
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.prune.threshold is None and cfg.inference.reject_below == 0.5


@pytest.mark.parametrize("override, key", [
    ("train.epochs=ten", "train.epochs"),
    ("train.epochs=1.5", "train.epochs"),
    ("train.cosine=1", "train.cosine"),
    ("train.amp=fp8", "train.amp"),
    ("train.lr_decay_epochs=[1, x]", "train.lr_decay_epochs[1]"),
    ("model.backbone=null", "model.backbone"),
])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        C.load_config([], [override])
    assert str(e.value).startswith(key)


def test_unknown_key_and_section_are_errors_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key train.epochz .*did you mean 'epochs'"):
        C.load_config([], ["train.epochz=3"])
    with pytest.raises(ConfigError, match="unknown config section 'trian'.*'train'"):
        C.load_config([], ["trian.epochs=3"])
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  backbon: resnet18\n")
    with pytest.raises(ConfigError, match=f"model.backbon in {re.escape(str(f))}"):
        C.load_config([f])


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        C.load_config([tmp_path / "nope.yaml"])
    f = tmp_path / "broken.yaml"
    f.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        C.load_config([f])
    with pytest.raises(ConfigError, match="section.key=value"):
        C.load_config([], ["epochs"])
    with pytest.raises(ConfigError, match="split.train"):
        C.load_config([], ["split.train=0.9"])


def test_redaction_hides_secrets_but_keeps_variable_names():
    d = {"notify": {"password_env": "MY_VAR", "smtp_password": "hunter2", "api_token": "abc", "user": "me"}}
    r = C.redact(d)
    assert r["notify"]["password_env"] == "MY_VAR"
    assert r["notify"]["smtp_password"] == C.REDACTED and r["notify"]["api_token"] == C.REDACTED
    assert r["notify"]["user"] == "me"
    assert "hunter2" not in yaml.safe_dump(r)
    assert "hunter2" in str(d)  # the input is not modified


def test_yaml_dump_round_trips():
    cfg = C.load_config([], ["train.epochs=3", "inference.classifiers=[svm]"])
    again = C.from_dict(yaml.safe_load(C.to_yaml(cfg)))
    assert again == cfg


def test_hash_ignores_speed_knobs_and_other_sections():
    a = C.load_config([], [])
    b = C.load_config([], ["data.num_workers=16", "extract.batch_size=8", "notify.enabled=true"])
    assert a.hash(["data", "extract"]) == b.hash(["data", "extract"])
    c = C.load_config([], ["train.epochs=3"])
    assert a.hash(["data"]) == c.hash(["data"])
    assert a.hash(["train"]) != c.hash(["train"])
