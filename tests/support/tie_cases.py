"""Inputs with exact ties at the maximum logit, seen identically by every implementation.

Ties are planted two ways: a softcap that saturates (a bias of 1e4 under a cap of 30 makes tanh
exactly 1 on several columns, as Gemma-2's cap does on confident tokens), and duplicated head rows
with integer-valued weights and hidden states (every dot product exact, whatever the summation
order). `first_argmax` gives the expected first-maximal-index predictions (torch.argmax's rule).
"""
import torch

from fpo_ops.token_stats.options import HeadOptions
from fpo_ops.token_stats.reference import reference_logits
from stats_cases import Case

TIED = (3, 10, 20, 36)  # columns planted at the maximum; 3 is the first


def saturated_softcap_case(n: int = 21, hidden_size: int = 16, vocab: int = 37, seed: int = 0) -> Case:
    """Softcap 30 with a 1e4 bias on `TIED`: those columns all reach exactly the cap."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=g, dtype=torch.float64).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    bias = torch.zeros(vocab, dtype=torch.float64)
    bias[list(TIED)] = 1e4
    labels = torch.tensor([TIED[i % len(TIED)] for i in range(n)])
    labels[5] = 7       # not at the maximum at all
    labels[9] = -100    # ignored
    return Case(hidden, weight, labels, bias=bias.requires_grad_(), kwargs=dict(softcap=30.0))


def duplicated_rows_case(n: int = 19, hidden_size: int = 16, vocab: int = 37, seed: int = 1) -> Case:
    """Integer-valued head whose row 5 is the maximum for every token and is copied to rows 20
    and 30 (exact ties without a cap)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(-2, 3, (vocab, hidden_size), generator=g).double()
    weight[5] = 6.0
    weight[20] = weight[5]
    weight[30] = weight[5]
    hidden = torch.randint(1, 3, (n, hidden_size), generator=g).double()
    labels = torch.tensor([(5, 20, 30, 11)[i % 4] for i in range(n)])
    return Case(hidden.requires_grad_(), weight.requires_grad_(), labels)


def planted_pairs_case(n: int = 23, vocab: int = 37, seed: int = 2) -> Case:
    """An identity head (H = V) and integer hidden states holding their maximum 5 at two random
    columns a < b per token: the prediction is a, different from token to token and tile to tile;
    labels alternate between a, b and a random column."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-2, 3, (n, vocab), generator=g).double()
    pairs = torch.stack([torch.randperm(vocab, generator=g)[:2].sort().values for _ in range(n)])
    hidden.scatter_(1, pairs, 5.0)
    labels = torch.where(torch.arange(n) % 3 == 0, pairs[:, 0], pairs[:, 1])
    labels[2::3] = torch.randint(0, vocab, (len(labels[2::3]),), generator=g)
    labels[7] = -100
    return Case(hidden.requires_grad_(), torch.eye(vocab, dtype=torch.float64).requires_grad_(), labels)


def first_argmax(case: Case):
    """(torch.argmax of the float64 logits [N], the logits [N, V])."""
    opts = HeadOptions(compute_dtype=torch.float64, softcap=case.kwargs.get("softcap"))
    z = reference_logits(case.hidden.detach(), case.weight.detach(),
                         None if case.bias is None else case.bias.detach(), opts.softcap, 1.0, opts)
    return z.argmax(-1), z


CASES = {"saturated_softcap": saturated_softcap_case, "duplicated_rows": duplicated_rows_case,
         "planted_pairs": planted_pairs_case}
