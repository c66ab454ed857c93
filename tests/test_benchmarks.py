"""The benchmark runner: well-formed rows for the tiny model on the CPU backends (ORT CPU, OpenVINO bf16 and
fp32, diffusers fp32 and bf16), ratios, the targets, the report."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks.harness import GPU_BACKENDS, SDTRT_BACKENDS, TORCH_BACKENDS, Job
from benchmarks.presets import PRESET_CONFIGS, build_networks
from benchmarks.report import load_rows, markdown, targets, write_report
from benchmarks.run import BACKENDS, CPU_DEFAULT, add_ratios, run
from sdtrt.engine.manifest import load_manifest

CPU_BACKENDS = ["openvino", "openvino-fp32", "ort-cpu", "torch", "torch-bf16"]
ALL_BACKENDS = [*CPU_BACKENDS, "trt", "ort-cuda", "torch-graph", "torch-compile"]
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
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
    precisions = {"ort-cpu": "fp32", "torch": "fp32", "torch-bf16": "bf16", "openvino-fp32": "fp32"}
    if HAS_OPENVINO:
        from sdtrt.engine.openvino_session import default_compute

        precisions["openvino"] = default_compute()  # bf16 where the CPU has it: the arithmetic's, not the ONNX's
    else:
        for backend in ("openvino", "openvino-fp32"):
            assert by_backend[backend]["status"] == "skipped" and "openvino" in by_backend[backend]["reason"]
    for backend, precision in precisions.items():
        row = by_backend[backend]
        assert row["status"] == "ok", row.get("reason")
        assert (row["device"], row["precision"], row["height"], row["width"], row["batch"]) == (
            "cpu",
            precision,
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
    if HAS_OPENVINO:
        assert "openvino" in by_backend["openvino"]["versions"]
    for backend in ("trt", "ort-cuda", "torch-graph", "torch-compile"):
        row = by_backend[backend]
        assert row["status"] in ("ok", "skipped")
        if row["status"] == "skipped":
            assert row["reason"] and "\n" not in row["reason"]


def test_every_row_has_its_ratio_to_each_peer(tiny_run: Path) -> None:
    rows = {r["backend"]: r for r in load_rows(tiny_run)}
    for name in ("torch", "torch-bf16"):  # diffusers fp32 and bf16
        ours, peer = rows["ort-cpu"], rows[name]
        ratio = ours["vs"][name]
        assert ratio["unet_speedup"] == pytest.approx(peer["unet_ms_median"] / ours["unet_ms_median"])
        assert ratio["e2e_speedup"] == pytest.approx(peer["e2e_ms"] / ours["e2e_ms"])
        assert ratio["unet_cpu_speedup"] == pytest.approx(peer["unet_cpu_ms_median"] / ours["unet_cpu_ms_median"])
        assert ratio["memory_ratio"] == pytest.approx(ours["peak_rss_mib"] / peer["peak_rss_mib"])
        assert name not in peer["vs"]  # never against itself
    assert set(rows["torch"]["vs"]) == {"torch-bf16"} and set(rows["torch-bf16"]["vs"]) == {"torch"}
    for backend in ("openvino", "openvino-fp32") if HAS_OPENVINO else ():
        assert set(rows[backend]["vs"]) == {"torch", "torch-bf16"}


def test_report_writes_table_and_plot(tiny_run: Path, tmp_path: Path) -> None:
    rows = load_rows(tiny_run)
    md, png = write_report(rows, tmp_path / "report.md", tmp_path / "report.png")
    text = md.read_text()
    assert "| ort-cpu (cpu) | fp32 | 128×128 | 2 (CFG) |" in text
    assert "| torch-bf16 (cpu) | bf16 | 128×128 | 2 (CFG) |" in text
    assert "| vs torch | vs torch-bf16 |" in text and "CPU: best sdtrt CPU backend ≥ 2× diffusers fp32" in text
    assert "issue's figure" not in text and "ORT CPU ≥" not in text  # no figure from elsewhere shown as measured
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
    bf16 = {**peer, "backend": "torch-bf16", "unet_ms_median": 75.0, "unet_cpu_ms_median": 60.0, "e2e_ms": 500.0}
    bf16["peak_memory_mib"] = 2000.0
    add_ratios([ours, peer, other_shape, bf16])
    assert ours["vs"] == {
        "torch": {"unet_speedup": 2.0, "e2e_speedup": 1.5, "unet_cpu_speedup": 2.5, "memory_ratio": 0.25},
        "torch-bf16": {"unet_speedup": 1.5, "e2e_speedup": 1.25, "unet_cpu_speedup": 1.5, "memory_ratio": 0.5},
    }
    assert set(peer["vs"]) == {"torch-bf16"} and set(bf16["vs"]) == {"torch"}  # the peers against each other


def test_torch_bf16_is_a_cpu_peer() -> None:
    """diffusers bf16 is a peer of every row, runs on the CPU, and is measured by default without a GPU."""
    assert "torch-bf16" in TORCH_BACKENDS and "torch-bf16" not in GPU_BACKENDS
    assert CPU_DEFAULT == ("openvino", "openvino-fp32", "ort-cpu", "torch", "torch-bf16")
    assert set(CPU_DEFAULT) <= set(BACKENDS) and not set(CPU_DEFAULT) & set(GPU_BACKENDS)


def test_sdtrt_backends_map_to_the_engines_backend_and_precision() -> None:
    """Each benchmark name is one of the engine's backends at a precision that backend offers."""
    from sdtrt.engine.backends import BACKENDS as ENGINE_BACKENDS

    assert SDTRT_BACKENDS["openvino"] == ("openvino", None)  # its default: bf16 where the CPU has it
    assert SDTRT_BACKENDS["openvino-fp32"] == ("openvino", "fp32")
    assert SDTRT_BACKENDS["ort-cpu"] == ("ort-cpu", None)
    for engine, precision in SDTRT_BACKENDS.values():
        backend = ENGINE_BACKENDS[engine]
        assert precision is None or precision in (backend.computes or (backend.precision,))


