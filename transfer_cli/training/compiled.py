"""torch.compile once per stage (trainer.compile=true), and what it did.

Dynamo guards a compiled forward on the `requires_grad` of every parameter, the grad mode and the input
shapes. One compiled module kept across stages recompiles at every stage boundary (the unfrozen layers),
for inference-mode validation and for a ragged last val batch; past `torch._dynamo.config.recompile_limit`
(8) recompiles of one function it falls back to eager without a word, and under inductor each recompile
costs tens of seconds. So each stage compiles afresh after its freezing (dynamo's caches cleared first),
validation runs the plain network, training batches have one shape (train loaders drop a ragged last
batch), and each stage logs how many graphs it compiled and recompiled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn


log = logging.getLogger(__name__)


class CompileCounts(NamedTuple):
    compiles: int  # frames traced into graphs (a graph break makes more than one per forward)
    recompiles: int  # traced again because a guard of an earlier graph failed
    limit_hits: int  # recompiles refused at dynamo's recompile_limit: those frames run eager from then on
    complete: bool  # False when dynamo's record of compilations overflowed: the counts are lower bounds


@dataclass
class CompileWatch:
    """What torch.compile did in one stage, read from dynamo's compilation records (cleared at the stage's start)."""

    stage: str
    reported: CompileCounts | None = None
    reasons: list[str] = field(default_factory=list)

    def counts(self) -> CompileCounts:
        from torch._dynamo import utils as dynamo_utils

        records = dynamo_utils.get_compilation_metrics()
        limit_hits = [r for r in records if _hit_limit(r)]
        recompiles = [r for r in records if r.recompile_reason is not None and not _hit_limit(r)]
        compiles = [r for r in records if r.is_forward is not False and r.fail_type is None]
        self.reasons = [str(r.recompile_reason).strip().splitlines()[0] for r in recompiles + limit_hits]
        full = len(records) == dynamo_utils.DEFAULT_COMPILATION_METRICS_LIMIT
        return CompileCounts(len(compiles), len(recompiles), len(limit_hits), not full)

    def report(self) -> CompileCounts:
        """Log the stage's counts the first time, and again only when they grew (a recompile after the first epoch
        of a stage is a surprise: it says why); a recompile-limit hit is a warning: the forward runs eager."""
        counts = self.counts()
        if counts == self.reported:
            return counts
        first, self.reported = self.reported is None, counts
        bound = "" if counts.complete else "at least "
        line = (f"stage '{self.stage}': torch.compile compiled {bound}{counts.compiles} graph(s), "
                f"{bound}{counts.recompiles} recompile(s)")
        if counts.limit_hits:
            log.warning("%s; %d hit torch._dynamo.config.recompile_limit (%d): those frames now run EAGER, "
                        "uncompiled (last reason: %s); set TORCH_LOGS=recompiles to see every guard that failed",
                        line, counts.limit_hits, _recompile_limit(), self.reasons[-1] if self.reasons else "unknown")
        elif not first:
            log.warning("%s, since the stage's first epoch (last reason: %s)", line,
                        self.reasons[-1] if self.reasons else "unknown")
        else:
            log.info("%s%s", line, f" (first reason: {self.reasons[0]})" if self.reasons else "")
        return counts


def _hit_limit(record: Any) -> bool:
    reason = f"{record.fail_type} {record.fail_reason}".lower()
    return "recompile limit" in reason or "recompile_limit" in reason or "cache_size_limit" in reason


def _recompile_limit() -> int:
    from torch._dynamo import config

    return int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))


def compile_for_stage(module: nn.Module, stage: str) -> tuple[nn.Module, CompileWatch]:
    """A fresh `torch.compile(module)` for `stage`, called after its freezing: dynamo forgets the earlier stages'
    graphs (their guards would count this stage's trace as a recompile) and its compilation records, so the
    stage traces once, with its own requires_grad flags, at its first step."""
    from torch import _dynamo as dynamo
    from torch._dynamo import utils as dynamo_utils

    dynamo.reset()
    dynamo_utils.clear_compilation_metrics()
    log.info("stage '%s': torch.compile afresh (the first step traces the model)", stage)
    return torch.compile(module), CompileWatch(stage)
