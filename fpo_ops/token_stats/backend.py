"""The backend protocol: the three passes over (a slice of) the vocabulary that every
implementation of `token_stats` provides, and which one `impl` names.

The single autograd Function (`fpo_ops.token_stats.function`) drives any backend through these passes, with
or without a process group; one process is the one-slice case:

- ``partials(hidden, ref_hidden, local_labels, weight, bias, ref_weight, ref_bias, keys, opts,
  valid=None)``: `fpo_ops.token_stats.online` partials [N] of every token over the rows of ``weight``;
- ``jsd(hidden, ref_hidden, weight, bias, ref_weight, ref_bias, stats, opts, valid=None)``: the
  JSD's second pass given the global ``lse``/``lse_ref`` in ``stats``: {"jsd", "kl_p_m"} [N],
  sums over the rows, so the slices' results add;
- ``backward(hidden, weight, bias, local_labels, ref_hidden, ref_weight, ref_bias, coef, saved,
  opts, need_h, need_w, need_b, valid=None)``: (dhidden [N, H] in the accumulation dtype, this
  slice's share; dweight [V_r, H]; dbias [V_r]), None where not needed.

Labels passed to a pass are relative to the slice: ``label - slice_start``, outside ``[0, V_local)``
where another process owns the label or the token is ignored (-1). ``valid`` ([N] bool) marks the
tokens whose results are used: the Triton passes skip the others, the PyTorch ones compute them
anyway (their values are masked by the caller either way; their gradient is exactly 0 in both).
"""
from typing import Callable, NamedTuple


class Backend(NamedTuple):
    """The three per-slice passes of one implementation (see the module docstring)."""

    partials: Callable
    jsd: Callable
    backward: Callable


def backend_for(impl: str) -> Backend:
    """The passes of ``impl`` ("torch" or "triton"); Triton is imported only on request."""
    if impl == "torch":
        from .chunked import TORCH_BACKEND
        return TORCH_BACKEND
    if impl == "triton":
        try:
            import triton  # noqa: F401  (an optional dependency)
        except ImportError as exc:
            raise ImportError("impl='triton' needs the triton package, which is not installed: "
                              "pip install 'fpo-ops[triton]' (CUDA builds of torch bring it), or use "
                              "impl='torch'") from exc
        from .triton_stats import TRITON_BACKEND
        return TRITON_BACKEND
    raise ValueError(f"impl: expected 'torch' or 'triton' for a streaming backend, got {impl!r}")
