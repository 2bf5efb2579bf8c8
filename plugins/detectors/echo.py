"""Echo heads (RazorAttention, Tang et al. 2024; calibration as in Huawei's msModelSlim
``ra_compress``): the attention from each token of a repeated random sequence to its own earlier
occurrences. The detector makes its own sequences (see :class:`framework.api.PreviousOccurrence`
for the definition and sizes)."""

from __future__ import annotations

from framework.api import PreviousOccurrence, hookimpl


class Echo(PreviousOccurrence):
    offset = 0


@hookimpl
def register_detectors(register):
    register("echo", Echo)
