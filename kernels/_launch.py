"""Low-overhead launches for kernels called once per layer per generated token.

``kernel[grid](...)`` makes Triton bind and specialize every argument and build a cache key on each call; for the
decode kernel (~60 parameters) that host-side work measured ~100 µs per launch on the H100 machine, more than the
kernel itself at batch 1 (eval/results/decode_tuning.json: eager vs CUDA-graph times). :class:`CachedLauncher` keeps
the compiled kernel of each specialization and launches it through the compiled handle (``compiled[grid](*args)``,
Triton's own launch path for an already compiled kernel; on Triton 3.6, the version checked on the GPU, straight
through the compiled launcher without Triton's per-call launch metadata, unless a launch hook is registered).

Pointer arguments: Triton's launcher turns each tensor argument into its address with a Python ``data_ptr()``
call and a ``cuPointerGetAttribute`` driver query; a bound launch (:class:`BoundLaunch`) passes the addresses as
Python ints instead (the launcher takes ints as they are), computed once for its fixed tensors, which it keeps
alive, and with one ``data_ptr()`` per step for the varying ones. Measured on the H100 machine, these per-argument
costs were the larger part of a decode launch's ~30 µs of host time.

The cache key reproduces what Triton specializes on: each tensor's dtype and 16-byte alignment, each specialized
integer's equality to 1, divisibility by 16 and 32/64-bit range, the other scalars' types, every constexpr and the
launch options. A key never seen goes through the normal launch (which compiles if needed) and its compiled kernel
is kept. Under ``TRITON_INTERPRET=1`` (CI) and on Triton versions whose compiled kernels cannot be launched this way,
every call is the normal launch.
"""

from __future__ import annotations

import functools
import inspect
import operator

import torch
import triton

# the compiled handle's launcher signature (grid, stream, function, metadata, hooks, *args) as verified on the GPU
_DIRECT_RUN = tuple(int(x) for x in triton.__version__.split(".")[:2]) == (3, 6)


@functools.cache
def _driver_calls():
    """``(get_current_device, get_current_stream)`` of Triton's active driver, looked up once (``driver.active`` is
    a lazy proxy: each attribute read through it costs host time on every launch)."""
    from triton.runtime import driver

    drv = driver.active
    return drv.get_current_device, drv.get_current_stream


def _current_stream(device_index=None):
    current_device, current_stream = _driver_calls()
    return current_stream(current_device() if device_index is None else device_index)


def _arg_spec(a, specialized: bool):
    """What Triton specializes a runtime argument on (see the module docstring)."""
    cls = a.__class__
    if cls is int:
        wide = not -(2**31) <= a < 2**31
        return (a == 1) + 2 * (a % 16 == 0) + 4 * wide if specialized else 8 + 4 * wide
    if cls is torch.Tensor or isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    if cls is bool:
        return ("b", a)
    return cls


def runtime_arg_names(fn) -> list[str]:
    """Names of a Triton kernel's runtime (non-constexpr) parameters in order, compiled or interpreted."""
    params = getattr(fn, "params", None)
    if params is not None:
        return [p.name for p in params if not p.is_constexpr]
    sig = inspect.signature(fn.fn)  # the interpreter's function keeps no parsed parameters
    return [n for n, p in sig.parameters.items() if "constexpr" not in str(p.annotation)]


_RUNTIME_KNOBS = getattr(getattr(triton, "knobs", None), "runtime", None)


def _hooks_active() -> bool:
    """True when a launch hook is registered (a profiler): then launches go through Triton's own runner."""
    rt = _RUNTIME_KNOBS
    for name in ("launch_enter_hook", "launch_exit_hook"):
        h = getattr(rt, name, None)
        if h is not None and (not hasattr(h, "calls") or h.calls):
            return True
    return False


