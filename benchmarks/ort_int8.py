"""ONNX Runtime int8 recipes for the ort-cpu UNet, measured against fp32 ORT and the openvino paths (issue 25).

    python -m benchmarks.ort_int8 EXPORT WORK record            # UNet inputs and fp32 outputs the runtime drew
    python -m benchmarks.ort_int8 EXPORT WORK quantize RECIPE   # WORK/RECIPE/unet.onnx (onnxruntime.quantization)
    python -m benchmarks.ort_int8 EXPORT WORK compare RECIPE... # error on held-out inputs, then UNet steps in turns

EXPORT is an fp32 sdtrt export (an SD-1.5-shaped one for numbers that mean something); WORK a scratch folder
(each recipe's model is about 1 GB there). The calibration inputs are the UNet's inputs recorded while the
runtime (ort-cpu, fp32) drew sdtrt.quantize's built-in prompts, as `sdtrt quantize` records them for NNCF;
the error is measured on the inputs of other prompts and seeds, against the fp32 UNet's own outputs there.
Recipes (RECIPES below) use onnxruntime.quantization only; "openvino-int8" and "openvino" (bf16) in compare
are the export's own openvino paths (run `sdtrt quantize EXPORT --int8` first for int8).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sdtrt.export.ort_quantize import QUANTIZED, calibrate, quantize_static_qdq

log = logging.getLogger("benchmarks.ort_int8")

EVAL_PROMPTS = (
    "a bowl of fruit on a wooden table, still life, oil painting",
    "a snowy mountain range under a starry sky",
)
EVAL_SEED = 1000  # the held-out prompts' seeds: EVAL_SEED + index
FLOAT_NODES = ("/unet/conv_in/Conv", "/unet/conv_out/Conv")  # as export/ort_quantize.py's FLOAT_CONVOLUTIONS


def _static(work: Path, source: Path, target: Path, op_types: list[str], float_outputs: list[str]) -> None:
    """export/ort_quantize.py's static QDQ (uint8 activations, int8 per-channel weights) of ``op_types`` (all
    where empty), attention's products and the first and last convolutions left alone, with the ranges of the
    recorded calibration inputs (measured once for the Conv and MatMul recipes, once for "all")."""
    ranges = work / ("ranges.json" if op_types else "ranges-all.json")
    if not ranges.exists():
        calibrate(source, _load(work / "calibration.npz")[0], QUANTIZED if op_types else (), ranges)
    quantize_static_qdq(source, target, ranges, op_types, float_outputs)


def _nbits(source: Path, target: Path, accuracy_level: int) -> None:
    """MatMulNBits: int8 blockwise weights of every MatMul with a weight; accuracy level 1 computes in fp32,
    4 in int8 (activations quantized per block while running)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(source))
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=accuracy_level, bits=8)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=True)


