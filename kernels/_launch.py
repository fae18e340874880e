"""Low-overhead launches for kernels called once per layer per generated token.

``kernel[grid](...)`` makes Triton bind and specialize every argument and build a cache key on each call; for the
decode kernel (~60 parameters) that host-side work measured ~100 µs per launch on the H100 machine, more than the
kernel itself at batch 1 (eval/results/decode_tuning.json: eager vs CUDA-graph times). :class:`CachedLauncher` keeps
the compiled kernel of each specialization and launches it through the compiled handle (``compiled[grid](*args)``,
Triton's own launch path for an already compiled kernel).

The cache key reproduces what Triton specializes on: each tensor's dtype and 16-byte alignment, each specialized
integer's equality to 1, divisibility by 16 and 32/64-bit range, the other scalars' types, every constexpr and the
launch options. A key never seen goes through the normal launch (which compiles if needed) and its compiled kernel
is kept. Under ``TRITON_INTERPRET=1`` (CI) and on Triton versions whose compiled kernels cannot be launched this way,
every call is the normal launch.
"""

from __future__ import annotations

import torch


class CachedLauncher:
    """``CachedLauncher(jit_fn)[grid](*args, **constexprs_and_options)``: the same call as ``jit_fn[grid](...)``;
    positional ``args`` are the kernel's runtime parameters in order, keywords its constexprs and launch options."""

    def __init__(self, fn):
        self.fn = fn
        params = getattr(fn, "params", None)
        self.ok = params is not None and hasattr(fn, "arg_names")
        if self.ok:
            self.constexpr_names = [p.name for p in params if p.is_constexpr]
            self.defaults = {p.name: p.default for p in params if p.is_constexpr}
            self.n_runtime = len(params) - len(self.constexpr_names)
            self.specialized = [not getattr(p, "do_not_specialize", False) for p in params if not p.is_constexpr]
        self.compiled: dict = {}

    def _key(self, args, kwargs):
        parts = []
        for a, spec in zip(args, self.specialized):
            if isinstance(a, torch.Tensor):
                parts.append((a.dtype, a.data_ptr() % 16 == 0))
            elif isinstance(a, bool):
                parts.append(("b", a))
            elif isinstance(a, int):
                big = not -(2**31) <= a < 2**31
                parts.append(("i", big, a == 1, a % 16 == 0) if spec else ("i", big))
            else:
                parts.append(type(a))
        return tuple(parts), tuple(sorted(kwargs.items()))

    def __getitem__(self, grid):
        grid3 = tuple(grid) + (1,) * (3 - len(grid))  # the compiled handle indexes all three grid dimensions

        def launch(*args, **kwargs):
            if not self.ok or len(args) != self.n_runtime:
                return self.fn[grid](*args, **kwargs)
            key = self._key(args, kwargs)
            kernel = self.compiled.get(key)
            if kernel is None:
                kernel = self.fn[grid](*args, **kwargs)
                if kernel is not None and hasattr(kernel, "__getitem__") and hasattr(kernel, "packed_metadata"):
                    self.compiled[key] = kernel
                return kernel
            kernel[grid3](*args, *(kwargs.get(n, self.defaults[n]) for n in self.constexpr_names))
            return kernel

        return launch
