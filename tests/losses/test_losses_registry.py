"""The loss registry: one entry per loss type, and everything derived from it stays in step."""
import inspect

import pytest

import fpo_ops
from fpo_ops.losses import config, registry


def test_every_loss_type_has_one_entry_in_trl_order():
    assert registry.LOSS_TYPES == tuple(registry.LOSSES)
    assert registry.TRL_DPO_LOSS_TYPES == (
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    )
    assert registry.EXTRA_LOSS_TYPES == ("tdpo1", "tdpo2", "spo", "sppo", "sppo_single", "simpo", "cpo", "orpo")
    assert fpo_ops.losses.LOSS_TYPES == registry.LOSS_TYPES


def test_entries_describe_what_each_loss_reads():
    where = registry.types_where
    assert where(lambda s: s.reference_logps) == {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "tdpo1", "tdpo2", "sppo", "sppo_single"}
    assert where(lambda s: s.reference_model) == {"tdpo1", "tdpo2", "spo"}
    assert where(lambda s: s.margin == registry.OFFSET) == {
        "sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm", "tdpo1", "tdpo2", "spo",
        "simpo", "cpo"}
    assert where(lambda s: s.reward == registry.POLICY) == {"simpo", "cpo", "orpo"}
    assert where(lambda s: s.mean_logps) == {"simpo", "orpo"}
    assert config.NO_WEIGHTING_LOSS_TYPES == {"aot", "aot_unpaired"}
    assert registry.users_of("chosen_win_prob") == ("sppo",)
    assert registry.users_of("spo_weight") == ("spo",)
    assert registry.needs_reference(["simpo", "sft"]) is False
    assert registry.needs_reference(["simpo", "spo"]) is True


def test_hyper_parameters_match_the_signature_of_preference_loss():
    """The keywords of preference_loss are generated: each registry hyper-parameter is one, same default."""
    signature = inspect.signature(fpo_ops.preference_loss).parameters
    for param in registry.HYPER_PARAMETERS:
        assert param.name in signature, param.name
        assert signature[param.name].default == param.default, param.name
        assert signature[param.name].kind is inspect.Parameter.KEYWORD_ONLY
    fields = [f for f in config.LossConfig.__dataclass_fields__]
    assert fields == ["loss_type", "loss_weights"] + [p.name for p in registry.HYPER_PARAMETERS]
    assert [p.name for p in registry.EXTRA_HYPER_PARAMETERS] == ["average_log_prob", "tdpo_alpha", "spo_alpha",
                                                                  "simpo_gamma", "cpo_alpha"]


def test_loss_config_checks_and_normalises():
    cfg = config.LossConfig(loss_type="sigmoid", beta=1)
    assert cfg.loss_type == ("sigmoid",) and cfg.loss_weights == (1.0,) and isinstance(cfg.beta, float)
    with pytest.raises(ValueError, match=r"^label_smoothing \(robust\)"):
        config.LossConfig(loss_type=["sigmoid", "robust"], label_smoothing=0.6 - 0.1)
    with pytest.raises(ValueError, match=r"^f_divergence_type: 'forward_kl' expects loss types among"):
        config.LossConfig(loss_type="nca_pair", f_divergence_type="forward_kl")
    with pytest.raises(TypeError, match=r"^simpo_gamma: expected a float, got str"):
        config.LossConfig(loss_type="simpo", simpo_gamma="0.5")
    with pytest.raises(AttributeError):
        cfg.beta = 0.2  # frozen
