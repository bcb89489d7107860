"""Triton is an optional dependency: without it `import fpo_ops`, impl="torch" and impl="auto" on
CPU work, and impl="triton" says what to install. Runs in a subprocess whose ``import triton``
fails, as on a machine where it is not installed."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # any `import triton` now raises ImportError
    import torch
    import fpo_ops
    from fpo_ops.token_stats import chunked

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ref_hidden = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 37, (3, 5), generator=g)
    labels[0, :2] = -100
    outputs = ("logp", "kl", "entropy", "jsd")
    want = fpo_ops.token_stats(hidden, weight, labels, ref_hidden, outputs=outputs, impl="reference")
    wants = torch.autograd.grad(sum(getattr(want, n).sum() for n in outputs), (hidden, weight))
    for impl in ("torch", "auto"):
        got = fpo_ops.token_stats(hidden, weight, labels, ref_hidden, outputs=outputs, impl=impl)
        for name in outputs:
            assert torch.allclose(getattr(got, name), getattr(want, name), rtol=1e-10, atol=1e-12), (impl, name)
        grads = torch.autograd.grad(sum(getattr(got, n).sum() for n in outputs), (hidden, weight))
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(grads, wants)), impl
    loss = fpo_ops.preference_loss(hidden[:2], weight, labels[:2], ref_hidden[:2], loss_type="tdpo1").loss
    assert torch.isfinite(loss)
    try:
        fpo_ops.token_stats(hidden, weight, labels, impl="triton")
    except ImportError as exc:
        assert "impl='triton'" in str(exc) and "pip install" in str(exc), str(exc)
    else:
        raise AssertionError("impl='triton' ran without triton")
    assert not any(name == "triton" or name.startswith("triton.") for name, m in sys.modules.items()
                   if m is not None), "something imported triton"
    print("ok")
""")


def test_torch_path_works_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
