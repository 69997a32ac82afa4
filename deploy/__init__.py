"""What a deployed model costs and how it is deployed: counting, timing, exporting and loading.

The layer below ``methods`` and ``search``: a method times, counts, packs and switches modes
through it, as a trial measures and exports through it, so that both see the same figures.

- counting (:mod:`deploy._counting`): :func:`count_flops` (MACs, FLOPs, bit operations),
  :func:`count_params`, :func:`size_bytes`, and :func:`apply_reported_cost` for the costs a
  method reports itself;
- timing (:mod:`deploy._latency`): :func:`latency_ms`, the one timer, :func:`torch_threads`, and
  :func:`phase` / :func:`recording_phases` (where a trial's wall time goes, ``bench/overhead.py --profile``);
- modes (:mod:`deploy._modes`): :func:`eval_mode`, a model in eval mode for a ``with`` block;
- exporting (:mod:`deploy._export`): the export directory (:func:`export_model`), the inference
  rewrites, the round-trip check, the ahead-of-time compiled form and :func:`deployed_latency`;
- the ONNX form (:mod:`deploy._onnx`): ``model.onnx``, an integer QDQ model where the model is
  quantized, run in ONNX Runtime;
- loading (:mod:`deploy._loading`): each deployable form of :data:`FORMS` by name;
- packing (:mod:`deploy._packing`): the bit packer of integer fields narrower than a byte.
"""

from __future__ import annotations

from deploy._counting import REPORTABLE_COSTS, FlopCount, apply_reported_cost, count_flops, count_params, recurrent_macs, size_bytes
from deploy._export import (
    DEFAULT_LATENCY_RUNTIME,
    EXPORT_FILES,
    LATENCY_RUNTIMES,
    check_round_trip,
    compile_program,
    cpp_compiler,
    deployed_latency,
    export_and_load,
    export_model,
    export_program,
    write_recipe,
)
from deploy._latency import latency_ms, phase, recording_phases, torch_threads
from deploy._loading import (
    CHECKSUMS,
    DEFAULT_FORM,
    FORMS,
    load_compiled,
    load_exported,
    load_form,
    load_module,
    load_program,
    record_checksum,
    storage_groups_quiet,
    verify_checksum,
)
from deploy._modes import eval_mode
from deploy._onnx import OnnxExport, check_onnx, export_onnx, integer_copy, load_onnx, optimized_op_types
from deploy._packing import bit_fields, bit_stream, pack_bits, unpack_bits
from deploy._rewrites import InferenceRewrites, inference_copy, output_diff

__all__ = [
    # counting
    "FlopCount",
    "count_flops",
    "recurrent_macs",
    "count_params",
    "size_bytes",
    "REPORTABLE_COSTS",
    "apply_reported_cost",
    # timing
    "latency_ms",
    "torch_threads",
    "phase",
    "recording_phases",
    # modes
    "eval_mode",
    # exporting
    "EXPORT_FILES",
    "InferenceRewrites",
    "inference_copy",
    "export_program",
    "export_model",
    "export_and_load",
    "write_recipe",
    "output_diff",
    "check_round_trip",
    "cpp_compiler",
    "compile_program",
    "deployed_latency",
    "LATENCY_RUNTIMES",
    "DEFAULT_LATENCY_RUNTIME",
    # the onnx form
    "OnnxExport",
    "export_onnx",
    "integer_copy",
    "load_onnx",
    "check_onnx",
    "optimized_op_types",
    # loading
    "FORMS",
    "DEFAULT_FORM",
    "load_exported",
    "load_program",
    "load_module",
    "CHECKSUMS",
    "record_checksum",
    "verify_checksum",
    "load_compiled",
    "load_form",
    "storage_groups_quiet",
    # packing
    "pack_bits",
    "unpack_bits",
    "bit_stream",
    "bit_fields",
]
