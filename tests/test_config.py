import inspect
import math
import tomllib

import pytest
import torch

from frugaldiff.components import FRUGAL_RECIPE, resolved_recipe
from frugaldiff.config import DATA_DEPENDENT, OPTIONS, Config, dump_toml, flatten, parse_override
from frugaldiff.errors import FrugalError
from frugaldiff.timestep_samplers import TIMESTEP_SAMPLERS


def _one_line_error(values) -> str:
    with pytest.raises(FrugalError) as e:
        Config(values)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_defaults_resolve_and_roundtrip_through_toml(tmp_path):
    config = Config()
    path = tmp_path / "config.toml"
    config.save(path)
    assert Config.load(path) == config
    assert tomllib.loads(config.to_toml(comments=True)) == config.to_dict()
    assert set(flatten(config.to_dict())) == {o.key for o in OPTIONS}


def test_dotted_and_nested_access():
    config = Config({"train": {"lr": 3e-4}, "data.name": "digits"})
    assert config["train.lr"] == config.train.lr == 3e-4
    assert config.data.name == "digits"
    assert config.updated({"train.lr": 1e-4}).train.lr == 1e-4
    assert config.train.lr == 3e-4  # updated() returns a copy


def test_unknown_key_suggests_the_close_one():
    message = _one_line_error({"train.lrr": 0.1})
    assert "'train.lrr'" in message and "'train.lr'" in message


@pytest.mark.parametrize("values,expected", [
    ({"train.batch_size": 0}, "train.batch_size"),
    ({"train.batch_size": "eight"}, "train.batch_size"),
    ({"train.lr": float("nan")}, "train.lr"),
    ({"train.precision": "fp16"}, "fp32, bf16"),
    ({"diffusion.process": "vp"}, "vp-linear, vp-cosine, flow"),
    ({"diffusion.prediction": "score"}, "eps"),
    ({"model.channel_mult": [1, 0]}, "model.channel_mult"),
    ({"model.channel_mult": 2}, "a list of at least 1 integers"),
    ({"data.name": "cifar10"}, "mnist5000"),
    ({"train.batch_size": 6, "train.grad_accum": 4}, "divisible"),
    ({"timestep_sampler.near_zero.shape": "bogus"}, "timestep_sampler.near_zero.shape"),  # even when unused
    ({"weighting.min_snr.gamma": -1.0}, "weighting.min_snr.gamma"),
    ({"timestep_sampler.lognormal.p_std": "wide"}, "timestep_sampler.lognormal.p_std"),
])
def test_bad_values_name_key_and_valid_choices(values, expected):
    assert expected in _one_line_error(values)


def test_int_accepted_for_float_but_bool_not_for_int():
    assert Config({"train.lr": 1}).train.lr == 1.0
    _one_line_error({"train.batch_size": True})


def test_prefixed_dataset_names_are_valid():
    assert Config({"data.name": "folder:/some/where"}).data.name == "folder:/some/where"
    _one_line_error({"data.name": "folder:"})


def test_overrides_parse_toml_literals():
    assert parse_override("train.lr=3e-4") == ("train.lr", 3e-4)
    assert parse_override("model.channel_mult=[1,2]") == ("model.channel_mult", [1, 2])
    assert parse_override("data.name=digits") == ("data.name", "digits")
    assert parse_override("train.name=my run") == ("train.name", "my run")
    with pytest.raises(FrugalError):
        parse_override("train.lr")


def test_load_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nbatch_size = 16\n[data]\nname = "digits"\n')
    config = Config.load(path, ["train.batch_size=8"])
    assert (config.train.batch_size, config.data.name) == (8, "digits")


@pytest.mark.parametrize("text,expected", [("[train\n", "not valid TOML"), (None, "does not exist")])
def test_bad_files_give_one_line(tmp_path, text, expected):
    path = tmp_path / "c.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(FrugalError, match=expected):
        Config.load(path)


