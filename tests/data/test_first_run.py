"""Issue 20, items 4 and 5: a first run on plankton that is right without help, and the small
things that cost a newcomer time (pad_fill auto, the laptop profile, which configuration a new
run uses, hints, --help, progress without a terminal, log-scale ticks, names and messages)."""
from __future__ import annotations

import ast
import importlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config.load import load_config
from common.data.fill import AUTO_FILL, AUTO_FILL_CODE, pad_fill_code, pad_fill_value
from common.data.transforms import PadToSquare, Preprocessing, edge_median

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- data.pad_fill: auto


def _bright_field(w=40, h=20, bg=(231, 236, 240)):
    """A FlowCam-like image: a light background, a dark organism in the middle (not touching the border)."""
    a = np.zeros((h, w, 3), np.uint8) + np.array(bg, np.uint8)
    a[6:14, 10:30] = (40, 50, 60)
    return a


def test_auto_pads_with_the_images_own_border_colour():
    a = _bright_field()
    out = np.asarray(PadToSquare(AUTO_FILL)(Image.fromarray(a)))
    assert out.shape == (40, 40, 3)
    assert (out[:10] == (231, 236, 240)).all() and (out[30:] == (231, 236, 240)).all()  # the padded bands
    assert (out[10:30] == a).all()  # the image itself, untouched
    # dark field: black border, black padding (what pad_fill 0 gives)
    dark = np.zeros((20, 40), np.uint8)
    dark[5:15, 10:30] = 200
    assert (np.asarray(PadToSquare(AUTO_FILL)(Image.fromarray(dark))) == np.asarray(PadToSquare(0)(
        Image.fromarray(dark)))).all()


