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


class FakeLauncher:
    """Triton 3.6's CudaLauncher as the bound launch uses it: scratch sizes, launch flags and the C entry point."""

    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid = launch_pdl = False

    def __init__(self, log):
        self.log = log

    def launch(self, gx, gy, gz, stream, function, coop, pdl, scratch, profile_scratch, meta, launch_metadata,
               enter_hook, exit_hook, *args):
        assert (function, coop, pdl, scratch, profile_scratch) == ("fn", False, False, None, None)
        assert (meta, launch_metadata, enter_hook, exit_hook) == ("meta", None, None, None)
        self.log.append(("entry", (gx, gy, gz), args, stream))


class FakeCompiledEntry(FakeCompiled):
    def __init__(self, log):
        super().__init__(log)
        self.run = FakeLauncher(log)


class FakeJit:
    """Parameters: x (tensor), n (specialized int), m (not specialized int), BLOCK (constexpr, default 16)."""

    def __init__(self, compiled=FakeCompiled):
        self.compiled = compiled
        p = lambda name, c=False, nospec=False, default=None: SimpleNamespace(  # noqa: E731
            name=name, is_constexpr=c, do_not_specialize=nospec, default=default)
        self.params = [p("x"), p("n"), p("m", nospec=True), p("BLOCK", c=True, default=16)]
        self.arg_names = [q.name for q in self.params]
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return self.compiled(self.log)

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


@pytest.mark.parametrize("direct,entry", [(False, False), (True, False), (True, True)])
def test_bound_launch_checks_only_the_varying_arguments(direct, entry, monkeypatch):
    """BoundLaunch: fixed arguments bound once; each call supplies the varying ones, launched through the compiled
    kernel (tensors passed as their addresses; with ``entry``, straight into the launcher's C entry point) while
    their specialization matches the first call's, and through the keyed launch when it does not."""
    monkeypatch.setattr(_launch, "_DIRECT_RUN", direct)
    monkeypatch.setattr(_launch, "_current_stream", lambda device_index=None: 7)
    fn = FakeJit(FakeCompiledEntry if entry else FakeCompiled)
    done = "entry" if entry else "compiled"
    launcher = CachedLauncher(fn)
    x, y = torch.zeros(64), torch.zeros(32)
    bound = launcher.bind({"n": 32}, {"BLOCK": 32, "num_warps": 4}, varying=("x", "m"))
    bound((4,), x, 5)  # first call: compiles (keyed launch)
    assert fn.log[-1] == ("jit", (4,), (x, 32, 5), {"BLOCK": 32, "num_warps": 4})
    bound((6, 2), y, 9)  # same specialization (aligned float tensor, unspecialized int): the compiled kernel
    assert fn.log[-1][:3] == (done, (6, 2, 1), (y.data_ptr(), 32, 9, 32))
    n = len(fn.log)
    bound((6,), x[1:], 9)  # misaligned: back to the keyed launch, which compiles that specialization
    assert fn.log[n][0] == "jit" and fn.log[n][2][0].data_ptr() == x[1:].data_ptr()
    xd = x.double()
    bound((6,), xd, 9)  # another dtype: keyed launch again
    assert fn.log[-1][0] == "jit"
    bound((6,), xd, 10)  # the bound launch follows the last specialization it saw: compiled again
    assert fn.log[-1][:3] == (done, (6, 1, 1), (xd.data_ptr(), 32, 10, 32))
    n = len(fn.log)
    bound((6,), 5, 10)  # a tensor slot given an int: the keyed launch decides
    assert fn.log[n][0] == "jit"


def test_bound_launch_names_every_parameter():
    """A runtime parameter left out, or a name the kernel does not have, is refused when binding."""
    launcher = CachedLauncher(FakeJit())
    with pytest.raises(ValueError, match=r"neither fixed nor varying \['n'\]"):
        launcher.bind({}, {}, varying=("x", "m"))
    with pytest.raises(ValueError, match=r"not parameters \['k'\]"):
        launcher.bind({"n": 1, "k": 2}, {}, varying=("x", "m"))


def test_programs_per_sm_follows_the_occupancy_rules():
    from hf_turbo.kernels._launch import programs_per_sm

    # the decode kernel as Nsight Compute read it on the H100 (212 registers, 53.5 KiB shared, 4 warps): its block
    # limits were 2 by registers and 4 by shared memory
    assert programs_per_sm(212, 54784, 4) == 2
    assert programs_per_sm(128, 54784, 4) == 4  # shared memory limits next
    assert programs_per_sm(32, 0, 4) == 16  # threads: 2048 / 128
    assert programs_per_sm(16, 0, 1) == 32  # at most 32 blocks


def test_choose_split_fills_whole_waves(monkeypatch):
    import math

    from hf_turbo.kernels import decode

    monkeypatch.setattr(decode, "_sm_count", lambda _: 132)
    monkeypatch.setattr(decode.torch.cuda, "current_device", lambda: 0)

    def cost(pairs, tiles, split, slots=264):
        return math.ceil(pairs * split / slots) * math.ceil(tiles / split)

    # batch 16, 8 KV heads, 32k context (513 tiles): the old rule (4 programs per SM) gave 5 splits, 640 programs,
    # 2.4 waves of 264; the wave model picks a split with no mostly-empty wave
    old = decode.choose_split(16, 8, 513, True, mult=4)
    new = decode.choose_split(16, 8, 513, True, resident=2)
    assert old == 5 and cost(128, 513, new) < cost(128, 513, old)
    assert math.ceil(128 * new / 264) * 264 - 128 * new < 264 // 4  # the last wave is at least 3/4 full
    # batch 1 fills one wave up to the cap; short contexts keep 4 tiles per split; CPU runs one program
    one = decode.choose_split(1, 8, 513, True, resident=2)
    assert 24 <= one <= 32 and 8 * one <= 264
    assert decode.choose_split(1, 8, 20, True, resident=2) == 5
    # batch 64: 512 programs are already ~2 full waves, so no split (and no merge)
    assert decode.choose_split(64, 8, 513, True, resident=2) == 1
    assert decode.choose_split(64, 8, 513, False) == 1
