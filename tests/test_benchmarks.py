"""The benchmark runner: well-formed rows for the tiny model on ORT CPU and torch CPU, ratios, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.presets import PRESET_CONFIGS, build_networks
from benchmarks.report import load_rows, markdown, targets, write_report
from benchmarks.run import add_ratios, run

ALL_BACKENDS = ["ort-cpu", "torch", "trt", "ort-cuda", "torch-graph", "torch-compile"]
TIMINGS = ("unet_ms_median", "unet_ms_p90", "unet_cpu_ms_median", "it_per_s", "text_encoder_ms", "vae_decode_ms")
TIMINGS += ("e2e_ms", "loop_ms", "step_ms")


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir: Path, tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One runner invocation on the tiny model: every backend asked for, on the CPU."""
    out = tmp_path_factory.mktemp("bench") / "tiny.jsonl"
    options = ["--warmup", "1", "--timed-steps", "3", "--steps", "2", "--device", "cpu", "--threads", "1"]
    model = ["--model", str(tiny_model_dir), "--export", str(tiny_export), "--root", str(out.parent / "cache")]
    run([*model, "--backend", *ALL_BACKENDS, "--height", "128", "--width", "128", *options, "--out", str(out)])
    return out


def test_rows_are_well_formed(tiny_run: Path) -> None:
    rows = [json.loads(line) for line in tiny_run.read_text().splitlines()]
    assert [r["backend"] for r in rows] == ALL_BACKENDS
    assert len({r["run_id"] for r in rows}) == 1
    by_backend = {r["backend"]: r for r in rows}
    for backend in ("ort-cpu", "torch"):
        row = by_backend[backend]
        assert row["status"] == "ok", row.get("reason")
        assert (row["device"], row["precision"], row["height"], row["width"], row["batch"]) == (
            "cpu",
            "fp32",
            128,
            128,
            2,
        )
        assert row["cfg"] and row["images"] == 1
        assert row["scheduler"] == "pndm" and row["loop_steps"] == 3  # PNDM takes one UNet step more than asked
        for key in TIMINGS:
            assert row[key] > 0, key
        assert row["unet_ms_p90"] >= row["unet_ms_median"] >= row["unet_ms_min"]
        assert 0 <= row["outside_unet_share"] < 1
        assert row["peak_rss_mib"] > 100 and row["peak_memory_mib"] == row["peak_rss_mib"]
        assert row["cpu"] and row["cpu_cores"] >= 1 and row["device_name"].startswith(row["cpu"])
        assert {"python", "numpy", "sdtrt"} <= set(row["versions"])
        assert row["load_s"] > 0 and row["compile_s"] is None
        assert row["interleaved"]  # the CPU backends took turns, step by step
    assert "onnxruntime" in by_backend["ort-cpu"]["versions"] and "torch" in by_backend["torch"]["versions"]
    assert by_backend["ort-cpu"]["export_cached"] is True  # the given export: no export time measured here
    for backend in ("trt", "ort-cuda", "torch-graph", "torch-compile"):
        row = by_backend[backend]
        assert row["status"] in ("ok", "skipped")
        if row["status"] == "skipped":
            assert row["reason"] and "\n" not in row["reason"]


def test_every_row_has_its_ratio_to_each_peer(tiny_run: Path) -> None:
    rows = {r["backend"]: r for r in load_rows(tiny_run)}
    ours, peer = rows["ort-cpu"], rows["torch"]
    ratio = ours["vs"]["torch"]
    assert ratio["unet_speedup"] == pytest.approx(peer["unet_ms_median"] / ours["unet_ms_median"])
    assert ratio["e2e_speedup"] == pytest.approx(peer["e2e_ms"] / ours["e2e_ms"])
    assert ratio["unet_cpu_speedup"] == pytest.approx(peer["unet_cpu_ms_median"] / ours["unet_cpu_ms_median"])
    assert ratio["memory_ratio"] == pytest.approx(ours["peak_rss_mib"] / peer["peak_rss_mib"])
    assert "torch" not in peer["vs"]  # never against itself


def test_report_writes_table_and_plot(tiny_run: Path, tmp_path: Path) -> None:
    rows = load_rows(tiny_run)
    md, png = write_report(rows, tmp_path / "report.md", tmp_path / "report.png")
    text = md.read_text()
    assert "| ort-cpu (cpu) | fp32 | 128×128 | 2 (CFG) |" in text
    assert "vs torch" in text and "CPU: ORT CPU" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    statuses = {target: status for target, _, status in targets(rows)}
    assert all(s in ("met", "not met") or s.startswith("not measurable here") for s in statuses.values())
    assert tiny_run.with_suffix(".md").is_file() and tiny_run.with_suffix(".png").is_file()  # the runner's own


