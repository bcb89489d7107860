"""Head and loss options: collected into dataclasses, checked once, and at module construction."""
import inspect

import pytest
import torch

import fpo_ops
from fpo_ops.losses.options import HeadConfig
from loss_batches import make_batch


@pytest.fixture(scope="module")
def batch():
    return make_batch(rows=4, seed=71)


@pytest.mark.parametrize("module,options,error,match", [
    (fpo_ops.PreferenceLoss, dict(beta=0.0), ValueError, r"^beta: .*got 0.0"),
    (fpo_ops.PreferenceLoss, dict(loss_type="dpo"), ValueError, r"^loss_type: .*'dpo'"),
    (fpo_ops.PreferenceLoss, dict(loss_type="robust", label_smoothing=0.5), ValueError,
     r"^label_smoothing \(robust\)"),
    (fpo_ops.PreferenceLoss, dict(loss_type="aot", use_weighting=True), ValueError, r"^use_weighting"),
    (fpo_ops.PreferenceLoss, dict(temperature=0.0), ValueError, r"^temperature: .*got 0.0"),
    (fpo_ops.PreferenceLoss, dict(impl="cuda"), ValueError, r"^impl: .*'cuda'"),
    (fpo_ops.PreferenceLoss, dict(grad_filter_eps=1.0), ValueError, r"^grad_filter_eps: .*got 1.0"),
    (fpo_ops.PreferenceLoss, dict(process_group="world"), TypeError, r"^process_group: expected a torch"),
    (fpo_ops.PreferenceLoss, dict(betta=0.1), TypeError, r"unknown \['betta'\]"),
    (fpo_ops.KTOLoss, dict(loss_type="bco"), ValueError, r"^loss_type: .*'bco'"),
    (fpo_ops.KTOLoss, dict(desirable_weight=-1.0), ValueError, r"^desirable_weight"),
    (fpo_ops.KTOLoss, dict(ignore_index=1.5), TypeError, r"^ignore_index: expected an int"),
    (fpo_ops.DistillLoss, dict(beta=1.5), ValueError, r"^beta: .*got 1.5"),
    (fpo_ops.DistillLoss, dict(teacher_softcap=-2.0), ValueError, r"^teacher_softcap: .*got -2.0"),
    (fpo_ops.DistillLoss, dict(teacher_hidden=None), TypeError, r"unknown \['teacher_hidden'\]"),
])
def test_modules_check_their_options_at_construction(module, options, error, match):
    with pytest.raises(error, match=match):
        module(**options)


def test_module_options_are_the_dataclasses(batch):
    module = fpo_ops.PreferenceLoss(loss_type=["sigmoid", "sft"], loss_weights=[1, 0.5], beta=0.2, impl="torch")
    assert module.config.loss_type == ("sigmoid", "sft") and module.config.loss_weights == (1.0, 0.5)
    assert module.head_config == HeadConfig(impl="torch")
    distill = fpo_ops.DistillLoss(teacher_softcap=3.0, temperature=0.5)
    assert distill.head_config.ref_softcap == 3.0 and distill.config.beta == 0.5


def test_head_config_forwards_every_token_stats_option():
    head = HeadConfig(temperature=0.5, check_inputs=False, check_finite=True, grad_filter_eps=1e-6)
    kwargs = head.token_stats_kwargs()
    assert kwargs["check_labels"] is False and kwargs["check_finite"] is True and kwargs["grad_filter_eps"] == 1e-6
    accepted = inspect.signature(fpo_ops.token_stats).parameters
    assert set(kwargs) <= set(accepted)


def _nan_completion(batch):
    hidden = batch.hidden.detach().clone()
    row, col = (batch.labels != -100).nonzero()[0].tolist()
    hidden[row, col, 0] = float("nan")
    return hidden


def test_loss_functions_forward_check_finite_and_grad_filter_eps(batch):
    hidden = _nan_completion(batch)
    desirable = torch.tensor([True, False, True, False])
    calls = {
        "preference": lambda h, **kw: fpo_ops.preference_loss(h, batch.weight, batch.labels, batch.ref_hidden,
                                                                batch.ref_weight, impl="torch", **kw),
        "kto": lambda h, **kw: fpo_ops.kto_loss(h, batch.weight, batch.labels, batch.ref_hidden, batch.ref_weight,
                                                desirable=desirable, loss_type="apo_zero_unpaired", impl="torch",
                                                **kw),
        "distill": lambda h, **kw: fpo_ops.distill_loss(h, batch.weight, batch.labels, batch.ref_hidden,
                                                        batch.ref_weight, impl="torch", **kw),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"^hidden: expected finite values"):
            call(hidden, check_finite=True)
        with pytest.raises(ValueError, match=r"^grad_filter_eps: expected a float in \[0, 1\)"):
            call(batch.hidden, grad_filter_eps=-0.1)
        # exact by default, and a filter is only read by impl="triton": the torch path's value is unchanged
        plain = call(batch.hidden)
        filtered = call(batch.hidden, grad_filter_eps=1e-3)
        loss = (lambda out: out if isinstance(out, torch.Tensor) else out.loss)
        assert loss(plain).item() == loss(filtered).item(), name


def test_grad_filter_eps_reaches_the_triton_backward():
    """Labels only in the first 32 of 100 columns, and a threshold above every probability: the
    backward drops the label-free tiles, so the gradient changes; the forward does not."""
    wide = make_batch(rows=4, V=100, seed=72)
    labels = torch.where(wide.labels == -100, wide.labels, wide.labels % 32)

    def run(eps):
        hidden = wide.hidden.detach().clone().requires_grad_()
        out = fpo_ops.preference_loss(hidden, wide.weight.detach(), labels, wide.ref_hidden, wide.ref_weight,
                                      loss_type="sigmoid", impl="triton", grad_filter_eps=eps)
        (grad,) = torch.autograd.grad(out.loss, hidden)
        return out.loss.detach(), grad

    exact_loss, exact = run(0.0)
    filtered_loss, filtered = run(0.99)
    assert exact_loss.item() == filtered_loss.item()
    assert (exact - filtered).abs().max().item() > 1e-6
