"""Low-overhead launches for kernels called once per layer per generated token.

``kernel[grid](...)`` makes Triton bind and specialize every argument and build a cache key on each call; for the
decode kernel (~60 parameters) that host-side work measured ~100 µs per launch on the H100 machine, more than the
kernel itself at batch 1 (eval/results/decode_tuning.json: eager vs CUDA-graph times). :class:`CachedLauncher` keeps
the compiled kernel of each specialization and launches it through the compiled handle (``compiled[grid](*args)``,
Triton's own launch path for an already compiled kernel; on Triton 3.6, the version checked on the GPU, straight
through the compiled launcher without Triton's per-call launch metadata, unless a launch hook is registered).

The cache key reproduces what Triton specializes on: each tensor's dtype and 16-byte alignment, each specialized
integer's equality to 1, divisibility by 16 and 32/64-bit range, the other scalars' types, every constexpr and the
launch options. A key never seen goes through the normal launch (which compiles if needed) and its compiled kernel
is kept. Under ``TRITON_INTERPRET=1`` (CI) and on Triton versions whose compiled kernels cannot be launched this way,
every call is the normal launch.
"""

from __future__ import annotations

import torch
import triton

# the compiled handle's launcher signature (grid, stream, function, metadata, hooks, *args) as verified on the GPU
_DIRECT_RUN = tuple(int(x) for x in triton.__version__.split(".")[:2]) == (3, 6)


def _current_stream():
    from triton.runtime import driver

    return driver.active.get_current_stream(driver.active.get_current_device())


def _hooks_active() -> bool:
    """True when a launch hook is registered (a profiler): then launches go through Triton's own runner."""
    rt = getattr(triton, "knobs", None)
    rt = getattr(rt, "runtime", None)
    for name in ("launch_enter_hook", "launch_exit_hook"):
        h = getattr(rt, name, None)
        if h is not None and (not hasattr(h, "calls") or h.calls):
            return True
    return False


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
        parts = [tuple(kwargs.items())]
        add = parts.append
        tensor = torch.Tensor
        for a, spec in zip(args, self.specialized):
            cls = a.__class__
            if cls is tensor or isinstance(a, tensor):
                add(a.dtype)
                add(a.data_ptr() & 15 == 0)
            elif cls is int:
                add((a == 1) + 2 * (a % 16 == 0) + 4 * (not -(2**31) <= a < 2**31) if spec else
                    8 + 4 * (not -(2**31) <= a < 2**31))
            elif cls is bool:
                add(("b", a))
            else:
                add(cls)
        return tuple(parts)

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
            constexprs = (kwargs.get(n, self.defaults[n]) for n in self.constexpr_names)
            if _DIRECT_RUN and not _hooks_active():
                kernel.run(*grid3, _current_stream(), kernel.function, kernel.packed_metadata, None, None, None,
                           *args, *constexprs)
            else:
                kernel[grid3](*args, *constexprs)
            return kernel

        return launch