def test_auto_median_ignores_an_organism_touching_the_border_and_keeps_alpha_opaque():
    a = _bright_field(bg=(200, 200, 200))
    a[:, :3] = 0  # a dark object along the left edge: a minority of the edge pixels
    assert edge_median(a).tolist() == [200, 200, 200]
    rgba = np.dstack([a, np.full(a.shape[:2], 10, np.uint8)])
    out = np.asarray(PadToSquare(AUTO_FILL)(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [200, 200, 200, 255]
    grey16 = Image.fromarray(np.full((10, 30), 40000, np.uint16))
    assert np.asarray(PadToSquare(AUTO_FILL)(grey16))[0, 0] == 40000  # in the image's own range


def test_auto_on_tensors_equals_pil():
    a = _bright_field()
    t = torch.from_numpy(a).permute(2, 0, 1).contiguous()
    got = PadToSquare(AUTO_FILL)(t)
    want = torch.from_numpy(np.asarray(PadToSquare(AUTO_FILL)(Image.fromarray(a))).copy()).permute(2, 0, 1)
    assert torch.equal(got, want)


def test_auto_is_recorded_in_checkpoints_and_the_store():
    pre = Preprocessing((0.5,) * 3, (0.2,) * 3, 64, AUTO_FILL)
    assert Preprocessing.from_dict(pre.as_dict(), "x") == pre
    assert pad_fill_code(AUTO_FILL) == AUTO_FILL_CODE and pad_fill_value(AUTO_FILL_CODE) == AUTO_FILL
    assert pad_fill_code(255) == 255 and pad_fill_value(0) == 0
    assert not pre.same_as(Preprocessing((0.5,) * 3, (0.2,) * 3, 64, 0))


def test_store_round_trips_auto(tmp_path):
    from common.store.sqlite import FeatureStore

    with FeatureStore(tmp_path / "f.sqlite", create=True) as st:
        info, _ = st.register_model(checkpoint_sha256="a" * 64, checkpoint_path="x.pt", epoch=1, embedding="encoder",
                                    backbone="b", dim=4, mean=[0.1] * 3, std=[0.2] * 3, image_size=32,
                                    pad_fill=AUTO_FILL, classes=["a"])
        assert info.pad_fill == AUTO_FILL and st.model_info(info.id).pad_fill == AUTO_FILL


def test_default_is_auto_and_the_demo_pins_zero():
    assert load_config().data.pad_fill == AUTO_FILL
    assert load_config(["configs/demo.yaml"]).data.pad_fill == 0  # demo runs made before stay up to date
    assert "pad_fill: auto" in (ROOT / "configs" / "default.yaml").read_text()


def test_plankton_cpu_profile_is_a_small_plankton_run():
    import timm

    cfg = load_config(["configs/plankton_cpu.yaml"])
    t = cfg.train
    assert t.rot90 and t.hflip > 0 and t.vflip > 0  # plankton has no "up"
    assert cfg.model.image_size <= 128 and t.epochs <= 50 and cfg.model.pretrained == "none"
    model = timm.create_model(cfg.model.backbone, pretrained=False, num_classes=0)
    assert sum(p.numel() for p in model.parameters()) < 10_000_000  # a laptop backbone
    readme = (ROOT / "README.md").read_text()
    own = readme[readme.index("## Your own data"):]
    assert "configs/plankton_cpu.yaml" in own[:400]


# ----------------------------------------------------------------------------- run_pipeline.py


@pytest.fixture
def rp(monkeypatch):
    mod = importlib.import_module("run_pipeline")
    rendered = []
    monkeypatch.setattr("common.data.demo.render_digits", lambda p: rendered.append(p) or Path(p))
    mod.rendered = rendered
    return mod


def test_a_new_run_without_c_uses_default_yaml_and_never_the_demo_root(rp, tmp_path):
    for run in (str(tmp_path / "new"), None):
        configs, overrides, said = rp.start_configs([], ["data.root=/my/flowcam"], run)
        assert configs == [str(rp.DEFAULT_CONFIG)] and overrides == ["data.root=/my/flowcam"]
        assert said.startswith("configuration: configs/default.yaml (no -c given") and "\n" not in said
    configs, _, _ = rp.start_configs([], [], str(tmp_path / "new"))
    assert configs == [str(rp.DEFAULT_CONFIG)] and not rp.rendered
    # the demo: nothing given at all
    configs, overrides, said = rp.start_configs([], ["train.epochs=1"], None)
    assert configs == [str(rp.DEMO_CONFIG)] and overrides[0].startswith("data.root=") and "demo" in said
    # an existing run keeps its own configuration; -c is used as given
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text("run: {}\n")
    assert rp.start_configs([], ["x.y=1"], str(tmp_path / "old")) == ([], ["x.y=1"], "")
    assert rp.start_configs(["my.yaml"], [], None) == (["my.yaml"], [], "")


def test_hint_after_several_missing_stages_names_run_pipeline(rp):
    why = "03_main_supcon has not been run in runs/x: run `python 03_main_supcon.py --run runs/x`"
    assert rp.pending_hint(Path("runs/x"), ["07_inference"], why) == why
    many = rp.pending_hint(Path("runs/x"), ["03_main_supcon", "04_extract_features", "07_inference"], why)
    assert many.endswith("run `python run_pipeline.py --run runs/x`") and "3 stages" in many


def test_help_names_the_keys_file_and_says_its_first_sentence_once():
    from common.pipeline.cli import build_parser
    from common.stages import SPECS, STAGES

    for name in STAGES:
        doc = ast.get_docstring(ast.parse((ROOT / f"{name}.py").read_text()))
        text = build_parser(SPECS[name], doc).format_help()
        assert "configs/default.yaml" in text, name
        if name == "07_inference":
            assert "inference.mode=predict inference.input=" in text
    from conftest import run_script

    out = run_script(["run_pipeline.py", "--help"]).stdout
    assert out.count("Run the pipeline's stages in order") == 1 and "configs/default.yaml" in out


# ----------------------------------------------------------------------------- progress without a terminal


def test_progress_logs_a_line_every_30_s_with_rate_and_eta(caplog):
    from common.runtime.progress import PROGRESS_EVERY_S, LogProgress, progress

    now = [0.0]
    bar = LogProgress(100, "epoch 2/20", unit="img", scale=64, clock=lambda: now[0])
    caplog.set_level(logging.INFO)
    for _ in range(10):  # 10 steps of 64 images in 20 s: no line yet
        now[0] += 2.0
        bar.update(1)
    assert not caplog.records
    bar.set_postfix(loss="4.1234", refresh=False)
    for _ in range(10):
        now[0] += 2.0
        bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and now[0] >= PROGRESS_EVERY_S
    # 15 steps at 30 s: 960 images, 32 img/s, 85 steps (5,440 images) left: 170 s
    assert lines[0].startswith("epoch 2/20: 960/6,400 img (15%), 32.0 img/s, ETA 2m50s")
    assert lines[0].endswith("loss=4.1234")
    # pytest captures stderr: no terminal, so progress() gives the logging kind
    assert isinstance(progress(10, "embedding"), LogProgress)
    assert not isinstance(progress(10, "embedding", enabled=False), LogProgress)


# ----------------------------------------------------------------------------- item 5


def test_log_scale_ticks_are_plain_numbers(tmp_path):
    import matplotlib.pyplot as plt

    from common.report import plots

    fig, ax = plt.subplots()
    ax.bar([0, 1], [3, 3000])
    ax.set_yscale("log")
    plots.plain_log_ticks(ax.yaxis)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    plt.close(fig)
    assert labels and not any("$" in t or "mathdefault" in t for t in labels)
    assert "1,000" in labels
    calls = []
    orig = plots.plain_log_ticks
    plots.plain_log_ticks = lambda axis: calls.append(axis) or orig(axis)
    try:
        plots.plot_prune_summary([{"class": "a", "before": 300, "after": 20}], tmp_path / "p.png", 0.9)
    finally:
        plots.plain_log_ticks = orig
    assert len(calls) == 1


def test_ecotaxa_names_are_prefixed_once():
    from common.ecotaxa.bundle import ecotaxa_stem

    assert ecotaxa_stem("cruise_42") == "ecotaxa_cruise_42"
    assert ecotaxa_stem("ecotaxa_Tripos_2024") == "ecotaxa_Tripos_2024"
