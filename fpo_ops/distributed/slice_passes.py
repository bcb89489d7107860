"""The work one process does on its own slice of the vocabulary, before and after communication.

A vocabulary-parallel call needs three passes over the local rows of the head, each a pure
function of local tensors plus (after the all-reduces) global per-token scalars:

- ``partials``: `fpo_ops.online` partials of every token over the slice;
- ``jsd``: the JSD's second pass with the global log-normalisers (sums over the slice);
- ``backward``: dhidden (this slice's share, accumulation dtype), dweight and dbias of the slice.

Labels passed to a pass are relative to the slice: ``label - slice_start``, outside ``[0, V_local)``
where another process owns the label or the token is ignored. ``valid`` ([N] bool) marks the tokens
whose results are used: the Triton passes skip the others, the PyTorch ones compute them anyway
(their values are masked by the caller either way; their gradient is exactly 0 in both).
"""
from typing import Callable, Dict, NamedTuple, Tuple

import torch

from .. import chunked
from ..online import Partials
from ..options import HeadOptions


class SlicePasses(NamedTuple):
    """The three per-slice passes of one implementation (see the module docstring)."""

    partials: Callable
    jsd: Callable
    backward: Callable


def _torch_partials(hidden, ref_hidden, local_labels, weight, bias, ref_weight, ref_bias,
                    keys: Tuple[str, ...], opts: HeadOptions, valid=None) -> Partials:
    """Partials [N] of every token over the slice, streamed in token blocks."""
    blocks = []
    for n0 in range(0, max(hidden.shape[0], 1), chunked.TOKEN_BLOCK):  # one empty block for N = 0
        n1 = min(n0 + chunked.TOKEN_BLOCK, hidden.shape[0])
        blocks.append(chunked.vocab_partials(
            hidden[n0:n1], None if ref_hidden is None else ref_hidden[n0:n1], local_labels[n0:n1],
            weight, bias, ref_weight, ref_bias, keys, opts,
        ))
    return {key: torch.cat([block[key] for block in blocks]) for key in blocks[0]}


def _torch_jsd(hidden, ref_hidden, weight, bias, ref_weight, ref_bias, stats: Dict[str, torch.Tensor],
               opts: HeadOptions, valid=None) -> Dict[str, torch.Tensor]:
    """This slice's terms of ``jsd`` and ``kl_p_m`` [N], given the global ``lse``/``lse_ref``."""
    parts = []
    for n0 in range(0, max(hidden.shape[0], 1), chunked.TOKEN_BLOCK):  # one empty block for N = 0
        n1 = min(n0 + chunked.TOKEN_BLOCK, hidden.shape[0])
        block_stats = {name: stats[name][n0:n1] for name in ("lse", "lse_ref")}
        parts.append(chunked.jsd_pass(hidden[n0:n1], ref_hidden[n0:n1], weight, bias, ref_weight,
                                      ref_bias, block_stats, opts))
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _torch_backward(hidden, weight, bias, local_labels, ref_hidden, ref_weight, ref_bias, coef, saved,
                    opts: HeadOptions, need_h: bool, need_w: bool, need_b: bool, valid=None):
    """(dhidden share [N, H] in the accumulation dtype, dweight [V_r, H], dbias [V_r])."""
    return chunked.backward_tiles(hidden, weight, bias, local_labels, ref_hidden, ref_weight, ref_bias,
                                  coef, saved, opts, need_h, need_w, need_b, valid=valid)


TORCH_PASSES = SlicePasses(partials=_torch_partials, jsd=_torch_jsd, backward=_torch_backward)


def passes_for(impl: str) -> SlicePasses:
    """The per-slice passes of ``impl`` ("torch" or "triton")."""
    if impl == "torch":
        return TORCH_PASSES
    # Needs Triton; only loaded on request.
    from ..triton_stats import triton_backward_tiles, triton_jsd_pass, triton_vocab_partials
    return SlicePasses(partials=triton_vocab_partials, jsd=triton_jsd_pass, backward=triton_backward_tiles)

