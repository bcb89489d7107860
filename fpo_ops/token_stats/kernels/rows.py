"""Rows of the kernels' per-token buffers: `tl.constexpr` indices into the orders of the table.

The buffers are laid out in the orders `fpo_ops.token_stats.stats` derives (`PARTIAL_KEYS`,
`GRAD_KEYS`, `SAVED_KEYS`), and the kernels address a row only through these constants, so the
kernels and the host side cannot disagree on where a value is.
"""
import triton.language as tl

from ..stats import GRAD_KEYS, PARTIAL_KEYS, SAVED_FOR_GRAD, SAVED_KEYS

# partials [splits, PARTIAL_KEYS, N], written by the forward kernel
M_ROW = tl.constexpr(PARTIAL_KEYS.index("m"))
S_ROW = tl.constexpr(PARTIAL_KEYS.index("s"))
Z_LABEL_ROW = tl.constexpr(PARTIAL_KEYS.index("z_label"))
ENT_ROW = tl.constexpr(PARTIAL_KEYS.index("ent"))
S2_ROW = tl.constexpr(PARTIAL_KEYS.index("s2"))
SUM_Z_ROW = tl.constexpr(PARTIAL_KEYS.index("sum_z"))
M_PRE_ROW = tl.constexpr(PARTIAL_KEYS.index("m_pre"))
ARGMAX_ROW = tl.constexpr(PARTIAL_KEYS.index("argmax"))
M_REF_ROW = tl.constexpr(PARTIAL_KEYS.index("m_ref"))
S_REF_ROW = tl.constexpr(PARTIAL_KEYS.index("s_ref"))
Z_REF_LABEL_ROW = tl.constexpr(PARTIAL_KEYS.index("z_ref_label"))
RKL_ROW = tl.constexpr(PARTIAL_KEYS.index("rkl"))
KL_ROW = tl.constexpr(PARTIAL_KEYS.index("kl"))

# upstream gradients [GRAD_KEYS, N], read by the logit-gradient kernel
G_LOGP_ROW = tl.constexpr(GRAD_KEYS.index("logp"))
G_LSE_ROW = tl.constexpr(GRAD_KEYS.index("lse"))
G_ENT_ROW = tl.constexpr(GRAD_KEYS.index("entropy"))
G_KL_ROW = tl.constexpr(GRAD_KEYS.index("kl"))
G_RKL_ROW = tl.constexpr(GRAD_KEYS.index("reverse_kl"))
G_JSD_ROW = tl.constexpr(GRAD_KEYS.index("jsd"))

# saved forward values [SAVED_KEYS, N], read by the logit-gradient kernel
LSE_ROW = tl.constexpr(SAVED_KEYS.index("lse"))
LSE_REF_ROW = tl.constexpr(SAVED_KEYS.index("lse_ref"))
ENTROPY_ROW = tl.constexpr(SAVED_KEYS.index(SAVED_FOR_GRAD["entropy"]))
REVERSE_KL_ROW = tl.constexpr(SAVED_KEYS.index(SAVED_FOR_GRAD["reverse_kl"]))
KL_P_M_ROW = tl.constexpr(SAVED_KEYS.index(SAVED_FOR_GRAD["jsd"]))
