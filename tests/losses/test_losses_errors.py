"""Configuration errors of the loss heads (each names its argument) and the nn.Module wrappers."""
import pytest
import torch

import fpo_ops
from loss_batches import make_batch


@pytest.fixture(scope="module")
def batch():
    return make_batch(rows=4, seed=61)


def _pref(batch, with_ref=True, **kw):
    ref = (batch.ref_hidden, batch.ref_weight) if with_ref else (None, None)
    return fpo_ops.preference_loss(batch.hidden, batch.weight, kw.pop("labels", batch.labels), *ref, impl="torch", **kw)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"loss_type": "dpo"}, ValueError, "loss_type.*'dpo'"),
    ({"loss_type": []}, ValueError, "loss_type.*empty"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, ValueError, "loss_weights.*expected 2.*got 1"),
    ({"loss_type": "sigmoid", "loss_weights": [float("nan")]}, ValueError, r"loss_weights\[0\]"),
    ({"loss_type": "exo_pair"}, ValueError, "label_smoothing.*exo_pair.*got 0.0"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, ValueError, r"label_smoothing \(robust\).*got 0.5"),
    ({"label_smoothing": 1.0}, ValueError, "label_smoothing.*got 1.0"),
    ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
    ({"f_divergence_type": "kl"}, ValueError, "f_divergence_type.*'kl'"),
    ({"loss_type": "bco_pair", "f_divergence_type": "forward_kl"}, ValueError, "f_divergence_type.*bco_pair"),
    ({"loss_type": "tdpo2", "f_divergence_type": "js_divergence"}, ValueError, "f_divergence_type"),
    ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.5}, ValueError,
     "f_alpha_divergence_coef.*got 1.5"),
    ({"f_alpha_divergence_coef": -0.1}, ValueError, "f_alpha_divergence_coef"),
    ({"ld_alpha": 1.2}, ValueError, "ld_alpha.*got 1.2"),
    ({"loss_type": "aot", "use_weighting": True}, ValueError, "use_weighting.*aot"),
    ({"use_weighting": 1}, TypeError, "use_weighting"),
    ({"beta": 0.0}, ValueError, "beta.*got 0.0"),
    ({"beta": "0.1"}, TypeError, "beta.*str"),
    ({"discopop_tau": -1.0, "loss_type": "discopop"}, ValueError, "discopop_tau"),
    ({"tdpo_alpha": -0.5, "loss_type": "tdpo2"}, ValueError, "tdpo_alpha"),
    ({"spo_alpha": 0.0, "loss_type": "spo"}, ValueError, "spo_alpha"),
    ({"cpo_alpha": -1.0, "loss_type": "cpo"}, ValueError, "cpo_alpha"),
    ({"loss_type": "nca_pair", "margin": torch.zeros(2, dtype=torch.float64)}, ValueError, "margin.*nca_pair"),
    ({"margin": torch.zeros(3, dtype=torch.float64)}, ValueError, r"margin.*\(2,\).*\(3,\)"),
    ({"margin": torch.zeros(2, dtype=torch.long)}, TypeError, "margin.*floating"),
    ({"loss_type": "sppo"}, ValueError, "chosen_win_prob, rejected_win_prob"),
    ({"loss_type": "sppo", "chosen_win_prob": torch.tensor([0.5, 1.5], dtype=torch.float64),
      "rejected_win_prob": torch.tensor([0.5, 0.5], dtype=torch.float64)}, ValueError, "chosen_win_prob.*1.5"),
    ({"chosen_win_prob": torch.ones(2, dtype=torch.float64), "rejected_win_prob": torch.ones(2, dtype=torch.float64)},
     ValueError, "chosen_win_prob.*sppo"),
    ({"loss_type": "sppo_single"}, ValueError, "pair_win_prob.*sppo_single"),
    ({"loss_type": "sppo_single", "pair_win_prob": torch.tensor([0.5, -0.1], dtype=torch.float64)}, ValueError,
     "pair_win_prob.*-0.1"),
    ({"loss_type": "sppo", "pair_win_prob": torch.ones(2, dtype=torch.float64), "chosen_win_prob": torch.ones(2),
      "rejected_win_prob": torch.ones(2)}, ValueError, "pair_win_prob.*'sppo_single'"),
    ({"loss_type": "spo", "spo_score_function": True}, ValueError, "spo_score_function.*sample"),
    ({"loss_type": "spo", "spo_score_function": 1}, TypeError, "spo_score_function"),
    ({"loss_type": "spo", "sample_weights": torch.ones(3, dtype=torch.float64)}, ValueError,
     "sample_weights.*sample_labels"),
    ({"spo_weight": torch.ones(2, dtype=torch.float64)}, ValueError, "spo_weight.*'spo'"),
    ({"loss_type": "spo", "spo_weight": torch.ones(3, dtype=torch.float64)}, ValueError, r"spo_weight.*\(2,\)"),
    ({"ref_chosen_logps": torch.zeros(2, dtype=torch.float64)}, ValueError, "ref_chosen_logps, ref_rejected_logps"),
    ({"ref_chosen_logps": torch.zeros(2, 1), "ref_rejected_logps": torch.zeros(2, 1)}, ValueError,
     "ref_chosen_logps.*shape"),
    ({"sample_hidden": torch.zeros(1, 7, 16, dtype=torch.float64)}, ValueError, "sample_hidden.*spo"),
    ({"loss_type": "spo", "sample_hidden": torch.zeros(1, 7, 16, dtype=torch.float64)}, ValueError,
     "sample_hidden, sample_ref_hidden, sample_labels"),
])
def test_preference_loss_configuration_errors(batch, kwargs, error, match):
    with pytest.raises(error, match=match):
        _pref(batch, **kwargs)


