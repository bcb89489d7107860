"""`token_stats` under torch.compile(fullgraph=True, dynamic=True): one graph for every N, with the
values and gradients of eager mode (and of the float64 oracle).

impl="triton" runs through the Triton interpreter inside its custom op, which the compiled graph
calls as an opaque kernel. CPU compilation is slow: a few small shapes only.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fpo_ops
from fpo_ops.token_stats.custom_op import token_stats_bwd, token_stats_fwd
from stats_cases import make_case, max_rel_err

OUTPUTS = ("logp", "lse", "ref_logp", "kl", "entropy", "top1_correct", "argmax")


def _loss_and_stats(hidden, weight, labels, ref_hidden, ref_weight, bias, impl):
    stats = fpo_ops.token_stats(hidden, weight, labels, ref_hidden, ref_weight, bias=bias, outputs=OUTPUTS,
                                softcap=5.0, temperature=0.9, impl=impl)
    loss = (0.7 * stats.logp - 0.2 * stats.kl + 0.1 * stats.entropy + 0.05 * stats.lse ** 2).sum()
    return loss, tuple(getattr(stats, name) for name in OUTPUTS)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_one_graph_for_every_token_count(impl):
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(_loss_and_stats, fullgraph=True, dynamic=True, backend=counter)
    frames = None
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n_tokens in (5, 11, 23):
            case = make_case(shape=(n_tokens,), hidden_size=16, vocab=37, bias=True, seed=n_tokens)
            # int32 labels: the cast to int64 is part of the graph
            args = (case.hidden, case.weight, case.labels.int(), case.ref_hidden, case.ref_weight, case.bias, impl)
            loss, stats = compiled(*args)
            grads = torch.autograd.grad(loss, case.leaves())
            frames = counter.frame_count if frames is None else frames
            assert counter.frame_count == frames, "recompiled for a new N"
            eager_loss, eager_stats = _loss_and_stats(*args)
            eager_grads = torch.autograd.grad(eager_loss, case.leaves())
            oracle_loss, oracle_stats = _loss_and_stats(*args[:-1], "reference")
            oracle_grads = torch.autograd.grad(oracle_loss, case.leaves())
            for got, eager, oracle in zip(stats + grads, eager_stats + eager_grads, oracle_stats + oracle_grads):
                assert torch.equal(got, eager)
                assert max_rel_err(got, oracle) < 1e-9
            assert max_rel_err(loss, eager_loss) < 1e-12


def test_label_check_runs_inside_the_compiled_op():
    """check_labels=True under compile: the op checks the data at run time, with the eager error."""
    case = make_case(shape=(5,), hidden_size=16, vocab=37, ref_hidden_size=None, ignore_fraction=0.0)
    labels = case.labels.clone()
    labels[3] = 37

    def logp(hidden, weight, labels):
        return fpo_ops.token_stats(hidden, weight, labels, impl="torch").logp

    compiled = torch.compile(logp, fullgraph=True, dynamic=True, backend="aot_eager")
    eager = logp(case.hidden, case.weight, case.labels)
    assert torch.equal(compiled(case.hidden, case.weight, case.labels), eager)
    with pytest.raises(ValueError, match=r"^labels: expected values in \[0, 37\) or ignore_index=-100, got 37"):
        compiled(case.hidden, case.weight, labels)


def test_reference_check_labels_under_compile_names_the_flag():
    """The oracle runs as plain PyTorch: a data check cannot be compiled, and the error says which."""
    case = make_case(shape=(5,), hidden_size=16, vocab=37, ref_hidden_size=None)

    def logp(hidden, weight, labels, check):
        return fpo_ops.token_stats(hidden, weight, labels, impl="reference", check_labels=check).logp

    compiled = torch.compile(logp, fullgraph=True, dynamic=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"check_labels: expected False under torch.compile"):
        compiled(case.hidden, case.weight, case.labels, True)
    got = compiled(case.hidden, case.weight, case.labels, False)
    assert torch.equal(got, logp(case.hidden, case.weight, case.labels, False))


def test_custom_ops_pass_opcheck():
    """Schemas, fake implementations and the autograd registration agree with the real kernels."""
    case = make_case(shape=(6,), hidden_size=8, vocab=21, bias=True, seed=3)
    scalars = [0.9, 5.0, 1.0, 0.0, 1.0, 0.5, 0.0]
    args = (case.hidden, case.weight, case.bias, case.labels, case.ref_hidden, case.ref_weight, None, "torch",
            "logp,kl,entropy", -100, scalars, False, False)
    torch.library.opcheck(token_stats_fwd, args)
    kept = token_stats_fwd(*args)[3:]  # after the three statistics: lse, lse_ref, entropy
    grads = [torch.randn(6, dtype=torch.float64), None, torch.randn(6, dtype=torch.float64)]
    bwd_args = (case.hidden.detach(), case.weight.detach(), case.bias.detach(), case.labels, case.ref_hidden,
                case.ref_weight, None, kept, grads, "torch", "logp,kl,entropy", -100, scalars, [True, True, False])
    torch.library.opcheck(token_stats_bwd, bwd_args)
