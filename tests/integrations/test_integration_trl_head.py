"""`add_fused_head` (TRL's fused LM head from `token_stats`) on copies of a patched model."""
import copy

import pytest
import torch

pytest.importorskip("trl")

from fpo_ops.integrations.trl.head import add_fused_head  # noqa: E402
from hf_fixtures import tiny_model  # noqa: E402


def test_a_deep_copy_of_a_patched_model_runs_on_its_own_parameters():
    # TRL makes its reference model by deep-copying the (already patched) policy.
    patched = tiny_model("llama").train()
    add_fused_head(patched, impl="torch")
    copied = copy.deepcopy(patched)
    plain = tiny_model("llama").train()
    with torch.no_grad():
        for p, q in zip(copied.parameters(), plain.parameters()):
            p.mul_(0.5)
            q.mul_(0.5)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, plain.config.vocab_size, (2, 9), generator=g)
    labels = input_ids.clone()
    labels[0, :3] = -100

    expected = plain(input_ids=input_ids, labels=labels)
    unfused = copied(input_ids=input_ids, labels=labels)
    fused = copied(input_ids=input_ids, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(unfused.logits, expected.logits)
    torch.testing.assert_close(unfused.loss, expected.loss)
    torch.testing.assert_close(fused.loss, expected.loss)

    # Patching the copy again (a trainer patching its reference) wraps the earlier patch.
    add_fused_head(copied, impl="torch")
    torch.testing.assert_close(copied(input_ids=input_ids, labels=labels, fused_lm_head=True).loss, expected.loss)
    torch.testing.assert_close(copied(input_ids=input_ids, labels=labels).loss, expected.loss)

    fused.loss.backward()
    assert all(p.grad is None for p in patched.parameters())
    assert all(p.grad is not None for p in copied.parameters())
