"""Registry of benchmark providers: one module per implementation, looked up by name."""
from typing import Callable, Dict, List

from .base import Provider
from .cce import CCEProvider
from .liger import LigerProvider
from .naive import CompiledNaiveProvider, NaiveProvider
from .ours import ours_reference, ours_torch, ours_triton
from .trl_chunked import TRLChunkedProvider

# Factories, so that each case (and each subprocess) gets fresh provider state.
PROVIDERS: Dict[str, Callable[[], Provider]] = {
    "naive": NaiveProvider,
    "naive-compile": CompiledNaiveProvider,
    "trl": TRLChunkedProvider,
    "liger": LigerProvider,
    "cce": CCEProvider,
    "fpo-torch": ours_torch,
    "fpo-triton": ours_triton,
    "reference": ours_reference,
}

# The provider every other one is checked against before it is timed.
CHECK_BASELINE = "fpo-torch"


def get_provider(name: str) -> Provider:
    """A fresh provider called ``name``.

    Args:
        name: key of `PROVIDERS`.

    Returns:
        The Provider; ValueError names the choices otherwise.
    """
    if name not in PROVIDERS:
        raise ValueError(f"provider: expected one of {sorted(PROVIDERS)}, got {name!r}")
    return PROVIDERS[name]()


def provider_names() -> List[str]:
    """Names of every provider, in table order."""
    return list(PROVIDERS)
