"""What ``desap bench e2e`` measured, as the JSON files in ``bench/results`` hold it: per budget the
full model's and the ideal's prefill, and one :class:`MethodRow` per pruning method, DeSAP
included, with its ratios against both."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Optional

from desap_ops.methods import DEFAULT_METHOD

from .flops import Pieces, PrefillFlops
from .machine import Environment, LoadAverage
from .skeleton import optional


@dataclass
class RoundTimes:
    """Milliseconds of each variant's prefill at one budget, one per timed round."""
    full: list[float]
    ideal: list[float]
    methods: dict[str, list[float]]   # each pruning method's, DeSAP first


@dataclass
class Prefill:
    """The full model's or the ideal's prefill at one budget: FLOPs counted and, timed, the median
    over the rounds."""
    flops: int
    ms: Optional[float] = optional()
    rounds_ms: Optional[list[float]] = optional()

    @classmethod
    def of(cls, flops: int, rounds: Optional[list[float]]) -> Prefill:
        return cls(flops, None if rounds is None else statistics.median(rounds), rounds)


@dataclass
class MethodRow:
    """One pruning method at one budget: what its prefill costs against the full model and the
    ideal (its time and FLOPs beyond the ideal are its pruning work)."""
    flops: int
    flops_reduction: float                                 # full / method FLOPs
    pruning_flops: int                                     # method - ideal FLOPs
    ms: Optional[float] = optional()                       # median over the rounds
    rounds_ms: Optional[list[float]] = optional()
    speedup: Optional[float] = optional()                  # full / method time
    overhead_ms: Optional[float] = optional()              # method - ideal: what the pruning itself costs
    overhead_share: Optional[float] = optional()           # of the method's time
    share_of_ideal_speedup: Optional[float] = optional()   # ideal / method time

    @classmethod
    def of(cls, flops: int, rounds: Optional[list[float]], full: Prefill, ideal: Prefill) -> MethodRow:
        row = cls(flops, full.flops / flops, flops - ideal.flops)
        if rounds is not None:
            ms = row.ms = statistics.median(rounds)
            row.rounds_ms, row.speedup = rounds, full.ms / ms
            row.overhead_ms, row.overhead_share = ms - ideal.ms, (ms - ideal.ms) / ms
            row.share_of_ideal_speedup = ideal.ms / ms
        return row


@dataclass
class E2eRow:
    """One budget: the full model, the ideal and every method, FLOPs counted and, timed, medians."""
    keep: int
    full: Prefill
    ideal: Prefill
    methods: dict[str, MethodRow]                           # DeSAP first, then the others in their order
    ideal_speedup: Optional[float] = optional()             # full / ideal time
    language_flops_reduction: Optional[float] = optional()  # full / pruned language-model FLOPs
    pieces: Optional[Pieces] = optional()                   # FLOPs of the pieces counted apart

    @classmethod
    def of(cls, keep: int, flops: PrefillFlops, rounds: Optional[RoundTimes] = None) -> E2eRow:
        timed = rounds is not None
        full = Prefill.of(flops.full, rounds.full if timed else None)
        ideal = Prefill.of(flops.ideal, rounds.ideal if timed else None)
        methods = {name: MethodRow.of(count, rounds.methods[name] if timed else None, full, ideal)
                   for name, count in flops.methods.items()}
        pieces = flops.pieces
        row = cls(keep, full, ideal, methods, pieces=pieces if pieces != Pieces() else None)
        if timed:
            row.ideal_speedup = full.ms / ideal.ms
        if pieces.language_keep:
            row.language_flops_reduction = pieces.language_full / pieces.language_keep
        return row

    @property
    def desap(self) -> MethodRow:
        return self.methods[DEFAULT_METHOD]


@dataclass
class E2eResult:
    environment: Environment
    model: str
    weights: str                 # "random": real shapes carry random weights
    measured: str                # "timed" or "FLOPs counted"
    device: str
    dtype: str
    batch: int
    image_tokens: int
    text_tokens: int
    methods: list[str]           # DeSAP, then the other methods (--methods)
    rows: list[E2eRow]
    shrink: bool = False         # a real shape at reduced depth and width
    depth_factor: int = 1        # tower and language model this many times shallower, widths kept
    repeats: Optional[int] = optional()
    warmup_rounds: Optional[int] = optional()
    load_average: Optional[LoadAverage] = optional()
    vision_tower_ms: Optional[float] = optional()          # median of the tower alone (LLaVA layouts)
    vision_tower_rounds_ms: Optional[list[float]] = optional()
    command: Optional[str] = optional()   # the call that ran it, where not the command line (a shrunk shape)

    @property
    def timed(self) -> bool:
        return self.measured == "timed"

    @property
    def others(self) -> list[str]:
        """The methods measured beside DeSAP."""
        return self.methods[1:]