def test_batch_layout_errors(batch):
    with pytest.raises(ValueError, match="labels: expected an even.*got 3"):
        _pref(batch, labels=batch.labels[:3], with_ref=False, loss_type="simpo")
    with pytest.raises(ValueError, match=r"labels: expected shape \[2B, T\]"):
        fpo_ops.preference_loss(batch.hidden[0], batch.weight, batch.labels[0], loss_type="simpo", impl="torch")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "aot", "sppo_hard", ["simpo", "bco_pair"]])
def test_reference_log_probs_are_required(batch, loss_type):
    with pytest.raises(ValueError, match="ref_hidden.*need reference log-probs"):
        _pref(batch, with_ref=False, loss_type=loss_type)


@pytest.mark.parametrize("loss_type", ["tdpo1", "tdpo2", "spo"])
def test_token_level_losses_reject_precomputed_reference(batch, loss_type):
    logps = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="ref_hidden.*full vocabulary"):
        _pref(batch, with_ref=False, loss_type=loss_type, ref_chosen_logps=logps, ref_rejected_logps=logps)


def test_reference_free_losses_need_no_reference(batch):
    for loss_type in ("simpo", "cpo", "orpo", "sft"):
        assert torch.isfinite(_pref(batch, with_ref=False, loss_type=loss_type).loss)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"loss_type": "bco"}, ValueError, "loss_type.*'bco'"),
    ({"desirable": torch.tensor([1, 0, 1, 0])}, TypeError, "desirable.*bool"),
    ({"desirable": torch.tensor([True, False])}, ValueError, r"desirable.*\(4,\).*\(2,\)"),
    ({"kl_hidden": None}, ValueError, "kl_hidden, kl_labels"),
    ({"kl_ref_hidden": None}, ValueError, "kl_ref_hidden"),
    ({"beta": -1.0}, ValueError, "beta"),
    ({"undesirable_weight": -1.0}, ValueError, "undesirable_weight"),
    ({"ref_logps": torch.zeros(3, dtype=torch.float64)}, ValueError, r"ref_logps.*\(4,\)"),
])
def test_kto_configuration_errors(batch, kwargs, error, match):
    args = dict(desirable=torch.tensor([True, False, True, False]), kl_hidden=batch.ref_hidden,
                kl_labels=batch.labels, kl_ref_hidden=batch.hidden.detach(), impl="torch")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fpo_ops.kto_loss(batch.hidden, batch.weight, batch.labels, batch.ref_hidden, batch.ref_weight, **args)


