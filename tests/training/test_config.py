"""Presets, YAML recipes, precedence and validation of the training configuration."""
import pytest

from layerskip.errors import LayerSkipError
from layerskip.training.config import PRESETS, TrainConfig, build_config, load_preset

BASE = dict(data=["x.txt"], output_dir="out")


@pytest.mark.parametrize("name,p_max,e_scale,curriculum,rotation,schedule", [
    ("continual_pretraining", 0.1, 0.2, "rotational", 8, "constant"),
    ("pretraining_from_scratch", 0.2, 0.2, "rotational", 8, "exponential"),
    ("code_finetuning", 0.1, 1.0, "rotational", 16, "constant"),
    ("topv2_finetuning", 0.2, 1.0, "gradual", None, "constant"),
])
def test_presets_hold_the_papers_settings(name, p_max, e_scale, curriculum, rotation, schedule):
    c = build_config(preset=name, **BASE)
    assert (c.layer_dropout_max, c.early_exit_scale, c.curriculum) == (p_max, e_scale, curriculum)
    assert c.layer_dropout_schedule == schedule and c.layer_dropout_depth == "exponential"
    if rotation:
        assert c.rotation == rotation
    assert c.preset == name


def test_every_preset_is_packaged():
    for name in PRESETS:
        assert load_preset(name)
    assert load_preset("code-finetuning") == load_preset("code_finetuning")


def test_precedence_defaults_preset_recipe_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: code_finetuning\nrotation: 4\nlr: 3.0e-4\nmax_steps: 20\ndata: corpus.jsonl\n")
    c = build_config(recipe=recipe, output_dir="o", max_steps=7)
    assert c.early_exit_scale == 1.0  # from the preset
    assert c.rotation == 4 and c.lr == 3e-4  # the recipe beats the preset
    assert c.max_steps == 7  # a flag beats the recipe
    assert c.data == ["corpus.jsonl"]  # a single path becomes a list
    assert c.batch_size == TrainConfig().batch_size  # untouched default


def test_recipe_int_for_float_is_accepted(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("early_exit_scale: 1\nlayer_dropout_max: 0\n")
    c = build_config(recipe=recipe, **BASE)
    assert c.early_exit_scale == 1.0 and isinstance(c.early_exit_scale, float)


def test_early_exit_weights_from_a_recipe_list_or_a_flag_string(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("early_exit_weights: [0, 1, 2, 1.5]\n")
    assert build_config(recipe=recipe, **BASE).early_exit_weights == [0.0, 1.0, 2.0, 1.5]
    assert build_config(**BASE, early_exit_weights="0,1,2,1.5").early_exit_weights == [0.0, 1.0, 2.0, 1.5]
    assert build_config(**BASE).early_exit_weights is None
    for bad in ("0,one,2", "0,1,-1,1", "1,1,0", ""):
        with pytest.raises(LayerSkipError, match="early_exit_weights"):
            build_config(**BASE, early_exit_weights=bad)


@pytest.mark.parametrize("text,message", [
    ("learning_rate: 0.1\n", "unknown key"),
    ("rotation: eight\n", "rotation: expected int"),
    ("- a\n- b\n", "expected a mapping"),
    ("a: [\n", "not valid YAML"),
    ("preset: fancy\n", "unknown preset"),
])
def test_bad_recipes_are_rejected(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(LayerSkipError, match=message):
        build_config(recipe=recipe, **BASE)


@pytest.mark.parametrize("override,message", [
    (dict(layer_dropout_max=1.0), r"\[0, 1\)"),
    (dict(layer_dropout_max=-0.1), r"\[0, 1\)"),
    (dict(early_exit_scale=2.0), "early-exit-scale"),
    (dict(curriculum="random"), "curriculum"),
    (dict(early_exit_targets="soft"), "early-exit-targets"),
    (dict(unlikelihood=-0.5), "unlikelihood"),
    (dict(unlikelihood=float("nan")), "unlikelihood"),
    (dict(layer_dropout_schedule="cosine"), "layer-dropout-schedule"),
    (dict(layer_dropout_depth="cubic"), "layer-dropout-depth"),
    (dict(rotation=0), "rotation"),
    (dict(max_steps=0), "max-steps"),
    (dict(batch_size=0), "batch-size"),
    (dict(seq_len=1), "seq-len"),
    (dict(lr=0.0), "lr"),
    (dict(dtype="int8"), "dtype"),
    (dict(lr_scheduler="step"), "lr-scheduler"),
    (dict(model="m", init="c.json"), "either --model"),
    (dict(data=[]), "no training data"),
    (dict(output_dir=""), "no output directory"),
])
def test_bad_values_are_rejected(override, message):
    with pytest.raises(LayerSkipError, match=message):
        build_config(**{**BASE, **override})


def test_missing_recipe_file(tmp_path):
    with pytest.raises(LayerSkipError, match="no such file"):
        build_config(recipe=tmp_path / "none.yaml", **BASE)
