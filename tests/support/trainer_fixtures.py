"""What the tests of the fused TRL drop-ins share: in-code datasets and one-step comparisons."""
import copy

import pytest
import torch

from hf_fixtures import WORDS, tiny_model, tiny_tokenizer


def sentence(g: torch.Generator, low: int, high: int) -> str:
    n = int(torch.randint(low, high, (1,), generator=g))
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))


def completion_dataset(num_rows: int = 6, seed: int = 0, **columns):
    """A ``datasets.Dataset`` of prompt/completion strings of varying lengths (plus constant ``columns``)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = [dict(prompt=sentence(g, 2, 7), completion=" " + sentence(g, 1, 9), **columns) for _ in range(num_rows)]
    return Dataset.from_list(rows)


def text_dataset(num_rows: int = 6, seed: int = 0):
    """A ``datasets.Dataset`` of plain ``text`` rows (language modelling)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    return Dataset.from_list([{"text": sentence(g, 3, 14)} for _ in range(num_rows)])


def trainer_pair(trl_cls, fused_cls, config_cls, fused_config_cls, tmp_path, dataset, family="llama",
                 with_ref=False, ref_kwarg="ref_model", peft_config=None, **config):
    """(TRL trainer, fused trainer) on equal copies of one tiny model, with equal configs.

    ``with_ref`` adds, as ``ref_kwarg``, a perturbed copy of the model (reference or teacher).
    ``peft_config`` (a ``peft.PeftConfig``) is handed to both trainers, each its own copy, which
    wrap the model with equal adapters.
    """
    model = tiny_model(family)
    made = []
    for trainer_cls, cfg_cls, name in ((trl_cls, config_cls, "trl"), (fused_cls, fused_config_cls, "fused")):
        kwargs = {}
        if peft_config is not None:
            kwargs["peft_config"] = copy.deepcopy(peft_config)  # TRL may edit it (modules_to_save)
            # The trainers wrap the model before Trainer seeds itself: the adapters' initialisation draws
            # from the global generator as it stands.
            torch.manual_seed(0)
        if with_ref:
            ref = copy.deepcopy(model)
            with torch.no_grad():
                g = torch.Generator().manual_seed(3)
                for p in ref.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
            kwargs[ref_kwarg] = ref
        made.append(trainer_cls(
            model=copy.deepcopy(model), args=cfg_cls(output_dir=str(tmp_path / name), **config),
            train_dataset=dataset, processing_class=tiny_tokenizer(), **kwargs,
        ))
    return made


def one_batch(trainer, rows=4):
    examples = [trainer.train_dataset[i] for i in range(rows)]
    return trainer._prepare_inputs(trainer.data_collator(examples))


def step(trainer, batch, **compute_loss_kwargs):
    """Loss, the last logged value of every metric and every parameter gradient of one batch."""
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    # accelerate puts the mixed-precision autocast around the prepared model's forward at train();
    # the same autocast here.
    with trainer.compute_loss_context_manager(), trainer.accelerator.autocast():
        loss = trainer.compute_loss(trainer.model, dict(batch), **compute_loss_kwargs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


def assert_same_step(ours, theirs, tol=1e-5):
    """Loss, every metric and every gradient equal to ``tol`` (relative, and absolute on the scale)."""
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = ours, theirs
    torch.testing.assert_close(loss_a, loss_b, rtol=tol, atol=tol)
    assert set(metrics_a) == set(metrics_b) and metrics_b
    for name in metrics_b:
        assert metrics_a[name] == pytest.approx(metrics_b[name], rel=tol, abs=tol), name
    assert set(grads_a) == set(grads_b) and grads_b
    for name in grads_b:
        scale = max(grads_b[name].abs().max().item(), 1.0)
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=10 * tol, atol=tol * scale,
                                   msg=lambda m: f"{name}: {m}")


def assert_default_precision_within_budget(pair, tmp_path, fp32_config, make_batch, **overrides):
    """Under TRL's default precision (bf16 autocast, gradient checkpointing) the fused step is within
    the bf16 budget of the fp32 step (`assert_within_budget`).

    Args:
        pair: ``pair(tmp_path, base=config, **overrides) -> (TRL trainer, fused trainer)``.
        fp32_config: the tests' fp32 config; its ``bf16`` and ``gradient_checkpointing`` are dropped.
        make_batch: ``make_batch(trainer) -> batch``.
    """
    exact_trainer, _ = pair(tmp_path / "fp32", base=fp32_config, **overrides)
    defaults = {k: v for k, v in fp32_config.items() if k not in ("bf16", "gradient_checkpointing")}
    theirs, ours = pair(tmp_path / "bf16", base=defaults, **overrides)
    assert theirs.args.bf16 and theirs.args.gradient_checkpointing and ours.args.bf16
    batch = make_batch(theirs)
    assert_within_budget(step(ours, batch), step(theirs, batch), step(exact_trainer, batch))


