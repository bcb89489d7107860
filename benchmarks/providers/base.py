"""What every provider offers: whether it can run a case, and a closure computing the case's loss."""
from typing import Callable, Dict, Optional, Tuple

import torch

from ..heads import HeadSpec
from ..workloads import CaseInputs, Workload

LossFn = Callable[[], torch.Tensor]


class Provider:
    """One implementation of the LM-head statistics benchmarked against the others.

    Subclasses set ``name`` and ``description`` and implement `build`; `unsupported` says why a case
    cannot run (missing package, device, statistic or option), None when it can.
    """

    name: str = ""
    description: str = ""
    # Statistics the provider can produce (used by the default `unsupported`).
    supported_outputs: Tuple[str, ...] = ()
    supports_softcap: bool = True

    def unsupported(self, workload: Workload, head: HeadSpec, device: torch.device) -> Optional[str]:
        missing = [name for name in workload.outputs if name not in self.supported_outputs]
        if missing:
            return f"does not compute {missing}"
        if head.softcap is not None and not self.supports_softcap:
            return "no logit softcap"
        return None

    def build(self, workload: Workload, inputs: CaseInputs) -> LossFn:
        """A closure that runs the forward of one step and returns the workload's scalar loss."""
        raise NotImplementedError


class TokenStatsProvider(Provider):
    """A provider that returns per-token statistics; the workload turns them into its loss."""

    def token_stats(self, inputs: CaseInputs, outputs: Tuple[str, ...]) -> Dict[str, torch.Tensor]:
        """Per-token statistics ``{name: [B, T]}`` (0 at ignored positions) for ``outputs``."""
        raise NotImplementedError

    def build(self, workload: Workload, inputs: CaseInputs) -> LossFn:
        def step() -> torch.Tensor:
            return workload.loss(self.token_stats(inputs, workload.outputs), inputs)
        return step


def module_missing(module: str) -> Optional[str]:
    """None when ``module`` imports, else the reason (the import error) as a short string."""
    try:
        __import__(module)
    except Exception as exc:  # a broken optional dependency must only disable its provider
        return f"{module} unavailable: {type(exc).__name__}: {exc}"
    return None
