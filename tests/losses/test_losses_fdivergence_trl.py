"""f-DPO pinned to TRL 1.16: fpo-ops's loss against TRL's own ``DPOTrainer._compute_loss`` code.

TRL's loss code runs on per-token log-probs that a model returns; here two stand-in models return
the float64 log-probs of a batch materialised from its hidden states (`loss_oracle.token_quantities`),
so TRL's code and `fpo_ops.preference_loss` (which streams the same head) see the same per-sequence
log-probs, with unequal chosen and rejected lengths. Loss values and gradients must agree, for every
loss type TRL 1.16 allows with an f-divergence and every divergence. Upstream TRL changed the
offsets and the restriction after 1.16; the test is skipped on another TRL line, since fpo-ops keeps
the 1.16 semantics.
"""
import ast
import inspect
import textwrap
import types
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")
if not trl.__version__.startswith("1.16."):
    pytest.skip(f"pins TRL 1.16's f-divergence semantics, found TRL {trl.__version__}", allow_module_level=True)

from trl import DPOTrainer  # noqa: E402

import fpo_ops  # noqa: E402
from fpo_ops.losses.config import F_DIVERGENCE_LOSS_TYPES  # noqa: E402
from loss_batches import IGNORE, make_batch  # noqa: E402
from loss_oracle import dpo_oracle, token_quantities  # noqa: E402

N_PAIRS = 4
DIVERGENCES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3),
               ("alpha_divergence", 0.0), ("alpha_divergence", 1.0)]
LOSS_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
OPTIONS = {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.1}}


class _Model(torch.nn.Module):
    """Answers ``model(..., fused_lm_head=True)`` as TRL's fused head would, from given per-token values."""

    is_gradient_checkpointing = False

    def __init__(self, log_probs, tok=None):
        super().__init__()
        self.log_probs, self.tok = log_probs, tok

    def forward(self, **kwargs):
        assert kwargs.get("fused_lm_head") is True
        out = types.SimpleNamespace(log_probs=self.log_probs)
        if self.tok is not None:
            out.entropy = self.tok["entropy"].detach()
            out.mean_logits = self.tok["mean_logits"].detach()
            out.is_top1 = self.tok["is_top1"]
        return out


def _trl_loss(tok, loss_type, beta, f_divergence_type, coef, label_smoothing=0.0, dtype=torch.float64):
    """TRL 1.16's ``DPOTrainer._compute_loss`` on the per-token log-probs of ``tok``."""
    mask = tok["mask"]
    rows, length = mask.shape
    # TRL shifts: labels[i] of the batch is input_ids[i + 1]; a leading prompt token makes room for it
    completion_mask = torch.cat([torch.zeros(rows, 1, dtype=torch.long), mask.long()], dim=1)
    inputs = dict(input_ids=torch.ones(rows, length + 1, dtype=torch.long),
                  attention_mask=torch.ones(rows, length + 1, dtype=torch.long), completion_mask=completion_mask)
    policy = _Model(tok["logp"].to(dtype), tok)
    trainer = types.SimpleNamespace(
        model=policy, ref_model=_Model(tok["ref_logp"].to(dtype).detach()),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                                          gather=lambda x: x),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=False, use_weighting=False,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef, loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    return DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)