def _launch_entry(kernel):
    """``(launch, leading_args)``: the C entry point of a compiled kernel's launcher and the arguments it takes
    before the kernel's own (cooperative-grid and PDL flags, no scratch buffers, the packed metadata, no launch
    metadata or hooks), when the launch needs no scratch memory (Triton 3.6's ``CudaLauncher``, whose Python
    ``__call__`` would only allocate scratch before calling it); None otherwise."""
    run = getattr(kernel, "run", None)
    launch = getattr(run, "launch", None)
    if launch is None or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
        return None
    return launch, (run.launch_cooperative_grid, run.launch_pdl, None, None, kernel.packed_metadata, None, None, None)


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
        return (tuple(kwargs.items()), *map(_arg_spec, args, self.specialized))

    def bind(self, fixed: dict, kwargs, varying) -> BoundLaunch:
        """A :class:`BoundLaunch` of this kernel: runtime arguments ``fixed`` by name, the names in ``varying``
        supplied at each call, ``kwargs`` its constexprs and options."""
        return BoundLaunch(self, fixed, kwargs, varying)

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
            _run_compiled(kernel, grid3, args, self.constexprs_of(kwargs))
            return kernel

        return launch

    def constexprs_of(self, kwargs) -> tuple:
        return tuple(kwargs.get(n, self.defaults[n]) for n in self.constexpr_names)


def _run_compiled(kernel, grid3, args, constexprs, device_index=None) -> None:
    """Launch an already compiled kernel (Triton 3.6: straight through its launcher, unless a hook is active)."""
    if _DIRECT_RUN and not _hooks_active():
        kernel.run(*grid3, _current_stream(device_index), kernel.function, kernel.packed_metadata, None, None, None,
                   *args, *constexprs)
    else:
        kernel[grid3](*args, *constexprs)


class BoundLaunch:
    """Repeated launches of one kernel whose runtime arguments change only at the names ``varying``: a decode step
    launches the same kernel with the same pools and constants and only a new query, output and tail.

    ``bound(grid, *values)`` launches with ``values`` for the ``varying`` names, in that order. Only those values are
    checked against the specialization of the kernel compiled on the first call (the fixed arguments cannot change);
    any difference goes through :class:`CachedLauncher`'s full key (compiling if needed). The owner makes a new one
    when a fixed argument changes (new pools, new constants). Every runtime parameter must be fixed or varying, and
    each varying one keeps its kind from call to call (a tensor stays a tensor, an int an int)."""

    def __init__(self, launcher: CachedLauncher, fixed: dict, kwargs, varying):
        names = runtime_arg_names(launcher.fn)
        missing = [n for n in names if n not in fixed and n not in varying]
        unknown = [n for n in (*fixed, *varying) if n not in names]
        if missing or unknown:
            raise ValueError(f"BoundLaunch: parameters neither fixed nor varying {missing}, not parameters {unknown}")
        self.launcher = launcher
        self.template = [fixed.get(n) for n in names]
        self.kwargs = dict(kwargs)
        self.varying = tuple(names.index(n) for n in varying)
        self.var_specialized = [launcher.specialized[i] for i in self.varying] if launcher.ok else []
        self.constexprs = launcher.constexprs_of(kwargs) if launcher.ok else ()
        self.kernel = None
        self.entry = None
        self.var_spec = None
        self.addresses: list = []  # the template with each tensor replaced by its address (the template keeps them alive)

    def __call__(self, grid, *values, device_index=None):
        if self.kernel is not None:
            tensors = self._tensors(values)
            try:
                addresses = [t.data_ptr() for t in tensors]  # passed as ints (see the module docstring)
            except AttributeError:  # a varying value that was a tensor is not one now: the keyed launch decides
                addresses = None
            if addresses is not None and self._matches(values, tensors, addresses):
                args = self.addresses.copy()
                for i, v in zip(self.varying, values):
                    args[i] = v
                for i, a in zip(self.tensor_slots, addresses):
                    args[i] = a
                grid3 = tuple(grid) + (1,) * (3 - len(grid))
                if self.entry is not None and not _hooks_active():
                    launch, leading = self.entry
                    launch(*grid3, _current_stream(device_index), self.kernel.function, *leading, *args,
                           *self.constexprs)
                else:
                    _run_compiled(self.kernel, grid3, args, self.constexprs, device_index)
                return
        args = self.template.copy()
        for i, v in zip(self.varying, values):
            args[i] = v
        kernel = self.launcher[grid](*args, **self.kwargs)  # compiles if needed
        if kernel is not None and hasattr(kernel, "packed_metadata") and self.launcher.ok:
            self._remember(kernel, values)

    def _remember(self, kernel, values) -> None:
        """Keep ``kernel`` for ``values``' specialization: which varying values are tensors, specialized ints (kept
        as they are: they decide the specialization) and other ints (only their 32/64-bit range matters)."""
        self.kernel = kernel
        self.entry = _launch_entry(kernel) if _DIRECT_RUN else None
        self.addresses = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in self.template]
        kinds = ["t" if isinstance(v, torch.Tensor) else "s" if sp else "u"
                 for v, sp in zip(values, self.var_specialized)]
        pos = {k: [j for j, kind in enumerate(kinds) if kind == k] for k in "tsu"}
        self.tensor_slots = [self.varying[j] for j in pos["t"]]
        self._tensors = _picker(pos["t"])
        self._spec_ints = _picker(pos["s"])
        self._free_ints = _picker(pos["u"])
        tensors = self._tensors(values)
        self.var_spec = ([t.dtype for t in tensors], [t.data_ptr() & 15 == 0 for t in tensors],
                         self._spec_ints(values))

    def _matches(self, values, tensors, addresses) -> bool:
        """True when ``values`` (whose tensors and their addresses are given) have the specialization of the kept
        kernel: the same tensor dtypes and 16-byte alignment, the same specialized ints (equal values: strides rarely
        change) and 32-bit other ints; else the keyed launch decides (and a differing specialized int may well map
        to the same kernel there)."""
        dtypes, aligned, spec_ints = self.var_spec
        if (self._spec_ints(values) != spec_ints or [a & 15 == 0 for a in addresses] != aligned
                or [t.dtype for t in tensors] != dtypes):
            return False
        free = self._free_ints(values)
        return not free or (min(free) >= -(2**31) and max(free) < 2**31)


