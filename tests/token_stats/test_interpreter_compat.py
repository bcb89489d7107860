"""The interpreter's scalar conversion on Triton < 3.7 with NumPy >= 2.4 (fpo_ops/token_stats/kernels/interpreter_compat.py)."""
import operator

import numpy as np
import pytest

from fpo_ops.token_stats.kernels import interpreter_compat


class _Handle:
    def __init__(self, data):
        self.data = data


class _Scope:
    """Triton 3.6's _LangPatchScope: records each attribute it sets and restores in reverse order."""

    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def restore(self):
        while self.changes:
            obj, name, original = self.changes.pop()
            if original is None:
                delattr(obj, name)
            else:
                setattr(obj, name, original)


def _old_patch_lang_tensor(tensor, scope):
    # what Triton 3.6 installs: int() of the (1,)-shaped array
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def test_old_interpreter_conversion_is_repaired_and_restored(monkeypatch):
    from triton.runtime import interpreter

    class Tensor:
        def __init__(self, value):
            self.handle = _Handle(np.array([value], dtype=np.int32))

    monkeypatch.setattr(interpreter_compat, "_triton_version", lambda: (3, 6))
    monkeypatch.setattr(interpreter_compat, "numpy_rejects_array_to_int", lambda: True)
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _old_patch_lang_tensor)
    assert interpreter_compat.ensure_interpreter_scalars()
    assert interpreter_compat.ensure_interpreter_scalars()  # idempotent: one wrapper
    assert interpreter._patch_lang_tensor.__wrapped__ is _old_patch_lang_tensor
    scope = _Scope()
    interpreter._patch_lang_tensor(Tensor, scope)
    assert operator.index(Tensor(7)) == 7 and list(range(0, Tensor(3))) == [0, 1, 2]
    scope.restore()
    assert "__index__" not in Tensor.__dict__  # nothing outlives the kernel call


def test_not_applied_where_triton_or_numpy_convert_fine(monkeypatch):
    from triton.runtime import interpreter

    before = interpreter._patch_lang_tensor
    monkeypatch.setattr(interpreter_compat, "_triton_version", lambda: (3, 7))
    assert not interpreter_compat.ensure_interpreter_scalars()
    monkeypatch.setattr(interpreter_compat, "_triton_version", lambda: (3, 6))
    monkeypatch.setattr(interpreter_compat, "numpy_rejects_array_to_int", lambda: False)
    assert not interpreter_compat.ensure_interpreter_scalars()
    assert interpreter._patch_lang_tensor is before


def test_numpy_probe_matches_numpy():
    major, minor = (int(x) for x in np.__version__.split(".")[:2])
    assert interpreter_compat.numpy_rejects_array_to_int() == ((major, minor) >= (2, 4))


@pytest.mark.parametrize("version,expected", [("3.6.0", (3, 6)), ("3.7.0+git1234", (3, 7)), ("3.10.1", (3, 10))])
def test_version_parse(monkeypatch, version, expected):
    monkeypatch.setattr(interpreter_compat.triton, "__version__", version)
    assert interpreter_compat._triton_version() == expected
