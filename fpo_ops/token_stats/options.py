"""The non-tensor options of one `token_stats` call, in one frozen (hashable) dataclass."""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class HeadOptions:
    """Everything about the two heads that is not a tensor.

    Logits of each model are ``cap(logit_scale * (h @ W^T + b)) / temperature`` with
    ``cap(x) = softcap * tanh(x / softcap)`` when a softcap is given.
    """

    outputs: Tuple[str, ...] = ("logp",)
    ignore_index: int = -100
    temperature: float = 1.0
    softcap: Optional[float] = None
    logit_scale: float = 1.0
    ref_softcap: Optional[float] = None
    ref_logit_scale: float = 1.0
    jsd_beta: float = 0.5
    # dtype the GEMMs run in (the autocast dtype, else the inputs' dtype).
    compute_dtype: torch.dtype = torch.float32
    # Backward of impl="triton" only: > 0 drops logit-gradient tiles whose p and q are all below it.
    grad_filter_eps: float = 0.0

    @property
    def accum_dtype(self) -> torch.dtype:
        """dtype of every sum over the vocabulary or tokens: fp32, or fp64 for fp64 inputs."""
        return torch.float64 if self.compute_dtype == torch.float64 else torch.float32

    def wants(self, name: str) -> bool:
        return name in self.outputs