def _picker(positions):
    """``f(values) -> tuple`` of ``values`` at ``positions`` (C-speed itemgetter; always a tuple)."""
    if not positions:
        return lambda values: ()
    if len(positions) == 1:
        j = positions[0]
        return lambda values: (values[j],)
    return operator.itemgetter(*positions)


def programs_per_sm(n_regs: int, shared: int, num_warps: int, regs_per_sm: int = 65536,
                    smem_per_sm: int = 233472, threads_per_sm: int = 2048) -> int:
    """Programs (blocks) of a kernel one multiprocessor holds at once, by the CUDA occupancy rules: registers are
    allocated per warp in units of 256 from each of the four schedulers' quarter of the register file, 1 KiB of
    shared memory is reserved per block, at most ``threads_per_sm`` threads and 32 blocks."""
    per_warp = -(-n_regs * 32 // 256) * 256
    by_regs = 4 * ((regs_per_sm // 4) // max(per_warp, 1)) // num_warps
    by_smem = smem_per_sm // (shared + 1024)
    by_threads = threads_per_sm // (32 * num_warps)
    return max(1, min(by_regs, by_smem, by_threads, 32))


def resident_per_sm(kernel, device_index: int) -> int:
    """:func:`programs_per_sm` of a compiled Triton ``kernel`` on CUDA device ``device_index``."""
    props = torch.cuda.get_device_properties(device_index)
    return programs_per_sm(kernel.n_regs, kernel.metadata.shared, kernel.metadata.num_warps,
                           getattr(props, "regs_per_multiprocessor", 65536),
                           getattr(props, "shared_memory_per_multiprocessor", 233472),
                           props.max_threads_per_multi_processor)
