"""kernels/_launch.py: the cached compiled-kernel launch takes the same arguments as ``fn[grid](...)`` and falls back
to the normal launch for any specialization it has not seen (checked here with a stand-in for a Triton kernel; the
real kernels go through it in tests/gpu)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hf_turbo.kernels import _launch
from hf_turbo.kernels._launch import CachedLauncher


class FakeCompiled:
    packed_metadata = "meta"
    function = "fn"

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):  # Triton's runner for a compiled kernel
        return lambda *args: self.log.append(("compiled", grid, args))

    def run(self, gx, gy, gz, stream, function, meta, launch_metadata, enter_hook, exit_hook, *args):
        assert (function, meta, launch_metadata, enter_hook, exit_hook) == ("fn", "meta", None, None, None)
        self.log.append(("compiled", (gx, gy, gz), args, stream))


class FakeJit:
    """Parameters: x (tensor), n (specialized int), m (not specialized int), BLOCK (constexpr, default 16)."""

    def __init__(self):
        p = lambda name, c=False, nospec=False, default=None: SimpleNamespace(  # noqa: E731
            name=name, is_constexpr=c, do_not_specialize=nospec, default=default)
        self.params = [p("x"), p("n"), p("m", nospec=True), p("BLOCK", c=True, default=16)]
        self.arg_names = [q.name for q in self.params]
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return FakeCompiled(self.log)

        return run


@pytest.mark.parametrize("direct", [False, True])
def test_cached_launch_reuses_only_the_same_specialization(direct, monkeypatch):
    """Both launch routes of a cached kernel: Triton's runner, and (Triton 3.6) the compiled launcher directly."""
    monkeypatch.setattr(_launch, "_DIRECT_RUN", direct)
    monkeypatch.setattr(_launch, "_current_stream", lambda device_index=None: 7)
    fn = FakeJit()
    launch = CachedLauncher(fn)
    x = torch.zeros(64)
    launch[(4,)](x, 32, 7, BLOCK=32, num_warps=4)
    assert fn.log[-1][0] == "jit"
    launch[(5, 2)](x, 48, 9, BLOCK=32, num_warps=4)  # same key: n % 16 == 0, m not specialized
    # grid padded to 3, constexpr appended; the direct route also passes the current stream
    assert fn.log[-1][:3] == ("compiled", (5, 2, 1), (x, 48, 9, 32))
    assert fn.log[-1][3:] == ((7,) if direct else ())
    launch[(5,)](x, 48, 9, num_warps=4)  # BLOCK left at its default: a different key
    assert fn.log[-1][0] == "jit"
    launch[(5,)](x, 48, 9, num_warps=4)
    assert fn.log[-1][:3] == ("compiled", (5, 1, 1), (x, 48, 9, 16))
    for args in ((x, 33, 9), (x, 1, 9), (x[1:], 48, 9), (x.double(), 48, 9)):  # divisibility, ==1, alignment, dtype
        n = len(fn.log)
        launch[(5,)](*args, BLOCK=32, num_warps=4)
        assert fn.log[n][0] == "jit", args
    n = len(fn.log)
    launch[(5,)](x, 48, 9, BLOCK=32, num_warps=8)  # launch options are part of the key
    assert fn.log[n][0] == "jit"


def test_interpreted_or_unknown_kernels_use_the_normal_launch():
    calls = []

    class Plain:  # no .params: e.g. Triton's interpreter
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append(grid)

    launch = CachedLauncher(Plain())
    launch[(2,)](1, 2)
    launch[(2,)](1, 2)
    assert calls == [(2,), (2,)]


@pytest.mark.parametrize("direct", [False, True])
def test_bound_launch_checks_only_the_varying_arguments(direct, monkeypatch):
    """BoundLaunch: fixed arguments bound once; each call supplies the varying ones, launched through the compiled
    kernel while their specialization matches the first call's, and through the keyed launch when it does not."""
    monkeypatch.setattr(_launch, "_DIRECT_RUN", direct)
    monkeypatch.setattr(_launch, "_current_stream", lambda device_index=None: 7)
    fn = FakeJit()
    launcher = CachedLauncher(fn)
    x, y = torch.zeros(64), torch.zeros(32)
    bound = launcher.bind({"n": 32}, {"BLOCK": 32, "num_warps": 4}, varying=("x", "m"))
    bound((4,), x, 5)  # first call: compiles (keyed launch)
    assert fn.log[-1] == ("jit", (4,), (x, 32, 5), {"BLOCK": 32, "num_warps": 4})
    bound((6, 2), y, 9)  # same specialization (aligned float tensor, unspecialized int): the compiled kernel
    assert fn.log[-1][:3] == ("compiled", (6, 2, 1), (y, 32, 9, 32))
    n = len(fn.log)
    bound((6,), x[1:], 9)  # misaligned: back to the keyed launch, which compiles that specialization
    assert fn.log[n][0] == "jit" and fn.log[n][2][0].data_ptr() == x[1:].data_ptr()
    xd = x.double()
    bound((6,), xd, 9)  # another dtype: keyed launch again
    assert fn.log[-1][0] == "jit"
    bound((6,), xd, 10)  # the bound launch follows the last specialization it saw: compiled again
    assert fn.log[-1][:3] == ("compiled", (6, 1, 1), (xd, 32, 10, 32))


def test_bound_launch_names_every_parameter():
    """A runtime parameter left out, or a name the kernel does not have, is refused when binding."""
    launcher = CachedLauncher(FakeJit())
    with pytest.raises(ValueError, match=r"neither fixed nor varying \['n'\]"):
        launcher.bind({}, {}, varying=("x", "m"))
    with pytest.raises(ValueError, match=r"not parameters \['k'\]"):
        launcher.bind({"n": 1, "k": 2}, {}, varying=("x", "m"))
