"""Induction heads (RazorAttention, Tang et al. 2024; calibration as in Huawei's msModelSlim
``ra_compress``): the attention from each token of a repeated random sequence to the token after
its earlier occurrences, the token that followed it last time. The detector makes its own
sequences (see :class:`framework.api.PreviousOccurrence` for the definition and sizes)."""

from __future__ import annotations

from framework.api import PreviousOccurrence, hookimpl


class Induction(PreviousOccurrence):
    offset = 1


@hookimpl
def register_detectors(register):
    register("induction", Induction)
