"""benchmarks/fp32_packing.py: the work it records, worked by hand."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fp32_packing  # noqa: E402


def test_a_step_s_flops_are_smollm2_s_projections_by_hand():
    # a layer: q 576x576 + k, v 576x192 each + o 576x576 + gate, up 576x1536 each + down 1536x576
    per_layer = 331_776 + 2 * 110_592 + 331_776 + 2 * 884_736 + 884_736
    assert fp32_packing.step_flops(rows=8) == 2 * 8 * 30 * per_layer
