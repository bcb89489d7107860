"""A tensor-parallel head (a DTensor weight placed Shard(0), PyTorch's ColwiseParallel) on 2 gloo processes
equals one process, in float64 at 1e-9.

Every process builds the same float64 inputs (seeded) and computes the single-process statistics and
gradients itself (the same impl, and the float64 oracle); then it distributes the heads as DTensors
over a 1-D device mesh and calls the same op on them. The vocabulary (37, 53 rows) is uneven on 2
processes, so DTensor's Shard(0) gives rank 0 one row more. Compared: every statistic, dhidden (whole
on every process, a DTensor of the hidden states' placement when they are one), dweight and dbias
(DTensors placed Shard(0), compared whole), for `token_stats` (impl torch; triton through the
interpreter on one case), the losses (`preference_loss` sigmoid and tdpo2, `kto_loss`,
`distill_loss`), an optimizer step, and the refusals of other placements.
"""
import pytest
import torch
import torch.distributed as dist

import fpo_ops
from fpo_ops.token_stats import chunked
from fpo_ops.token_stats.stats import INDEX_STATS
from distributed_launch import launch
from loss_batches import make_batch
from stats_cases import ALL_STATS, SPLIT_CASES, Case, make_case, max_rel_err, run

pytestmark = pytest.mark.process_group  # processes in lockstep: run apart (scripts/test.sh)

TOL = 1e-9

# every split case but jsd_beta_1 (the DTensor path adds no JSD-specific code)
CASES = {name: kw for name, kw in SPLIT_CASES.items() if name != "jsd_beta_1"}
# How the tensors other than the weight are given (the weight is always a Shard(0) DTensor).
LAYOUTS = {
    # bias and reference head DTensors placed like the weight, hidden states plain
    "dtensor_companions": dict(hidden=None, plain_companions=False),
    # hidden states a Replicate() DTensor; bias this process's rows, reference head whole, both plain
    "replicated_hidden_plain_companions": dict(hidden="replicate", plain_companions=True),
    # sequence-parallel hidden states (Shard(1)): gathered, their gradient sharded back
    "sequence_sharded_hidden": dict(hidden="shard1", plain_companions=False),
}
SUBSETS = [("logp",), ("kl", "ref_logp"), ("reverse_kl", "entropy"), ("jsd", "mean_logit")]
TRITON_CASES = ("all_options",)


def _mesh(world: int):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (world,))


def _own_rows(vocab: int, world: int, rank: int) -> slice:
    """DTensor's Shard(0) rows of this process: torch.chunk's split."""
    rows = torch.arange(vocab).chunk(world)[rank]
    return slice(int(rows[0]), int(rows[-1]) + 1)


def _dtensor(t, mesh, placement, grad: bool):
    from torch.distributed.tensor import distribute_tensor
    return None if t is None else distribute_tensor(t.detach(), mesh, [placement]).requires_grad_(grad)


def _tp_case(case: Case, mesh, hidden: str = None, plain_companions: bool = False) -> Case:
    """``case`` with its weight a Shard(0) DTensor and the rest laid out as asked."""
    from torch.distributed.tensor import Replicate, Shard

    rows = _own_rows(case.weight.shape[0], mesh.size(), dist.get_rank())
    weight = _dtensor(case.weight, mesh, Shard(0), True)
    if plain_companions:
        bias = None if case.bias is None else case.bias.detach()[rows].clone().requires_grad_()
        ref_weight, ref_bias = case.ref_weight, case.ref_bias
    else:
        bias = _dtensor(case.bias, mesh, Shard(0), True)
        ref_weight = _dtensor(case.ref_weight, mesh, Shard(0), False)
        ref_bias = _dtensor(case.ref_bias, mesh, Shard(0), False)
    labels = case.labels
    placement = {None: None, "replicate": Replicate(), "shard1": Shard(1)}[hidden]
    if placement is None:
        h = case.hidden.detach().clone().requires_grad_()
    else:
        h = _dtensor(case.hidden, mesh, placement, True)
    if hidden == "replicate":
        labels = _dtensor(case.labels, mesh, Replicate(), False)  # labels as DTensors too
    return Case(h, weight, labels, case.ref_hidden, ref_weight, bias, ref_bias, dict(case.kwargs))