def test_dump_toml_handles_nesting_and_types():
    tree = {"a": 1, "b": {"c": [1.5, 2.0], "d": {"e": "x\"y", "f": True}}}
    assert tomllib.loads(dump_toml(tree)) == tree


def test_a_saved_config_from_before_a_key_existed_keeps_its_old_behaviour(tmp_path):
    path = tmp_path / "config.toml"
    Config({"train.batch_size": 16}).save(path)
    text = path.read_text()
    old = "\n".join(line for line in text.splitlines() if not line.startswith("reference_images"))
    assert old != text
    path.write_text(old + "\n")  # as written before diffusion.reference_images existed
    assert Config.load(path)["diffusion.reference_images"] == "auto"  # a new config: today's default
    saved = Config.load(path, saved=True)
    assert saved["diffusion.reference_images"] == 0 and saved["train.batch_size"] == 16
    assert Config.load(path, ["diffusion.reference_images=32"], saved=True)["diffusion.reference_images"] == 32
    Config({"diffusion.reference_images": 64}).save(path)  # a key the file has keeps its value
    assert Config.load(path, saved=True)["diffusion.reference_images"] == 64


@pytest.mark.parametrize("patch", [False, True])
def test_the_auto_recipe_is_frugals_without_the_stable_target_on_crops(patch):
    config = Config({"train.patch": patch})
    recipe = {**FRUGAL_RECIPE, **({"diffusion.reference_images": 0} if patch else {})}
    assert all(config[key] == "auto" for key in recipe)  # resolved when a run is built, saved resolved
    resolved = resolved_recipe(config)
    assert {key: resolved[key] for key in recipe} == recipe
    assert resolved.updated(dict.fromkeys(recipe, "auto")) == config  # nothing else changed
    sampler = resolved.timestep_sampler(resolved.process())
    assert (sampler.m, sampler.stratified) == (0.5, True)


def test_frugals_recipe_sets_the_auto_keys_and_is_the_samplers_own_defaults():
    assert FRUGAL_RECIPE.keys() == {"diffusion.reference_images", *DATA_DEPENDENT}
    defaults = inspect.signature(TIMESTEP_SAMPLERS.get("logit_normal")).parameters
    assert FRUGAL_RECIPE["timestep_sampler.logit_normal.m"] == defaults["m"].default
    assert FRUGAL_RECIPE["timestep_sampler.logit_normal.stratified"] == defaults["stratified"].default


def test_a_recipe_key_the_user_sets_stays_and_patch_training_drops_the_stable_target():
    set_m = resolved_recipe(Config({"timestep_sampler.logit_normal.m": 0.3}))
    assert set_m["timestep_sampler.logit_normal.m"] == 0.3 and set_m["diffusion.reference_images"] == 4096
    kept = resolved_recipe(Config({"diffusion.reference_images": 64}))
    assert kept["diffusion.reference_images"] == 64 and kept["timestep_sampler.logit_normal.stratified"] is True
    patch = resolved_recipe(Config({"train.patch": True}))
    assert patch["diffusion.reference_images"] == 0 and patch["timestep_sampler.logit_normal.m"] == 0.5


def test_an_unresolved_auto_sampler_parameter_is_refused_in_one_line():
    with pytest.raises(FrugalError, match="logit_normal.m = auto is resolved when a run is built") as info:
        Config().timestep_sampler(Config().process())
    assert "\n" not in str(info.value)
    Config({"timestep_sampler.logit_normal.m": 0.2, "timestep_sampler.logit_normal.stratified": True}).timestep_sampler(
        Config().process())  # set values need no data
    with pytest.raises(FrugalError, match="timestep_sampler.logit_normal.m"):
        Config({"timestep_sampler.logit_normal.m": math.inf})  # a set value is still checked


def test_building_a_config_leaves_torchs_generator_alone():
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    Config().updated({"diffusion.weighting": "learned"})  # validation builds every sampler and weighting
    assert torch.equal(torch.rand(4), expected)  # so a run's network starts the same however often it is built
