"""Triton's CPU interpreter before 3.7 with NumPy >= 2.4: give runtime loop bounds a valid conversion.

The interpreter holds every scalar (a kernel's int arguments, ``tl.load`` of one element, program ids)
as a NumPy array of shape (1,), and before Triton 3.7 turns such a tensor into a Python int with
``int(array)``. NumPy 2.4 removed that conversion for arrays with ndim > 0 ("only 0-dimensional
arrays can be converted to Python scalars"), so every kernel whose ``range`` bound is a runtime value
(all of ours: the hidden size, the vocabulary split, the count of valid tokens) fails under
``TRITON_INTERPRET=1``. No kernel can avoid that: the bound is a runtime value by design. Triton 3.7
converts the squeezed array instead; `ensure_interpreter_scalars` installs that same conversion on
older Triton, only in the interpreter and only when NumPy rejects the old one. Compiled kernels never
pass through this code.
"""
import functools

import numpy as np
import triton


def _triton_version():
    parts = []
    for piece in triton.__version__.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def numpy_rejects_array_to_int() -> bool:
    """True when ``int()`` of a one-element, one-dimensional array raises (NumPy >= 2.4)."""
    try:
        int(np.zeros(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def _scalar_index(self):
    # the conversion Triton 3.7's interpreter uses: a (1,) array squeezed to 0-d first
    return int(self.handle.data.squeeze())


def ensure_interpreter_scalars() -> bool:
    """Patch the interpreter's tensor-to-int conversion where Triton < 3.7 meets NumPy >= 2.4.

    Idempotent. Returns True when the patch is (now) in place, False when it is not needed.
    """
    if _triton_version() >= (3, 7) or not numpy_rejects_array_to_int():
        return False
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_fpo_scalar_index", False):
        return True

    @functools.wraps(original)
    def patch_lang_tensor(tensor, *args, **kwargs):
        original(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if scope is not None:  # Triton 3.6 restores what its scope set, in reverse order
            scope.set_attr(tensor, "__index__", _scalar_index)
        else:
            tensor.__index__ = _scalar_index

    patch_lang_tensor._fpo_scalar_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