def _labels_on_every_shard(case: Case, world: int) -> None:
    """Point tokens at the first and last row of every shard, so every process owns a label."""
    vocab, flat = case.weight.shape[0], case.labels.view(-1)
    shards = [_own_rows(vocab, world, r) for r in range(world)]
    targets = [row for shard in shards for row in (shard.start, shard.stop - 1)]
    for i, row in enumerate(targets[: flat.numel()]):
        flat[i] = row


def _check(name: str, case: Case, tp: Case, outputs, impl: str, rows: slice) -> None:
    """Statistics and gradients of ``tp`` against the single-process op and the oracle on ``case``.

    A DTensor leaf must get a DTensor gradient of its own placement and shape (compared whole); a
    plain head leaf (the bias) is this process's ``rows``; plain hidden states are whole.
    """
    from torch.distributed.tensor import DTensor

    name = f"{impl}/{name}"
    single_stats, single_grads = run(case, impl, outputs)
    oracle_stats, oracle_grads = run(case, "reference", outputs)
    stats, grads = run(tp, impl, outputs)
    for stat in outputs:
        got = getattr(stats, stat)
        want_dtype = torch.int64 if stat in INDEX_STATS else torch.float64
        assert not isinstance(got, DTensor) and got.dtype == want_dtype, (name, stat)
        assert got.shape == case.labels.shape, (name, stat)
        for want in (getattr(single_stats, stat), getattr(oracle_stats, stat)):
            assert max_rel_err(got, want) < TOL, (name, stat, max_rel_err(got, want))
    for other in set(ALL_STATS) - set(outputs):
        assert getattr(stats, other) is None
    assert len(grads) == len(single_grads) == len(tp.leaves())
    for i, (got, leaf, full, oracle) in enumerate(zip(grads, tp.leaves(), single_grads, oracle_grads)):
        part = slice(None)
        if isinstance(leaf, DTensor):
            assert isinstance(got, DTensor), (name, i)
            assert got.placements == leaf.placements and got.shape == leaf.shape, (name, i, got.placements)
            assert got.to_local().shape == leaf.to_local().shape, (name, i)
            got = got.full_tensor()
        else:
            assert not isinstance(got, DTensor), (name, i)
            part = slice(None) if i == 0 else rows
        # Errors relative to the whole gradient's scale, as the single-process tests measure them.
        for want in (full, oracle):
            err = (got - want[part]).abs().max().item() / want.abs().max().clamp_min(1e-30).item()
            assert err < TOL, (name, i, err)


def _check_token_stats(rank: int, world: int, mesh) -> None:
    chunked.TOKEN_BLOCK, chunked.VOCAB_BLOCK = 5, 4  # several partial tiles on each shard
    for impl in ("torch", "triton"):
        cases = CASES if impl == "torch" else {name: CASES[name] for name in TRITON_CASES}
        # The layouts are undone before the backend runs: the interpreter (slow) runs one.
        layouts = LAYOUTS if impl == "torch" else {"dtensor_companions": LAYOUTS["dtensor_companions"]}
        for layout, how in layouts.items():
            for name, kwargs in cases.items():
                case = make_case(**kwargs)
                vocab = case.weight.shape[0]
                assert vocab % world != 0
                if kwargs.get("ignore_fraction", 0.25) < 1.0 and case.labels.numel() >= 2 * world:
                    _labels_on_every_shard(case, world)
                if how["hidden"] == "shard1" and case.hidden.dim() < 3:
                    continue
                tp = _tp_case(case, mesh, **how)
                _check(f"{layout}/{name}", case, tp, ALL_STATS, impl, _own_rows(vocab, world, rank))
        if impl == "torch":
            for outputs in SUBSETS:
                case = make_case(bias=True, softcap=5.0, seed=3)
                _check(f"{outputs}", case, _tp_case(case, mesh), outputs, impl, _own_rows(37, world, rank))


