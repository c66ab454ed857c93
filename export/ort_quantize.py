"""ONNX Runtime's int8 UNet for the ort-cpu backend (`sdtrt quantize DIR --int8`): static QDQ, hybrid.

onnxruntime.quantization's static QDQ of the convolutions (uint8 activations in and out, int8 per-channel
weights: ORT's advice for VNNI CPUs; ORT runs them as QLinearConv) and of the inputs of the MatMuls with a
weight (their outputs stay float: MatMulIntegerToFloat), with activation ranges measured on the calibration
inputs export/quantize.py is given. Attention's products (QK^T and its product with V), the norms, the time
embedding (Gemm) and the UNet's first and last convolutions stay in float: the hybrid idea of the openvino
path, in ORT's terms. docs/cpu.md has the measurements (benchmarks/ort_int8.py: 2.69x the fp32 step on the
SD-1.5-shaped UNet, at an output error no larger than openvino int8's).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from sdtrt.engine.fsutil import data_file_name

# the convolutions kept in float, by node name (the UNet's first and last, as export/quantize.py's FIRST_AND_LAST)
FLOAT_CONVOLUTIONS = (r".*/conv_in/.*", r".*/conv_out/.*")
QUANTIZED = ("Conv", "MatMul")  # the op types quantized (and calibrated)
CHUNK = 4  # calibration inputs run at a time (memory: the quantized ops' inputs and outputs are kept per input)


def calibrate(source: Path, samples: Sequence[Mapping[str, np.ndarray]], op_types: Sequence[str], ranges: Path) -> None:
    """Write the ranges (min and max) of the inputs and outputs of ``op_types`` (all ops where empty) in
    ``source`` over ``samples`` (the network's inputs) to ``ranges``, onnxruntime.quantization's calibration
    cache. The samples run CHUNK at a time, each chunk's ranges merged into the last's (ORT 1.32's own
    CalibMaxIntermediateOutputs drops the chunks it clears without measuring them)."""
    from onnxruntime.quantization import CalibrationDataReader, create_calibrator, save_tensors_data

    class Reader(CalibrationDataReader):
        def __init__(self, chunk: Sequence[Mapping[str, np.ndarray]]) -> None:
            self.samples: Iterator[Mapping[str, np.ndarray]] = iter(chunk)

        def get_next(self) -> Mapping[str, np.ndarray] | None:
            return next(self.samples, None)

    with tempfile.TemporaryDirectory(prefix="sdtrt-calibration.") as scratch:
        augmented = Path(scratch) / "augmented.onnx"
        calibrator = create_calibrator(source, list(op_types), str(augmented), use_external_data_format=True)
        for start in range(0, len(samples), CHUNK):
            calibrator.collect_data(Reader(samples[start : start + CHUNK]))
        save_tensors_data(calibrator.compute_data(), ranges)
        del calibrator


def quantize_static_qdq(
    source: Path,
    target: Path,
    ranges: Path,
    op_types: Sequence[str] = QUANTIZED,
    float_outputs: Sequence[str] = ("MatMul",),
) -> None:
    """Write ``source``'s static QDQ graph to ``target`` (+ its .data): ``op_types`` quantized, the outputs of
    ``float_outputs`` left float, attention's products and FLOAT_CONVOLUTIONS left alone, with the activation
    ranges in ``ranges`` (calibrate's)."""
    import onnx

    graph = onnx.load(str(source), load_external_data=False).graph
    weights = {tensor.name for tensor in graph.initializer}
    excluded = [
        node.name
        for node in graph.node
        if (node.op_type == "MatMul" and not weights.intersection(node.input))
        or (node.op_type == "Conv" and any(re.fullmatch(pattern, node.name) for pattern in FLOAT_CONVOLUTIONS))
    ]
    advice = _Advice()  # ORT's root-logger advice to preprocess the model, each call: not the user's to act on
    logging.getLogger().addFilter(advice)
    try:
        _quantize_static(source, target, ranges, op_types, float_outputs, excluded)
    finally:
        logging.getLogger().removeFilter(advice)


class _Advice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider")


def _quantize_static(
    source: Path,
    target: Path,
    ranges: Path,
    op_types: Sequence[str],
    float_outputs: Sequence[str],
    excluded: list[str],
) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        str(source),
        str(target),
        None,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(op_types),
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded,
        use_external_data_format=True,
        calibration_cache_path=str(ranges),
        extra_options={"OpTypesToExcludeOutputQuantization": list(float_outputs), "MatMulConstBOnly": True},
    )


def rename_onnx(staged: Path, name: str) -> Path:
    """Move ``staged`` and its external data to ``name`` (and data_file_name(name)) beside it, the graph's
    external-data locations renamed with them; the new path."""
    import onnx

    model = onnx.load(str(staged), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_file_name(name)
    target = staged.with_name(name)
    os.replace(staged.with_name(data_file_name(staged.name)), target.with_name(data_file_name(name)))
    onnx.save(model, str(target))
    staged.unlink()
    return target