def assert_within_budget(ours, theirs, exact, floor=1e-4):
    """Error against the fp32 step ``exact``: ours at most 2x TRL's own, plus ``floor`` on the scale.

    Under bf16 both heads round their GEMM operands to bf16 (TRL also rounds the logits), so each
    scalar's error is one draw of that rounding noise; the loss and metrics are therefore compared
    as one vector of errors (its norm), each gradient as the norm over its elements.
    """
    names = sorted(exact[1])
    values = lambda step: torch.tensor([step[0].item()] + [float(step[1][n]) for n in names], dtype=torch.float64)
    truth = values(exact)
    err_a, err_b = (values(ours) - truth).norm().item(), (values(theirs) - truth).norm().item()
    assert err_a <= 2 * err_b + floor * max(truth.norm().item(), 1.0), ("loss and metrics", err_a, err_b)
    for name, e in exact[2].items():
        err_a = (ours[2][name].float() - e).norm().item()
        err_b = (theirs[2][name].float() - e).norm().item()
        assert err_a <= 2 * err_b + floor * max(e.norm().item(), 1.0), (name, err_a, err_b)


# Logged values bf16 rounds (not counts, the schedule or the step), compared step by step as one
# vector; the loss and the gradient norm also across the steps, each on its own scale.
BF16_ROUNDED_LOGS = ("entropy", "logits/chosen", "logits/rejected", "rewards/chosen", "rewards/rejected",
                     "rewards/margins", "logps/chosen", "logps/rejected", "mean_token_accuracy")
BF16_PER_RUN_LOGS = ("loss", "grad_norm")


def assert_bf16_training_within_budget(ours, theirs, exact, weight_floor=1e-7):
    """Training runs under bf16 against the fp32 run ``exact``, with the rule of `assert_within_budget`.

    Each argument is ``(logged steps, final parameters)``. At most 2x TRL's own error plus a floor:
    every step's loss and rounded logged values (as one vector, where the log-probs set the scale);
    the loss, and the gradient norm, of all steps (a vector each: one step's value is a single draw
    of rounding noise); each trained parameter over its elements (``weight_floor`` on its scale: a
    step moves the weights by about the learning rate, so the floor of the logged values would hide
    any error of theirs).
    """
    (steps_a, params_a), (steps_b, params_b), (steps_e, params_e) = ours, theirs, exact
    assert len(steps_a) == len(steps_b) == len(steps_e) > 0
    for a, b, e in zip(steps_a, steps_b, steps_e):
        names = [n for n in BF16_ROUNDED_LOGS if n in e]
        assert_within_budget(*((torch.tensor(row["loss"]), {n: row[n] for n in names}, {}) for row in (a, b, e)))
    for name in BF16_PER_RUN_LOGS:
        vectors = [{name: torch.tensor([row[name] for row in rows], dtype=torch.float64)}
                   for rows in (steps_a, steps_b, steps_e)]
        assert_within_budget(*((torch.tensor(0.0), {}, v) for v in vectors))
    assert set(params_a) == set(params_b) == set(params_e)
    assert_within_budget((torch.tensor(0.0), {}, params_a), (torch.tensor(0.0), {}, params_b),
                         (torch.tensor(0.0), {}, params_e), floor=weight_floor)


def spy_head_calls(monkeypatch, module=None):
    """Record the GEMM operand dtype of every `token_stats` call made from ``module`` (the fused head's)."""
    import fpo_ops.integrations.trl.head as trl_head

    module = trl_head if module is None else module
    seen = []
    original = module.token_stats

    def spy(hidden, weight, *args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype)
        return original(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(module, "token_stats", spy)
    return seen


def assert_heads_run_in_autocast_dtype(pair, tmp_path, monkeypatch, bf16, make_batch, calls=1, module=None):
    """One fused step with ``bf16`` on or off makes ``calls`` head calls, each on bf16 (fp32) GEMM operands.

    Args:
        pair: ``pair(tmp_path, bf16=bf16) -> (TRL trainer, fused trainer)``.
        make_batch: ``make_batch(trainer) -> batch``.
        module: where the fused trainer calls `token_stats` from (`spy_head_calls`).
    """
    _, ours = pair(tmp_path, bf16=bf16)
    seen = spy_head_calls(monkeypatch, module)
    step(ours, make_batch(ours))
    assert seen == [torch.bfloat16 if bf16 else torch.float32] * calls


def assert_same_logs(got, expected, tol=1e-5):
    """The same log rows with the same keys, every value equal to ``tol`` (relative and absolute)."""
    assert len(got) == len(expected) > 1
    for step, (a, b) in enumerate(zip(got, expected)):
        assert set(a) == set(b), (step, set(a) ^ set(b))
        for name in b:
            assert a[name] == pytest.approx(b[name], rel=tol, abs=tol), (step, name, a[name], b[name])


def assert_same_weights(got, expected, tol=1e-5):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