def _check_replicated_weight(rank: int, world: int, mesh) -> None:
    """A Replicate() head is a whole head on every process: the single-process op, any impl."""
    from torch.distributed.tensor import Replicate

    case = make_case(bias=True, ref_bias=True, softcap=3.0, seed=8)
    tp = Case(case.hidden.detach().clone().requires_grad_(), _dtensor(case.weight, mesh, Replicate(), True),
              case.labels, case.ref_hidden, case.ref_weight, _dtensor(case.bias, mesh, Replicate(), True),
              _dtensor(case.ref_bias, mesh, Replicate(), False), dict(case.kwargs))
    for impl in ("torch", "reference"):
        _check(f"replicated/{impl}", case, tp, ALL_STATS, impl, slice(None))
    # A plain head with DTensor hidden states: they are made whole, the op runs as on one process.
    plain_head = Case(_dtensor(case.hidden, mesh, Replicate(), True), case.weight.detach().clone().requires_grad_(),
                      case.labels, case.ref_hidden, case.ref_weight, case.bias.detach().clone().requires_grad_(),
                      case.ref_bias, dict(case.kwargs))
    _check("plain_head_dtensor_hidden", case, plain_head, ALL_STATS, "torch", slice(None))


def _check_optimizer_step(rank: int, world: int, mesh) -> None:
    """Gradients land in .grad as Shard(0) DTensors, and an optimizer step matches one process's."""
    from torch import nn
    from torch.distributed.tensor import Shard

    case = make_case(bias=True, softcap=4.0, seed=9)
    params = {}
    for name, is_tp in (("single", False), ("tp", True)):
        weight = nn.Parameter(_dtensor(case.weight, mesh, Shard(0), True) if is_tp else case.weight.detach().clone())
        bias = nn.Parameter(_dtensor(case.bias, mesh, Shard(0), True) if is_tp else case.bias.detach().clone())
        optimizer = torch.optim.AdamW([weight, bias], lr=0.05)
        for step in range(2):
            optimizer.zero_grad()
            stats = fpo_ops.token_stats(case.hidden, weight, case.labels, case.ref_hidden, case.ref_weight,
                                        bias=bias, outputs=("logp", "kl", "entropy"), impl="torch")
            loss = (stats.logp * 0.7 - stats.kl + 0.3 * stats.entropy).sum()
            loss.backward()
            if is_tp:
                assert weight.grad.placements == (Shard(0),) and bias.grad.placements == (Shard(0),)
            optimizer.step()
        params[name] = [p.full_tensor() if is_tp else p for p in (weight, bias)]
    for got, want in zip(params["tp"], params["single"]):
        assert max_rel_err(got.detach(), want.detach()) < TOL


def _loss_batch(mesh):
    from torch.distributed.tensor import Shard

    batch = make_batch(rows=6, T=7, H=16, V=37, ref_H=12, seed=23, bias=True)
    tp = dict(weight=_dtensor(batch.weight, mesh, Shard(0), True), bias=_dtensor(batch.bias, mesh, Shard(0), True),
              ref_weight=_dtensor(batch.ref_weight, mesh, Shard(0), False),
              ref_bias=_dtensor(batch.ref_bias, mesh, Shard(0), False))
    plain = dict(weight=batch.weight, bias=batch.bias, ref_weight=batch.ref_weight, ref_bias=batch.ref_bias)
    return batch, plain, tp


def _compare_losses(name: str, single, tp, single_grads, tp_grads) -> None:
    """Loss (and for a PreferenceOutput every metric and per-sequence field) and every gradient."""
    from torch.distributed.tensor import DTensor, Shard

    if torch.is_tensor(single):
        assert max_rel_err(tp, single) < TOL, name
    else:
        assert max_rel_err(tp.loss, single.loss) < TOL, name
        assert set(tp.metrics) == set(single.metrics), name
        for metric, value in single.metrics.items():
            assert max_rel_err(tp.metrics[metric], value) < TOL, (name, metric)
        for field in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                      "chosen_rewards", "rejected_rewards", "per_sequence_loss"):
            want, got = getattr(single, field), getattr(tp, field)
            assert (got is None) == (want is None), (name, field)
            if want is not None:
                assert max_rel_err(got, want) < TOL, (name, field)
    # (dhidden, dweight, dbias): the head's come as Shard(0) DTensors
    for i, (got, want) in enumerate(zip(tp_grads, single_grads)):
        if i > 0:
            assert isinstance(got, DTensor) and got.placements == (Shard(0),), (name, i)
            got = got.full_tensor()
        err = (got - want).abs().max().item() / want.abs().max().clamp_min(1e-30).item()
        assert err < TOL, (name, i, err)


