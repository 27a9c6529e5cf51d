"""Deployment exports of trained lab models (independent of ``ds_spngd``): BatchNorm folding and fixed-point BN."""

from __future__ import annotations

from ds_spngd_lab.export.bn_fold import fold_bn_into_conv
from ds_spngd_lab.export.quantized_bn import (
    BATCH_NORMS,
    BNErrorReport,
    QuantizedBatchNorm,
    bn_error_bound,
    bn_input_absmax,
    bn_scale_shift,
    measure_bn_errors,
    quantize_bn,
    quantized_layers,
    shared_frac_bits,
)

__all__ = ["BATCH_NORMS", "BNErrorReport", "QuantizedBatchNorm", "bn_error_bound", "bn_input_absmax",
           "bn_scale_shift", "fold_bn_into_conv", "measure_bn_errors", "quantize_bn", "quantized_layers",
           "shared_frac_bits"]  # fmt: skip