@pytest.mark.parametrize("f_divergence_type,coef", DIVERGENCES, ids=[f"{d}-{c}" for d, c in DIVERGENCES])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_f_divergence_losses_equal_trl_1_16(loss_type, f_divergence_type, coef):
    batch = make_batch(rows=2 * N_PAIRS, seed=71)
    lengths = (batch.labels != IGNORE).sum(1)
    assert (lengths[:N_PAIRS] != lengths[N_PAIRS:]).any()  # unequal chosen/rejected lengths
    options = dict(OPTIONS.get(loss_type, {}), beta=0.4)
    fresh = batch.fresh_leaves()
    out = fpo_ops.preference_loss(
        fresh.hidden, fresh.weight, fresh.labels, fresh.ref_hidden, fresh.ref_weight, loss_type=loss_type,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef, impl="torch", **options,
    )
    g = torch.Generator().manual_seed(72)
    c = torch.rand((), generator=g, dtype=torch.float64) + 0.5
    (c * out.loss).backward()
    ours = [out.loss.detach()] + [t.grad for t in fresh.leaves()]

    def trl_side(dtype):
        b = batch.fresh_leaves()
        loss = _trl_loss(token_quantities(b), loss_type, f_divergence_type=f_divergence_type, coef=coef,
                         dtype=dtype, **options)
        (c.to(dtype) * loss).backward()
        return [loss.detach().double()] + [t.grad for t in b.leaves()]

    alpha = f_divergence_type == "alpha_divergence" and abs(coef - 1.0) > 1e-6
    if not alpha and loss_type != "exo_pair":
        for mine, theirs in zip(ours, trl_side(torch.float64)):
            torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)
        return
    # Two places where TRL 1.16 computes in float32 whatever the input: the alpha-divergence's
    # exponential (its clamp table has no float64 entry, so TRL runs on the log-probs rounded to
    # float32) and exo_pair's ε (a float32 tensor). There TRL's distance to our float64 result must be
    # within twice that of the independent formula (`dpo_oracle`) evaluated in float32 on the
    # float32-rounded log-probs, plus a small floor.
    theirs = trl_side(torch.float32 if alpha else torch.float64)
    b = batch.fresh_leaves()
    tok = {k: (v.float() if v.is_floating_point() else v) for k, v in token_quantities(b).items()}
    plain, *_ = dpo_oracle(tok, [loss_type], f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef,
                           **options)
    (c.float() * plain).backward()
    plain = [plain.detach().double()] + [t.grad for t in b.leaves()]
    for mine, trl_value, plain_value in zip(ours, theirs, plain):
        trl_error = (trl_value - mine).abs().max().item()
        plain_error = (plain_value - mine).abs().max().item()
        assert trl_error <= 2 * plain_error + 1e-7 * max(mine.abs().max().item(), 1.0), (trl_error, plain_error)


def test_f_divergence_offsets_are_trl_1_16s():
    """The score offsets themselves: forward KL 1 - e^{-u}, JS log 2 + log σ(u), α: (e^{(α-1)u} - 1)/(α-1)."""
    batch = make_batch(rows=2 * N_PAIRS, seed=73)
    tok = token_quantities(batch)
    u = (tok["logp"].sum(1) - tok["ref_logp"].sum(1)).detach()
    u_w, u_l = u.chunk(2)
    log2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    for f_type, score in (("forward_kl", lambda x: 1 - torch.exp(-x)),
                          ("js_divergence", lambda x: log2 + torch.nn.functional.logsigmoid(x))):
        out = fpo_ops.preference_loss(batch.hidden, batch.weight, batch.labels, batch.ref_hidden, batch.ref_weight,
                                      loss_type="sigmoid", beta=0.4, f_divergence_type=f_type, impl="torch")
        expected = -torch.nn.functional.logsigmoid(0.4 * (score(u_w) - score(u_l))).mean()
        torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-10, atol=1e-10)
        theirs = _trl_loss(tok, "sigmoid", 0.4, f_type, 0.5).detach()
        torch.testing.assert_close(theirs, expected, rtol=1e-10, atol=1e-10)


def _trl_f_divergence_loss_types():
    """The set literal ``f_divergence_loss_types = {...}`` of TRL 1.16's ``DPOTrainer.__init__``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(DPOTrainer.__init__)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "f_divergence_loss_types":
            return set(ast.literal_eval(node.value))
    raise AssertionError("TRL's DPOTrainer.__init__ has no f_divergence_loss_types set")


def test_f_divergence_restriction_is_trl_1_16s():
    assert F_DIVERGENCE_LOSS_TYPES == _trl_f_divergence_loss_types() == set(LOSS_TYPES)
    batch = make_batch(rows=2 * N_PAIRS, seed=74)
    for loss_type in ("nca_pair", "bco_pair", "sppo_hard", "aot", "apo_zero", "tdpo2", "sppo"):
        with pytest.raises(ValueError, match="f_divergence_type"):
            fpo_ops.preference_loss(batch.hidden, batch.weight, batch.labels, batch.ref_hidden, batch.ref_weight,
                                    loss_type=loss_type, f_divergence_type="forward_kl", impl="torch")