def _check_losses(rank: int, world: int, mesh) -> None:
    """preference_loss (sigmoid, tdpo2), kto_loss and distill_loss on a DTensor head equal one process."""
    chunked.TOKEN_BLOCK, chunked.VOCAB_BLOCK = 5, 4
    batch, plain, tp = _loss_batch(mesh)
    head = dict(temperature=0.8, softcap=4.0, ref_softcap=6.0, logit_scale=1.2)
    desirable = torch.tensor([True, False, True, True, False, True])
    kl_hidden = torch.roll(batch.hidden.detach(), 1, 0)
    kl_ref_hidden, kl_labels = torch.roll(batch.ref_hidden, 1, 0), torch.roll(batch.labels, 1, 0)

    def calls(heads, hidden):
        policy = (hidden, heads["weight"], batch.labels, batch.ref_hidden, heads["ref_weight"])
        biases = dict(bias=heads["bias"], ref_bias=heads["ref_bias"])
        return {
            "sigmoid": lambda: fpo_ops.preference_loss(*policy, **biases, loss_type="sigmoid", beta=0.2,
                                                       impl="torch", **head),
            "tdpo2": lambda: fpo_ops.preference_loss(*policy, **biases, loss_type="tdpo2", beta=0.3, tdpo_alpha=0.7,
                                                     impl="torch", **head),
            "kto": lambda: fpo_ops.kto_loss(*policy, **biases, desirable=desirable, kl_hidden=kl_hidden,
                                            kl_labels=kl_labels, kl_ref_hidden=kl_ref_hidden, impl="torch", **head),
            "distill": lambda: fpo_ops.distill_loss(*policy, bias=heads["bias"], teacher_bias=heads["ref_bias"],
                                                    beta=0.4, temperature=0.9, softcap=4.0, teacher_softcap=3.0,
                                                    impl="torch"),
        }

    def total(out):
        """The loss and, under a random upstream gradient, the per-sequence log-probs."""
        if torch.is_tensor(out):
            return 1.3 * out
        g = torch.Generator().manual_seed(7)
        return 1.3 * out.loss + sum((torch.randn(t.shape, generator=g, dtype=t.dtype) * t).sum()
                                    for t in (out.chosen_logps, out.rejected_logps))

    results = {}
    for which, heads in (("single", plain), ("tp", tp)):
        hidden = batch.hidden.detach().clone().requires_grad_()
        for name, call in calls(heads, hidden).items():
            out = call()
            grads = torch.autograd.grad(total(out), (hidden, heads["weight"], heads["bias"]), allow_unused=True)
            results[which, name] = out, grads
    for name in ("sigmoid", "tdpo2", "kto", "distill"):
        single, single_grads = results["single", name]
        got, got_grads = results["tp", name]
        _compare_losses(name, single, got, single_grads, got_grads)