def _dynamic(source: Path, target: Path) -> None:
    """Dynamic quantization of the MatMuls with a weight: int8 weights, activations quantized per tensor while
    running (MatMulInteger)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(target),
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(FLOAT_NODES),
        use_external_data_format=True,
        extra_options={"MatMulConstBOnly": True},
    )


# sweep's groups (memory: each group's models are loaded together, with fp32 ORT), weights-only first
SWEEP = (
    ["nbits-int8", "dynamic-matmul", "nbits-fp32", "openvino-int8"],
    ["hybrid", "hybrid-conv", "hybrid-matmul", "all", "openvino-int8", "openvino"],
    ["hybrid-conv-in"],
)

RECIPES: dict[str, Callable[[Path, Path, Path], None]] = {
    # weights only
    "nbits-fp32": lambda work, source, target: _nbits(source, target, 1),
    "nbits-int8": lambda work, source, target: _nbits(source, target, 4),
    "dynamic-matmul": lambda work, source, target: _dynamic(source, target),
    # hybrid static QDQ: convolutions (inputs and outputs: ORT fuses DQ-Conv-Q into QLinearConv) and the
    # MatMuls with a weight (inputs only: DQ-MatMul becomes MatMulIntegerToFloat), not attention's products
    "hybrid": lambda work, source, target: _static(work, source, target, ["Conv", "MatMul"], ["MatMul"]),
    "hybrid-conv": lambda work, source, target: _static(work, source, target, ["Conv"], []),
    # convolutions with float outputs: no QLinearConv (does ORT run DQ-Conv any faster?)
    "hybrid-conv-in": lambda work, source, target: _static(work, source, target, ["Conv"], ["Conv"]),
    "hybrid-matmul": lambda work, source, target: _static(work, source, target, ["MatMul"], ["MatMul"]),
    # every supported op, activations included (last session's 2.21x at 20 % error), for reference
    "all": lambda work, source, target: _static(work, source, target, [], []),
}


def _save(path: Path, samples: list[dict[str, np.ndarray]], outputs: list[np.ndarray]) -> None:
    arrays = {f"{i}:{name}": value for i, sample in enumerate(samples) for name, value in sample.items()}
    arrays |= {f"{i}:@output": value for i, value in enumerate(outputs)}
    np.savez(path, **arrays)


def _load(path: Path) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    with np.load(path) as data:
        count = 1 + max(int(key.partition(":")[0]) for key in data.files)
        samples: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
        outputs: list[np.ndarray] = [np.empty(0)] * count
        for key in data.files:
            index, _, name = key.partition(":")
            if name == "@output":
                outputs[int(index)] = data[key]
            else:
                samples[int(index)][name] = data[key]
    return samples, outputs


def record(export: Path, work: Path, height: int, width: int, steps: int, prompts: int) -> None:
    """The UNet's inputs and fp32 outputs while ort-cpu draws the calibration and the held-out prompts."""
    from sdtrt.quantize import DEFAULT_PROMPTS
    from sdtrt.runtime.pipeline import Pipeline

    class Recorder:
        def __init__(self, sessions) -> None:
            self.sessions, self.samples, self.outputs = sessions, [], []

        def run_all(self, network: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
            results = self.sessions.run_all(network, **feeds)
            if network == "unet":
                self.samples.append({name: np.array(value) for name, value in feeds.items()})
                (output,) = results.values()
                self.outputs.append(np.array(output))
            return results

        def run(self, network: str, **feeds: np.ndarray) -> np.ndarray:
            (output,) = self.run_all(network, **feeds).values()
            return output

    options = {"num_inference_steps": steps, "height": height, "width": width, "guidance_scale": 7.5}
    sets = {
        "calibration": [(prompt, seed) for seed, prompt in enumerate(DEFAULT_PROMPTS[:prompts])],
        "evaluation": [(prompt, EVAL_SEED + i) for i, prompt in enumerate(EVAL_PROMPTS)],
    }
    with Pipeline.load(export, backend="ort-cpu") as pipe:
        for name, drawn in sets.items():
            recorder = Recorder(pipe.sessions)
            for prompt, seed in drawn:
                pipe.txt2img(prompt, seed=seed, decode=False, runner=recorder, **options)
                log.info("%s: %s (%d UNet calls so far)", name, prompt, len(recorder.samples))
            _save(work / f"{name}.npz", recorder.samples, recorder.outputs)
    (work / "record.json").write_text(json.dumps({"prompts": prompts, **options}))


def _sessions(export: Path, work: Path, names: list[str], threads: int) -> dict[str, Callable]:
    """name -> a call running the UNet on feeds: fp32 ORT, each recipe's model on ORT, the openvino paths."""
    from sdtrt.engine.ort_session import OrtCpuSession
    from sdtrt.runtime.pipeline import Pipeline

    runs: dict[str, Callable] = {}
    for name in ["fp32", *names]:
        if name.startswith("openvino"):
            precision = "int8" if name == "openvino-int8" else None
            session = Pipeline.load(export, backend="openvino", precision=precision).session("unet")
        else:
            path = export / "unet.onnx" if name == "fp32" else work / name / "unet.onnx"
            session = OrtCpuSession(path, threads=threads)
        runs[name] = lambda feeds, session=session: next(iter(session.run(feeds).values()))
    return runs


def compare(
    export: Path, work: Path, names: list[str], threads: int, warmup: int, rounds: int, count: int
) -> list[dict]:
    """Each model's error on ``count`` of the held-out inputs (evenly spaced), then its UNet step time, all models
    taking turns."""
    samples, references = _load(work / "evaluation.npz")
    chosen = np.linspace(0, len(samples) - 1, min(count, len(samples))).round().astype(int)
    samples, references = [samples[i] for i in chosen], [references[i] for i in chosen]
    runs = _sessions(export, work, names, threads)
    rows = []
    for name, run in runs.items():
        rel, peak = [], []
        for feeds, reference in zip(samples, references, strict=True):
            error = run(feeds) - reference
            rel.append(float(np.linalg.norm(error) / np.linalg.norm(reference)))
            peak.append(float(np.abs(error).max() / np.abs(reference).max()))
        rows.append({"model": name, "rel_l2_mean": float(np.mean(rel)), "rel_l2_max": max(rel), "max_rel": max(peak)})
        log.info("%s: error %s", name, rows[-1])
    feeds = samples[0]
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(warmup + rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run(feeds)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    base = float(np.median(times["fp32"]))
    for row in rows:
        ms = float(np.median(times[row["model"]]))
        row |= {"unet_ms_median": ms * 1000, "speedup_vs_fp32": base / ms}
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ort_int8", description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path)
    p.add_argument("work", type=Path)
    p.add_argument("action", choices=("record", "quantize", "compare", "sweep"))
    p.add_argument("recipes", nargs="*", help=f"{', '.join(RECIPES)}; compare also openvino-int8, openvino")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts", type=int, default=3, help="calibration prompts (default 3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--samples", type=int, default=11, help="held-out inputs the error is measured on (default 11)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("SDTRT_NUM_THREADS", str(args.threads))
    args.work.mkdir(parents=True, exist_ok=True)
    if args.action == "record":
        record(args.export, args.work, args.height, args.width, args.steps, args.prompts)
    elif args.action == "quantize":
        _quantize(args.export, args.work, args.recipes)
    elif args.action == "compare":
        _compare(args, args.recipes)
    else:  # sweep: each group quantized, compared, and its models deleted (disk) before the next
        for group in SWEEP:
            _quantize(args.export, args.work, [name for name in group if name in RECIPES])
            _compare(args, group)
            for name in group:
                shutil.rmtree(args.work / name, ignore_errors=True)


def _quantize(export: Path, work: Path, recipes: list[str]) -> None:
    for recipe in sorted(recipes, key=list(RECIPES).index):
        start = time.perf_counter()
        (work / recipe).mkdir(exist_ok=True)
        RECIPES[recipe](work, export / "unet.onnx", work / recipe / "unet.onnx")
        log.info("%s: quantized in %.0f s", recipe, time.perf_counter() - start)


def _compare(args: argparse.Namespace, names: list[str]) -> None:
    rows = compare(args.export, args.work, names, args.threads, args.warmup, args.rounds, args.samples)
    load = os.getloadavg()[0]
    with (args.work / "results.jsonl").open("a") as out:
        for row in rows:
            line = json.dumps({**row, "load_avg": load, "group": names})
            print(line)
            out.write(line + "\n")


if __name__ == "__main__":
    main()
