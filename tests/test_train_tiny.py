"""The training scripts of the demo model (train/tiny.py), its ControlNet (train/controlnet.py) and its tiny VAE
(train/tiny_vae.py), run for a few steps: seeded, reproducible, loadable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from train import controlnet, tiny, tiny_vae

pytest.importorskip("torch")

FEW_STEPS = tiny.Settings(images=16, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4, warmup=1)


def _weights(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_the_same_seed_trains_the_same_weights(tmp_path: Path) -> None:
    first = tiny.train(tmp_path / "first", FEW_STEPS)
    second = tiny.train(tmp_path / "second", FEW_STEPS)
    assert set(_weights(first)) == {
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }
    assert _weights(first) == _weights(second)


def test_the_saved_folder_is_a_float16_diffusers_pipeline(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors.numpy import load_file

    out = tiny.train(tmp_path / "tiny-sd", FEW_STEPS)
    for weights in out.rglob("*.safetensors"):
        assert {str(array.dtype) for array in load_file(weights).values()} == {"float16"}, weights
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the trained VAE's latents
    assert (out / "training.json").is_file()
    assert not (out / "tokenizer" / "tokenizer.json").exists()  # CLIP's own vocab.json + merges.txt only


def test_main_refuses_an_existing_out_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def no_training(*args, **kwargs):
        pytest.fail("train() ran")

    monkeypatch.setattr(tiny, "train", no_training)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("a file")
    for args, message in [
        (["--out", str(tmp_path / "folder")], "already exists (use --overwrite to replace it)"),
        (["--out", str(tmp_path / "file")], "already exists (use --overwrite to replace it)"),
        (["--out", str(tmp_path / "file"), "--overwrite"], "is not a folder"),
        (
            ["--out", str(tmp_path / "new"), "--vae-from", str(tmp_path / "folder")],
            "is not a demo model folder (no vae/)",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            tiny.main(args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def few_steps_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.train(tmp_path_factory.mktemp("base") / "tiny-sd", FEW_STEPS)


def test_keeping_a_trained_vae_trains_the_same_model(few_steps_model: Path, tmp_path: Path) -> None:
    """Stage 2 has its own seeds and trains on the VAE as saved: --vae-from the same VAE gives the same model."""
    settings = tiny.Settings(**{**vars(FEW_STEPS), "vae_from": str(few_steps_model)})
    out = tiny.train(tmp_path / "tiny-sd", settings)
    assert _weights(out) == _weights(few_steps_model)


def test_the_model_ships_its_zero_terminal_snr_schedule(few_steps_model: Path) -> None:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_pretrained(few_steps_model / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
    assert scheduler.alphas_cumprod[-1] == 0  # the last training step held nothing of the picture


def test_the_controlnet_trains_seeded_and_loads(few_steps_model: Path, tmp_path: Path) -> None:
    from diffusers import ControlNetModel
    from safetensors.numpy import load_file

    settings = controlnet.Settings(base=str(few_steps_model), images=8, steps=2, batch=4, warmup=1)
    first = controlnet.train(tmp_path / "first", settings)
    second = controlnet.train(tmp_path / "second", settings)
    assert _weights(first) == _weights(second) != {}
    for weights in first.rglob("*.safetensors"):
        assert {str(array.dtype) for array in load_file(weights).values()} == {"float16"}, weights
    net = ControlNetModel.from_pretrained(first)
    assert list(net.config.block_out_channels) == list(tiny.build_unet().config.block_out_channels)
    assert (first / "training.json").is_file()


def test_the_tiny_vae_distils_seeded_into_what_add_tiny_vae_takes(
    few_steps_model: Path, tiny_export: Path, tmp_path: Path
) -> None:
    """A few steps of train.tiny_vae: the same seed gives the same weights, float16, an AutoencoderTiny on the
    UNet's latents (scaling factor 1, the base VAE's latent channels) that `sdtrt add-tiny-vae` accepts as it is."""
    import shutil

    from diffusers import AutoencoderTiny
    from safetensors.numpy import load_file

    from sdtrt.export.tiny_vae import attach_tiny_vae

    settings = tiny_vae.Settings(base=str(few_steps_model), images=24, generated=12, held_out=4, steps=2, batch=4)
    first = tiny_vae.train(tmp_path / "first", settings)
    second = tiny_vae.train(tmp_path / "second", settings)
    assert _weights(first) == _weights(second) != {}
    weights = load_file(first / "diffusion_pytorch_model.safetensors")
    assert {str(array.dtype) for array in weights.values()} == {"float16"}
    vae = AutoencoderTiny.from_pretrained(first)
    assert vae.config.scaling_factor == 1.0 and vae.config.latent_channels == 4
    assert set(json.loads((first / "training.json").read_text())["held_out"]) == {
        "decoder_mse_shapes",
        "decoder_mse_drawn",
        "encoder_mse",
    }
    export = shutil.copytree(tiny_export, tmp_path / "export")
    assert attach_tiny_vae(export, first).tiny_vae is not None


def test_the_example_maps_are_semantic_maps(tmp_path: Path) -> None:
    from PIL import Image

    from train import shapes

    for path in controlnet.write_example_maps(tmp_path):
        kind, region = shapes.read_map(np.asarray(Image.open(path).convert("RGB")))
        assert kind in path.stem
        assert 0 < region.mean() < 0.5


def test_word_sensitivity_measures_the_first_step(few_steps_model: Path) -> None:
    from train import evaluate

    changes = evaluate.word_sensitivity(few_steps_model, seeds=2)
    assert set(changes) == {"place", "colour"}
    assert all(np.isfinite(value) and value > 0 for value in changes.values())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoising_targets_follow_the_scheduler(prediction_type: str) -> None:
    """The ControlNet trains on its base's own schedule: epsilon on SD 1.x's (the first demo model, b01b81e) or v at
    zero terminal SNR (the shipped one, DEMO_SCHEDULER)."""
    import torch
    from diffusers import DDPMScheduler

    from sdtrt.export.tiny import SD1_SCHEDULER

    config = SD1_SCHEDULER if prediction_type == "epsilon" else tiny.DEMO_SCHEDULER
    latents = torch.randn(4, 4, 8, 8), torch.full((4, 4, 8, 8), 0.1)
    denoising = tiny.Denoising(latents, tiny.Settings(), config)
    torch.manual_seed(0)
    noisy, target, t = denoising.noised(np.arange(4))
    torch.manual_seed(0)  # the same draws again: the posterior sample, the noise, the timesteps
    x0 = latents[0] + latents[1] * torch.randn_like(latents[0])
    noise, steps = torch.randn_like(x0), torch.randint(0, 1000, (4,))
    schedule = DDPMScheduler.from_config(config)
    expected = noise if prediction_type == "epsilon" else schedule.get_velocity(x0, noise, steps)
    assert torch.equal(t, steps) and torch.allclose(noisy, schedule.add_noise(x0, noise, steps))
    assert torch.allclose(target, expected)
    assert torch.isfinite(denoising.loss_weight).all() and (denoising.loss_weight > 0).all()
