"""FusedGKDTrainer against TRL's GKDTrainer on tiny models built in code (CPU, no downloads)."""
import copy

import pytest
import torch

pytest.importorskip("trl")
gkd = pytest.importorskip("trl.experimental.gkd")

from datasets import Dataset  # noqa: E402

from fpo_ops.integrations.trl_gkd import FusedGKDTrainer  # noqa: E402
from hf_fixtures import WORDS, tiny_model, tiny_tokenizer  # noqa: E402

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}{% endif %}"
)


def chat_dataset(rows=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def sentence(low, high):
        n = int(torch.randint(low, high, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))

    return Dataset.from_list([
        {"messages": [{"role": "user", "content": sentence(2, 6)},
                      {"role": "assistant", "content": sentence(2, 8)}]}
        for _ in range(rows)
    ])


def make_trainer(cls, tmp_path, family):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    student = tiny_model(family, seed=0)
    teacher = tiny_model(family, seed=1)
    args = gkd.GKDConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, optim="sgd",
        report_to="none", bf16=False, gradient_checkpointing=False, save_strategy="no", lmbda=0.0,
        seq_kd=False, beta=0.5, max_length=64, use_cpu=True, disable_tqdm=True, logging_steps=1, seed=3,
    )
    return cls(model=student, teacher_model=copy.deepcopy(teacher), args=args, train_dataset=chat_dataset(),
               processing_class=tokenizer)


def loss_and_grads(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_jsd_loss_and_gradients_equal_trl(tmp_path, family):
    theirs = make_trainer(gkd.GKDTrainer, tmp_path / "trl", family)
    ours = make_trainer(FusedGKDTrainer, tmp_path / "fused", family)
    batch = theirs._prepare_inputs(theirs.data_collator([theirs.train_dataset[i] for i in range(4)]))
    assert (batch["labels"] != -100).any()
    for beta in (0.0, 0.5, 1.0):  # forward KL, JSD, reverse KL
        theirs.beta = ours.beta = beta
        loss_b, grads_b = loss_and_grads(theirs, batch)
        loss_a, grads_a = loss_and_grads(ours, batch)
        assert loss_b > 1e-3
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
        assert set(grads_a) == set(grads_b)
        for name in grads_b:
            scale = max(grads_b[name].abs().max().item(), 1.0)
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m: f"beta={beta} {name}: {m}")


def test_trains_a_few_steps(tmp_path):
    trainer = make_trainer(FusedGKDTrainer, tmp_path, "llama")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    assert result.global_step == 2
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