def test_unsupported_family_is_a_skipped_row(tmp_path: Path) -> None:
    """A pipeline class the sdtrt export refuses (from the configs alone): a skipped row, and the run goes on."""
    model = tmp_path / "sd3-like"
    configs = PRESET_CONFIGS["sd15"]
    files = {
        "model_index.json": {
            "_class_name": "StableDiffusion3Pipeline",
            "text_encoder": ["transformers", "CLIPTextModel"],
        },
        "scheduler/scheduler_config.json": configs["scheduler"],
        "text_encoder/config.json": configs["text_encoder"],
        "unet/config.json": configs["unet"],
        "vae/config.json": configs["vae"],
    }
    for name, content in files.items():
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_text(json.dumps(content))
    out = tmp_path / "sd3.jsonl"
    rows = run(["--model", str(model), "--backend", "ort-cpu", "--root", str(tmp_path / "cache"), "--out", str(out)])
    (row,) = rows
    assert row["status"] == "skipped" and "not supported" in row["reason"] and "\n" not in row["reason"]
    assert row["height"] == row["width"] == 512 and row["scheduler"] == "pndm"
    assert "Not measured:" in markdown(rows)


@pytest.mark.slow
def test_sdxl_family_rows(tmp_path: Path) -> None:
    """The SDXL paths: two text encoders, pooled text and size ids into the UNet, on ORT CPU and torch."""
    from sdtrt.export.tiny import build_tiny_sdxl

    model = build_tiny_sdxl(tmp_path / "tiny-sdxl")
    options = ["--steps", "2", "--timed-steps", "2", "--warmup", "1", "--threads", "1", "--device", "cpu"]
    options += ["--root", str(tmp_path / "cache"), "--out", str(tmp_path / "sdxl.jsonl")]
    rows = run(["--model", str(model), "--backend", "ort-cpu", "torch", *options])
    assert [(r["backend"], r["status"], r["pipeline"]) for r in rows] == [
        ("ort-cpu", "ok", "StableDiffusionXLPipeline"),
        ("torch", "ok", "StableDiffusionXLPipeline"),
    ]
    assert rows[0]["scheduler"] == "euler" and "torch" in rows[0]["vs"]


def test_ratios_are_peer_time_over_row_time() -> None:
    shape = {"model": "m", "height": 64, "width": 64, "batch": 2, "steps": 2, "scheduler": "ddim", "status": "ok"}
    ours = {**shape, "backend": "ort-cpu", "device": "cpu", "unet_ms_median": 50.0, "e2e_ms": 400.0}
    peer = {**shape, "backend": "torch", "device": "cpu", "unet_ms_median": 100.0, "e2e_ms": 600.0}
    ours["unet_cpu_ms_median"], peer["unet_cpu_ms_median"] = 40.0, 100.0
    other_shape = {**peer, "batch": 4}
    ours["peak_memory_mib"], peer["peak_memory_mib"], other_shape["peak_memory_mib"] = 1000.0, 4000.0, 1.0
    add_ratios([ours, peer, other_shape])
    assert ours["vs"] == {
        "torch": {"unet_speedup": 2.0, "e2e_speedup": 1.5, "unet_cpu_speedup": 2.5, "memory_ratio": 0.25}
    }


def test_presets_have_the_real_models_sizes() -> None:
    """Parameter counts of SD 1.5's and SDXL's networks (built on the meta device: shapes, no weights)."""
    expected = {
        "sd15": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
        "sdxl": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863},
    }
    for preset, counts in expected.items():
        networks = build_networks(preset, device="meta")
        assert {name: sum(p.numel() for p in net.parameters()) for name, net in networks.items()} == counts


@pytest.mark.gpu
def test_cuda_graph_peer_replays_the_eager_unet(tiny_model_dir: Path) -> None:
    """torch-graph's wrapper: a replay equals the eager UNet, and a new shape gets its own graph."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU for torch")
    from diffusers import UNet2DConditionModel

    from benchmarks.torch_bench import CudaGraphed

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").to("cuda").eval()
    graphed = CudaGraphed(unet.forward)
    generator = torch.Generator().manual_seed(0)
    for batch in (2, 1, 2):
        sample = torch.randn(batch, 4, 16, 16, generator=generator).cuda()
        states = torch.randn(batch, 77, 32, generator=generator).cuda()
        timestep = torch.tensor(981.0, device="cuda")
        with torch.no_grad():
            expected = unet(sample, timestep, encoder_hidden_states=states, return_dict=False)[0]
            replayed = graphed(sample, timestep, encoder_hidden_states=states, return_dict=False)[0]
        torch.testing.assert_close(replayed, expected, rtol=1e-4, atol=1e-5)
    assert len(graphed._graphs) == 2


@pytest.mark.gpu
def test_gpu_peers_give_rows(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The diffusers GPU peers (eager, CUDA graph, torch.compile + CUDA graph) on the tiny model."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU for torch")
    out = tmp_path / "gpu.jsonl"
    options = ["--warmup", "1", "--timed-steps", "3", "--steps", "2", "--device", "cuda", "--out", str(out)]
    rows = run(["--model", str(tiny_model_dir), "--backend", "torch", "torch-graph", "torch-compile", *options])
    for row in rows:
        assert row["status"] == "ok", row.get("reason")
        assert row["device"] == "cuda" and row["precision"] == "fp16" and row["unet_ms_median"] > 0
        assert row["compile_s"] is None if row["backend"] == "torch" else row["compile_s"] > 0
    assert set(rows[0]["vs"]) == {"torch-graph", "torch-compile"}