@pytest.mark.parametrize(
    ("name", "backend", "precision"), [("openvino-fp32", "openvino", "fp32"), ("ort-cpu", "ort-cpu", None)]
)
def test_sdtrt_runner_loads_the_mapped_backend(
    name: str, backend: str, precision: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pipeline.load gets the engine's backend and precision; the row's precision is the arithmetic's."""
    from benchmarks import sdtrt_bench

    calls = []

    def load(folder: str, backend: str, precision: str | None) -> Any:
        calls.append((folder, backend, precision))
        return SimpleNamespace(backend=SimpleNamespace(precision="fp32", compute="bf16"))

    monkeypatch.setattr(sdtrt_bench.Pipeline, "load", load)
    job = Job(name, "model", "export", 64, 64, 2, 2, None, 0, 1, 1, 1, "cpu")
    runner = sdtrt_bench.SdtrtRunner(job)
    runner.load()
    assert calls == [("export", backend, precision)] and runner.precision == "bf16"


def test_availability_names_the_onnx_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan asks the engine about the mapped backend and exports the ONNX variant it reads (fp32 on the CPU)."""
    from benchmarks import run as runner
    from sdtrt.engine import backends
    from sdtrt.engine.backends import Probe

    monkeypatch.setattr(backends, "probe", lambda need: Probe(need != "gpu", "found" if need != "gpu" else "no GPU"))
    variants, skipped = runner._plan([*CPU_BACKENDS, "trt", "torch-graph"], "cpu", None)
    assert variants == {"openvino": "fp32", "openvino-fp32": "fp32", "ort-cpu": "fp32"}
    assert set(skipped) == {"trt", "torch-graph"}


def _cpu_row(backend: str, unet_ms: float, e2e_ms: float, memory: float, **shape: Any) -> dict[str, Any]:
    row = {"model": "sd15", "height": 256, "width": 256, "batch": 2, "steps": 10, "scheduler": "pndm", "threads": 1}
    row.update(shape, backend=backend, status="ok", device="cpu", unet_ms_median=unet_ms, e2e_ms=e2e_ms)
    row.update(unet_cpu_ms_median=unet_ms, peak_memory_mib=memory)
    return row


def test_cpu_targets_judge_the_best_sdtrt_cpu_backend() -> None:
    """The fastest sdtrt CPU row is judged against diffusers fp32 and bf16, step and end to end, and on memory."""
    rows = [
        _cpu_row("openvino", 1000.0, 10_000.0, 1500.0),
        _cpu_row("openvino-fp32", 1800.0, 19_000.0, 2500.0),
        _cpu_row("ort-cpu", 2500.0, 24_000.0, 4800.0),
        _cpu_row("torch", 2100.0, 25_000.0, 4800.0),  # fp32: 2.1× per step, 2.5× end to end
        _cpu_row("torch-bf16", 1300.0, 11_000.0, 2400.0),  # bf16: 1.3× per step but 1.1× end to end
    ]
    add_ratios(rows)
    cpu = {target: (measured, status) for target, measured, status in targets(rows) if target.startswith("CPU")}
    assert list(cpu) == [
        "CPU: best sdtrt CPU backend ≥ 2× diffusers fp32 per UNet step and end to end",
        "CPU: best sdtrt CPU backend ≥ 1.2× diffusers bf16 per UNet step and end to end",
        "CPU: peak RSS of the best sdtrt CPU backend ≤ 0.5× diffusers fp32",
    ]
    fp32, bf16, memory = cpu.values()
    assert fp32[0].startswith("2.10× per step") and "2.50× end to end" in fp32[0] and "(openvino;" in fp32[0]
    assert fp32[1] == "met"
    assert bf16[0].startswith("1.30× per step") and "1.10× end to end" in bf16[0] and bf16[1] == "not met"
    assert memory == ("0.31× (openvino; sd15 256×256 batch 2, 1 thread(s))", "met")


def test_cpu_targets_not_measurable_without_their_rows() -> None:
    only_fp32 = [_cpu_row("ort-cpu", 1000.0, 10_000.0, 4000.0), _cpu_row("torch", 2500.0, 30_000.0, 4000.0)]
    add_ratios(only_fp32)
    fp32, bf16, memory = (t for t in targets(only_fp32) if t[0].startswith("CPU"))
    assert fp32[2] == "met" and "(ort-cpu;" in fp32[1]
    assert bf16[1:] == ("–", "not measurable here: no torch-bf16 row on the CPU in this run")
    assert memory[2] == "not met"
    no_sdtrt = [_cpu_row("torch", 2500.0, 30_000.0, 4000.0)]
    add_ratios(no_sdtrt)
    statuses = [status for target, _, status in targets(no_sdtrt) if target.startswith("CPU")]
    assert statuses == ["not measurable here: no row of an sdtrt CPU backend in this run"] * 3


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


@pytest.mark.skipif(importlib.util.find_spec("nncf") is None, reason="needs nncf (pip install 'sdtrt[quantize]')")
def test_the_int8_row_quantizes_the_export_first(tiny_model_dir: Path, tiny_export: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    options = ["--warmup", "1", "--timed-steps", "2", "--steps", "2", "--device", "cpu", "--threads", "1"]
    model = ["--model", str(tiny_model_dir), "--export", str(export), "--root", str(tmp_path / "cache")]
    size = ["--height", "128", "--width", "128", "--out", str(tmp_path / "int8.jsonl"), "--no-report"]
    backends = ["--backend", "openvino", "openvino-int8", "ort-cpu-int8"]
    rows = {r["backend"]: r for r in run([*model, *backends, *size, *options])}
    for int8 in (rows["openvino-int8"], rows["ort-cpu-int8"]):  # one quantize makes both
        assert int8["status"] == "ok", int8.get("reason")
        assert int8["precision"] == "int8" and int8["quantize_s"] > 0 and int8["interleaved"]
    assert "quantize_s" not in rows["openvino"]
    calibration = load_manifest(export).components["unet"].openvino["int8"].quantization["calibration"]
    assert (calibration["prompts"], calibration["height"], calibration["width"]) == (4, 128, 128)


def test_the_lora_swap_table_runs_on_the_tiny_preset(tmp_path: Path) -> None:
    """`benchmarks.run --lora-swap` end to end on the tiny preset (one round, one timed step): a row per backend
    with every swap column and the UNet step before and with adapters."""
    from benchmarks import lora_swap

    out = tmp_path / "lora-swap.jsonl"
    backends = ["openvino bf16", "ort-cpu"] if HAS_OPENVINO else ["ort-cpu"]
    argv = ["--model", "tiny", "--root", str(tmp_path / "bench"), "--rounds", "1", "--steps", "1", "--out", str(out)]
    rows = lora_swap.run([*argv, "--backend", *backends])
    assert [row["backend"] for row in rows] == backends
    assert [json.loads(line)["backend"] for line in out.read_text().splitlines()] == backends
    for row in rows:
        assert {*lora_swap.COLUMNS, lora_swap.FIRST} <= set(row) and all(
            row[f"{c} call"] >= 0 for c in lora_swap.COLUMNS[:4]
        )
        assert {"before", "rank 0", "rank 16"} <= set(row["unet_step_s"])
    assert "| openvino bf16 |" in out.with_suffix(".md").read_text() or backends == ["ort-cpu"]