def test_kto_needs_a_reference(batch):
    with pytest.raises(ValueError, match="ref_hidden.*ref_logps"):
        fpo_ops.kto_loss(batch.hidden, batch.weight, batch.labels, desirable=torch.ones(4, dtype=torch.bool),
                         loss_type="apo_zero_unpaired", impl="torch")


def test_distill_errors(batch):
    with pytest.raises(ValueError, match="beta.*got 1.5"):
        fpo_ops.distill_loss(batch.hidden, batch.weight, batch.labels, batch.ref_hidden, batch.ref_weight, beta=1.5)
    with pytest.raises(ValueError, match="teacher_hidden"):
        fpo_ops.distill_loss(batch.hidden, batch.weight, batch.labels, None)


def test_modules_equal_the_functions(batch):
    ref_logps = torch.tensor([-20.0, -21.0], dtype=torch.float64)
    module = fpo_ops.PreferenceLoss(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3], beta=0.2, impl="torch")
    assert isinstance(module, torch.nn.Module)
    out = module(batch.hidden, batch.weight, batch.labels, ref_chosen_logps=ref_logps, ref_rejected_logps=ref_logps)
    expected = fpo_ops.preference_loss(batch.hidden, batch.weight, batch.labels, loss_type=["sigmoid", "sft"],
                                       loss_weights=[1.0, 0.3], beta=0.2, ref_chosen_logps=ref_logps,
                                       ref_rejected_logps=ref_logps, impl="torch")
    assert out.loss.item() == expected.loss.item()
    # a forward keyword overrides the constructor's
    override = module(batch.hidden, batch.weight, batch.labels, batch.ref_hidden, batch.ref_weight, beta=0.5)
    direct = _pref(batch, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3], beta=0.5)
    assert override.loss.item() == direct.loss.item()

    desirable = torch.tensor([True, False, False, True])
    kto = fpo_ops.KTOLoss(beta=0.3, impl="torch")(batch.hidden, batch.weight, batch.labels, batch.ref_hidden,
                                                  batch.ref_weight, desirable=desirable, kl_hidden=batch.ref_hidden,
                                                  kl_labels=batch.labels, kl_ref_hidden=batch.hidden.detach())
    kto_direct = fpo_ops.kto_loss(batch.hidden, batch.weight, batch.labels, batch.ref_hidden, batch.ref_weight,
                                  desirable=desirable, kl_hidden=batch.ref_hidden, kl_labels=batch.labels,
                                  kl_ref_hidden=batch.hidden.detach(), beta=0.3, impl="torch")
    assert kto.loss.item() == kto_direct.loss.item()

    distill = fpo_ops.DistillLoss(beta=0.2, temperature=0.5, impl="torch")(
        batch.hidden, batch.weight, batch.labels, batch.ref_hidden, batch.ref_weight)
    distill_direct = fpo_ops.distill_loss(batch.hidden, batch.weight, batch.labels, batch.ref_hidden,
                                          batch.ref_weight, beta=0.2, temperature=0.5, impl="torch")
    assert distill.item() == distill_direct.item()


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
def test_spo_samples_without_a_sample_dimension(batch, impl):
    """One sample given as [T'] labels (and [T', H] states) is a shape error naming sample_labels."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(5, batch.hidden.shape[-1], generator=g, dtype=torch.float64)
    ref_hidden = torch.randn(5, batch.ref_hidden.shape[-1], generator=g, dtype=torch.float64)
    labels = torch.randint(0, batch.weight.shape[0], (5,), generator=g)
    with pytest.raises(ValueError, match=r"^sample_labels: expected shape \[S, T'\].*got \(5,\)"):
        fpo_ops.preference_loss(batch.hidden, batch.weight, batch.labels, batch.ref_hidden, batch.ref_weight,
                                loss_type="spo", sample_hidden=hidden, sample_ref_hidden=ref_hidden,
                                sample_labels=labels, impl=impl)
