"""The training script of the demo model (train/tiny.py), run for a few steps: seeded, reproducible, loadable."""

from __future__ import annotations

from pathlib import Path

import pytest

from train import tiny

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
    ]:
        with pytest.raises(SystemExit) as exit_info:
            tiny.main(args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
