"""Head and loss options: collected into dataclasses, checked once, and at module construction."""
import inspect

import pytest
import torch

import fpo_ops
from fpo_ops.losses.config import LossConfig
from fpo_ops.losses.distill import DistillConfig
from fpo_ops.losses.keywords import option_keywords
from fpo_ops.losses.kto import KTOConfig
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


LOSS_FUNCTIONS = [(fpo_ops.preference_loss, LossConfig), (fpo_ops.kto_loss, KTOConfig),
                  (fpo_ops.distill_loss, DistillConfig)]
HEAD_KEYWORDS = ["ignore_index", "temperature", "softcap", "logit_scale", "ref_softcap", "ref_logit_scale",
                 "grad_filter_eps", "impl", "check_inputs", "check_finite", "process_group"]
# token_stats spells the label check differently; every other head keyword is its own.
TOKEN_STATS_NAME = {"check_inputs": "check_labels"}


@pytest.mark.parametrize("function,config_cls", LOSS_FUNCTIONS, ids=lambda x: getattr(x, "__name__", ""))
def test_loss_keywords_are_the_config_fields(function, config_cls):
    """Each loss function's option keywords are its two dataclasses' fields, keyword-only, with the
    fields' defaults; the head keywords' defaults are token_stats's own."""
    parameters = inspect.signature(function).parameters
    keyword_only = [name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    renames = {"ref_softcap": "teacher_softcap", "ref_logit_scale": "teacher_logit_scale"} \
        if function is fpo_ops.distill_loss else {}
    loss_fields = [f.name for f in config_cls.__dataclass_fields__.values()]
    head_keywords = [renames.get(name, name) for name in HEAD_KEYWORDS]
    for name in ["config", *loss_fields, "head", *head_keywords]:
        assert name in keyword_only, name
    for name in loss_fields:
        assert parameters[name].default == config_cls.__dataclass_fields__[name].default, name
    stats_parameters = inspect.signature(fpo_ops.token_stats).parameters
    for name, keyword in zip(HEAD_KEYWORDS, head_keywords):
        assert parameters[keyword].default == stats_parameters[TOKEN_STATS_NAME.get(name, name)].default, name
    assert function.option_groups["head"].cls is HeadConfig
    assert function.option_groups["config"].cls is config_cls


def _preference(batch, **kw):
    hidden = batch.hidden.detach().clone().requires_grad_()
    out = fpo_ops.preference_loss(hidden, batch.weight.detach(), batch.labels, batch.ref_hidden, batch.ref_weight,
                                  **kw)
    (grad,) = torch.autograd.grad(out.loss, hidden)
    return out.loss.detach(), {k: v.detach() for k, v in out.metrics.items()}, grad


def _assert_same(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_ready_configs_equal_their_keywords_and_keywords_beside_them_replace_fields(batch):
    keywords = _preference(batch, loss_type="tdpo2", beta=0.3, tdpo_alpha=0.7, temperature=0.8, softcap=5.0,
                           impl="torch")
    ready = _preference(batch, config=LossConfig(loss_type="tdpo2", beta=0.3, tdpo_alpha=0.7),
                        head=HeadConfig(temperature=0.8, softcap=5.0, impl="torch"))
    _assert_same(keywords, ready)
    replaced = _preference(batch, config=LossConfig(loss_type="tdpo2", beta=0.9, tdpo_alpha=0.7), beta=0.3,
                           head=HeadConfig(temperature=2.0, softcap=5.0, impl="torch"), temperature=0.8)
    _assert_same(keywords, replaced)
    other = _preference(batch, loss_type="tdpo2", beta=0.9, tdpo_alpha=0.7, temperature=0.8, softcap=5.0,
                        impl="torch")
    assert not torch.equal(keywords[0], other[0])  # beta reaches the loss


def test_bad_configs_and_keywords_name_the_argument(batch):
    call = (lambda **kw: fpo_ops.preference_loss(batch.hidden, batch.weight, batch.labels, batch.ref_hidden,
                                                 batch.ref_weight, impl="torch", **kw))
    with pytest.raises(TypeError, match=r"^head: expected a HeadConfig or None, got dict"):
        call(head={"temperature": 1.0})
    with pytest.raises(TypeError, match=r"^config: expected a LossConfig or None, got KTOConfig"):
        call(config=KTOConfig())
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'betta'"):
        call(betta=0.1)
    with pytest.raises(ValueError, match=r"^beta: .*got -1"):
        call(config=LossConfig(), beta=-1.0)
    with pytest.raises(ValueError, match=r"^teacher_softcap: .*got -2.0"):
        fpo_ops.distill_loss(batch.hidden, batch.weight, batch.labels, batch.ref_hidden, batch.ref_weight,
                             impl="torch", teacher_softcap=-2.0)


def test_module_forward_options_replace_the_constructed_ones(batch):
    module = fpo_ops.PreferenceLoss(loss_type="sigmoid", beta=0.1, impl="torch")
    hidden = batch.hidden.detach()
    out = module(hidden, batch.weight.detach(), batch.labels, batch.ref_hidden, batch.ref_weight, beta=0.4,
                 temperature=0.5)
    expected = fpo_ops.preference_loss(hidden, batch.weight.detach(), batch.labels, batch.ref_hidden,
                                       batch.ref_weight, loss_type="sigmoid", beta=0.4, temperature=0.5, impl="torch")
    assert torch.equal(out.loss, expected.loss)
    assert module.config.beta == 0.1 and module.head_config.temperature == 1.0
    unchanged = module(hidden, batch.weight.detach(), batch.labels, batch.ref_hidden, batch.ref_weight)
    assert not torch.equal(unchanged.loss, out.loss)


def test_option_keywords_refuses_a_bad_definition():
    with pytest.raises(TypeError, match=r"placeholder 'head' must be keyword-only"):
        option_keywords(head=HeadConfig)(lambda x, head: x)
    with pytest.raises(TypeError, match=r"option 'temperature' of HeadConfig is already a parameter"):
        option_keywords(head=HeadConfig)(lambda x, *, temperature=1.0, head: x)
    with pytest.raises(TypeError, match=r"expected keyword-only parameters \['config'\]"):
        option_keywords(config=LossConfig)(lambda x: x)
