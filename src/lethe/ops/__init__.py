"""Pure ops: the selective scan (Mamba-1), the SSD scan (Mamba-2) and the causal depthwise
convolution, each beside its reference."""

from lethe.ops.causal_conv1d import causal_conv1d, causal_conv1d_reference
from lethe.ops.scan_reference import selective_scan_ref
from lethe.ops.selective_scan import SCAN_IMPL_CHOICES, resolve_scan_impl, selective_scan
from lethe.ops.ssd import SSD_IMPL_CHOICES, resolve_ssd_impl, ssd_scan
from lethe.ops.ssd_reference import ssd_scan_ref

__all__ = [
    "SCAN_IMPL_CHOICES",
    "SSD_IMPL_CHOICES",
    "causal_conv1d",
    "causal_conv1d_reference",
    "resolve_scan_impl",
    "resolve_ssd_impl",
    "selective_scan",
    "selective_scan_ref",
    "ssd_scan",
    "ssd_scan_ref",
]