def _check_refusals(rank: int, world: int, mesh) -> None:
    """Heads not sharded on the vocabulary, and inputs that do not fit a DTensor head, raise."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    case = make_case(bias=True, ref_bias=True)
    tp = _tp_case(case, mesh)
    base = dict(hidden=case.hidden, weight=tp.weight, labels=case.labels, ref_hidden=case.ref_hidden,
                ref_weight=tp.ref_weight, bias=tp.bias, ref_bias=tp.ref_bias, outputs=("logp", "kl"), impl="torch")
    rows = _own_rows(37, world, rank)
    mesh_2d = init_device_mesh("cpu", (1, world))
    refused = {
        r"^weight: expected a DTensor sharded on the vocabulary dimension .*got placements \(Shard\(dim=1\),\) "
        r"on a device mesh of shape \(2,\); gather it": dict(weight=_dtensor(case.weight, mesh, Shard(1), True),
                                                           bias=None, ref_weight=None, ref_bias=None),
        r"^weight: expected a DTensor sharded .*got placements \(Partial\(sum\),\)": dict(
            weight=DTensor.from_local(case.weight.detach() / world, mesh, [Partial()]), bias=None, ref_weight=None,
            ref_bias=None),
        r"^weight: expected .*on a 1-D device mesh, got placements \(Replicate\(\), Shard\(dim=0\)\) on a device "
        r"mesh of shape \(1, 2\)": dict(weight=DTensor.from_local(case.weight.detach()[rows], mesh_2d,
                                                                  [Replicate(), Shard(0)], run_check=False),
                                       bias=None, ref_weight=None, ref_bias=None),
        r"^process_group: expected None with a DTensor weight": dict(process_group=dist.group.WORLD),
        r"^impl: expected 'auto', 'torch' or 'triton' with a vocabulary-sharded DTensor weight, got 'reference'":
            dict(impl="reference"),
        r"^bias: expected a DTensor placed like weight \(placements \(Shard\(dim=0\),\).*got placements "
        r"\(Replicate\(\),\)": dict(bias=_dtensor(case.bias, mesh, Replicate(), True)),
        rf"^bias: expected a DTensor placed like weight or this process's rows of it \(shape "
        rf"\({rows.stop - rows.start},\)\), got a plain tensor of shape \(37,\)": dict(bias=case.bias),
        r"^ref_weight: expected a DTensor placed like weight or the whole reference head \(37 rows": dict(
            ref_weight=case.ref_weight.detach()[rows]),
        r"^ref_bias: expected a DTensor placed like weight \(.*37 rows\), got .*shape \(36,\)": dict(
            ref_bias=_dtensor(case.ref_bias[:36], mesh, Shard(0), False)),
        r"^bias: expected a plain tensor when weight is one, got a DTensor": dict(weight=case.weight),
    }
    for message, changes in refused.items():
        with pytest.raises(ValueError, match=message):
            fpo_ops.token_stats(**dict(base, **changes))
    # The same refusal through a loss: its token_stats call raises it.
    with pytest.raises(ValueError, match=r"^weight: expected a DTensor sharded on the vocabulary dimension"):
        batch = make_batch(rows=2, T=3, H=19, V=37, seed=1)
        fpo_ops.preference_loss(batch.hidden, _dtensor(batch.weight, mesh, Shard(1), True), batch.labels,
                                batch.ref_hidden, batch.ref_weight, impl="torch")
    _check_compile(case, tp)


def _check_compile(case: Case, tp: Case) -> None:
    """Under torch.compile a DTensor call is a graph break: it runs eagerly, the rest compiles;
    fullgraph=True refuses it."""
    def loss(hidden, weight):
        stats = fpo_ops.token_stats(hidden, weight, case.labels, impl="torch", outputs=("logp", "entropy"))
        return (stats.logp * 0.3 + stats.entropy).exp().sum()

    weight = tp.weight.detach().requires_grad_()
    eager = loss(case.hidden, weight)
    (eager_grad,) = torch.autograd.grad(eager, weight)
    compiled = torch.compile(loss, backend="eager")(case.hidden, weight)
    (compiled_grad,) = torch.autograd.grad(compiled, weight)
    assert max_rel_err(compiled, eager) < TOL
    assert max_rel_err(compiled_grad.full_tensor(), eager_grad.full_tensor()) < TOL
    torch._dynamo.reset()  # compiled code is cached per function: compile it afresh
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"torch.compiler.disable"):
        torch.compile(loss, backend="eager", fullgraph=True)(case.hidden, weight)


def _worker(rank: int, world: int) -> None:
    mesh = _mesh(world)
    _check_token_stats(rank, world, mesh)
    _check_replicated_weight(rank, world, mesh)
    _check_optimizer_step(rank, world, mesh)
    _check_losses(rank, world, mesh)
    _check_refusals(rank, world, mesh)


def test_dtensor_head_matches_single_process():
    launch(_worker, 2, timeout_s=400)


def _preference_step(policy, reference, ids, mask, labels, through_forward: bool):
    """One TDPO2 loss of a policy against a frozen reference through the HF integration; its
    loss, metrics and the policy's gradients (whole tensors)."""
    from torch.distributed.tensor import DTensor
    from fpo_ops.integrations.hf import add_head_outputs, hidden_and_head

    policy.zero_grad(set_to_none=True)
    if through_forward:
        parts = add_head_outputs(policy)(input_ids=ids, attention_mask=mask, return_head_inputs=True)
    else:
        parts = hidden_and_head(policy, input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        ref = hidden_and_head(reference, input_ids=ids, attention_mask=mask)
    out = fpo_ops.preference_loss(parts.hidden[:, :-1], parts.weight, labels, ref.hidden[:, :-1], ref.weight,
                                  loss_type="tdpo2", beta=0.2, impl="torch")
    out.loss.backward()
    grads = {name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
             for name, p in policy.named_parameters()}
    return out, grads, parts.weight


def _hf_worker(rank: int, world: int) -> None:
    """A tiny Llama whose lm_head is ColwiseParallel trains as one process does, without its head gathered;
    FSDP2's Shard(0) parameters are still gathered."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from fpo_ops.integrations.hf import lm_head_tensors
    from hf_fixtures import tiny_model

    mesh = _mesh(world)
    vocab = 93  # uneven over 2 processes: 47 and 46 rows

    def models():
        return (tiny_model("llama", seed=0, vocab_size=vocab).double(),
                tiny_model("llama", seed=1, vocab_size=vocab).double())

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    labels = ids[:, 1:].clone()
    labels[:, :2] = -100  # prompt
    labels[1, :3] = -100
    labels[0] = torch.arange(8) * 11  # tokens owned by both shards (rows 0..46 and 47..92)

    single_policy, single_reference = models()
    plans = {"output_replicated": ColwiseParallel(output_layouts=Replicate()), "default": ColwiseParallel()}
    for plan_name, style in plans.items():
        for through_forward in (False, True):
            name = f"{plan_name}/{'forward' if through_forward else 'backbone'}"
            want, want_grads, _ = _preference_step(single_policy, single_reference, ids, mask, labels, through_forward)
            policy, reference = models()
            for model in (policy, reference):
                parallelize_module(model, mesh, {"lm_head": style})
            assert isinstance(policy.lm_head.weight, DTensor) and policy.lm_head.weight.placements == (Shard(0),)
            assert lm_head_tensors(policy)[0] is policy.lm_head.weight  # not gathered
            got, got_grads, weight = _preference_step(policy, reference, ids, mask, labels, through_forward)
            assert isinstance(weight, DTensor) and weight.to_local().shape[0] == (47 if rank == 0 else 46), name
            assert isinstance(policy.lm_head.weight.grad, DTensor), name
            assert policy.lm_head.weight.grad.placements == (Shard(0),), name
            assert max_rel_err(got.loss, want.loss) < TOL, name
            for metric, value in want.metrics.items():
                assert max_rel_err(got.metrics[metric], value) < TOL, (name, metric)
            assert set(got_grads) == set(want_grads)
            for param, grad in want_grads.items():
                err = (got_grads[param] - grad).abs().max().item() / grad.abs().max().clamp_min(1e-30).item()
                assert err < TOL, (name, param, err)

    # FSDP2 shards its parameters Shard(0) on a 1-D mesh too, for data parallelism: gathered.
    sharded, _ = models()
    fully_shard(sharded, mesh=mesh)
    assert isinstance(sharded.lm_head.weight, DTensor) and sharded.lm_head.weight.placements == (Shard(0),)
    weight, bias = lm_head_tensors(sharded)
    assert not isinstance(weight, DTensor) and bias is None
    assert torch.equal(weight, single_policy.lm_head.weight)


def test_tensor_parallel_hf_model_matches_single_process():
    pytest.importorskip("transformers")
    launch(_hf_worker, 2, timeout_s=400)
