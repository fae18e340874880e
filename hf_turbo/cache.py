"""TurboQuantCache: a progressive-quantized, head-wise mixed-precision KV cache for transformers.

Per layer (:class:`TurboLayer`, a ``DynamicLayer``):

* new K/V tokens go to an FP16 buffer (the model's dtype); every full block of ``block_size`` (64) tokens goes
  through BPQ — INT8 per (head, block), then ``bits``-bit codes with integer scale/zero — into block pools; the
  remainder stays in the buffer. Flushes happen a whole block at a time, never per token. The buffer lives in a
  tensor with room for ``residual_length + block_size`` tokens, so a decode step writes its token in place (one copy
  per K and V, K smoothing's subtraction fused into the K copy) instead of concatenating a new buffer. With
  ``residual_length`` R > 0 the newest R tokens are never flushed (KIVI's residual): blocks go only once R + 64 wait.
* heads are split by priority (gap x std, :mod:`hf_turbo.quant.priority`): the ``n_low`` lowest go to ``low_bits``
  (INT2), the rest to ``bits`` (INT4). Priorities come from calibration (``config.turbo_config["priorities"]``) or,
  without one, from the first prefill's keys (online). Each bit-width has its own pool, so no kernel branches on it.
* pools (one per bit-width ``b`` with ``Hb`` heads), capacity doubling as blocks arrive::

      k_codes, v_codes  uint8   [B, Hb, cap, block_size, D * b / 8]   packed codes (quant/bpq.py layout)
      k_scale, v_scale  float32 [B, Hb, cap]                          stage-1 scales (amax / 119)
      k_s2, k_zero      uint8 / int8 [B, Hb, cap, G]                  stage-2 parameters, G = D (K per channel)
      v_s2, v_zero      uint8 / int8 [B, Hb, cap, G]                  G = block_size (V per token)

Hand-off to attention: the attention function never sees the cache, so :meth:`TurboLayer.update` attaches itself
to the tensors it returns (``key.turbo_layer``). When the model runs ``attn_implementation="turbo"`` (read live from
the model config) those tensors are zero-stride placeholders of the right shape and the "turbo" function reads the
compressed state; for any other attention they are the real K/V of the step (:meth:`TurboLayer.step_kv`: blocks
compressed before the step, dequantized, then the FP16 tail), so SDPA or eager stay correct and see what "turbo" sees.

K smoothing (``TurboConfig.k_smooth``): the layer keeps ``k_mean`` (mu, ``[B, H, 1, D]``, the channel mean of the first
keys it was given, :func:`~hf_turbo.quant.attention.key_mean`) and stores ``k - mu`` everywhere (pools, buffer, this
step's tail), which the turbo attention reads as is: exact, since q.(k - mu) = q.k - q.mu is a constant per query
row. mu is added back in :meth:`TurboLayer.step_kv` and :meth:`TurboLayer.dequantized`, so other readers and tools
see the original keys.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import ops
from .config import TurboConfig
from .quant.attention import KVSegment, int8_segments, key_mean
from .quant.bpq import (
    dequantize_int8,
    pack_bits,
    quantize_int8_blocks,
    quantize_stage2,
    rebuild_stage2,
    unpack_bits,
)
from .quant.priority import assign_head_bits, head_priority

_FIELDS = ("codes", "scale", "s2", "zero")
MODEL_SCOPE_NEEDS_PRIORITIES = (
    'TurboConfig.int2_scope="model" ranks the KV heads of all layers at once and needs calibrated priorities for '
    "every layer up front (TurboConfig.priorities, model.config.turbo_config from `hf-turbo calibrate`, or "
    "apply_calibration): online priorities are computed layer by layer at prefill and cannot be ranked model-wide. "
    'Calibrate first, or use int2_scope="layer"'
)


def validate_kv(name: str, x: torch.Tensor, *, check_finite: bool = True) -> None:
    """Raise a clear error unless ``x`` is a finite floating ``[B, H, T, D]`` tensor with T > 0."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape [batch, kv_heads, tokens, head_dim], got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): batch, heads and tokens must be > 0")
    if x.shape[-1] % 16:
        raise ValueError(f"{name}: head_dim must be a multiple of 16 (64, 96, 128, 256), got {x.shape[-1]}")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf: the cache refuses to quantize non-finite values")


def check_flushed_finite(layers, *, name_layers: bool = False) -> None:
    """Raise if a block that any of ``layers`` compressed since its last check held NaN or Inf, and clear their
    flags (``TurboLayer._flushed_finite``, recorded on the device at each flush): all flags in one device sync;
    none when nothing was flushed. ``name_layers``: the error names the failing layers by their index in
    ``layers``."""
    pending = [(i, layer._flushed_finite) for i, layer in enumerate(layers)
               if getattr(layer, "_flushed_finite", None) is not None]
    if not pending:
        return
    device = pending[0][1].device  # layers may live on several devices (device_map): one stack on the first
    ok = torch.stack([flag.to(device) for _, flag in pending])
    for i, _ in pending:
        layers[i]._flushed_finite = None
    if not bool(ok.all()):
        bad = [i for (i, _), good in zip(pending, ok.tolist()) if not good]
        where = f" of layer(s) {bad}" if name_layers else ""
        raise ValueError(
            f"key/value states{where} contain NaN or Inf: the cache refuses to quantize non-finite values (found in "
            "blocks compressed since the last check)"
        )


def _buffer_view(store: str, doc: str) -> property:
    """A property showing the first ``_buf_len`` tokens of the storage attribute ``store`` (TurboLayer's FP16
    buffer); assigning a tensor makes it the storage, all of it in use."""

    def get(self):
        self.write_pending()
        storage = getattr(self, store)
        return None if storage is None else storage[:, :, : self._buf_len]

    def put(self, value):
        self.write_pending()
        setattr(self, store, value)
        self._buf_len = 0 if value is None else value.shape[-2]

    return property(get, put, doc=doc)


class TurboLayer(DynamicLayer):
    """One layer of :class:`TurboQuantCache` (see the module docstring for the storage)."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(
        self,
        turbo: TurboConfig | None = None,
        priorities: list[float] | None = None,
        global_heads: int | None = None,
        assigned_bits: list[int] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.turbo = turbo if turbo is not None else TurboConfig()
        self.priorities = priorities
        self.global_heads = global_heads  # the model's KV heads per layer (differs from ours under tensor parallelism)
        # bit-width of each of the model's KV heads of this layer, chosen model-wide by TurboQuantCache
        # (int2_scope="model"); None = choose here from this layer's priorities
        self.assigned_bits = assigned_bits
        self._clear()

    # ------------------------------------------------------------------ state
    def _clear(self) -> None:
        self.cumulative_length = 0
        self.n_blocks = 0
        self.capacity = 0
        self.head_bits: torch.Tensor | None = None  # int64 [H]
        self.groups: dict[int, torch.Tensor] = {}  # bits -> head indices (int64, on device)
        self.pools: dict[int, dict[str, torch.Tensor]] = {}
        # FP16 buffer: the first _buf_len tokens of _buf_k / _buf_v [B, H, room, D] (see buffer_k / _append_buffer)
        self._buf_k: torch.Tensor | None = None
        self._buf_v: torch.Tensor | None = None
        self._buf_len = 0
        # a decode step's tokens counted in _buf_len but not yet written: (key_states, value_states, position in the
        # buffer); the decode kernel writes them while it attends and then clears this (two launches less per layer
        # and token), anything else that reads the buffer writes them first (write_pending)
        self.pending: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self._zero: torch.Tensor | None = None  # 0-d zero behind the placeholder keys/values
        self._tail_k: torch.Tensor | None = None  # FP16 tokens from block `blocks_before` on, for this step
        self._tail_v: torch.Tensor | None = None
        self.blocks_before = 0
        # device bool: every block flushed since the last check was finite (checked without a device sync per flush;
        # see check_flushed_finite)
        self._flushed_finite: torch.Tensor | None = None
        self.k_mean: torch.Tensor | None = None  # K smoothing: mu [B, H, 1, D] subtracted from every stored key
        # one object per forward pass (set by TurboQuantCache.update): lets per-forward work on the attention mask
        # be done by the first layer only (hf_turbo.attention); None when the layer is updated on its own
        self.step_token: object | None = None
        self._storage_changed()

    def _storage_changed(self) -> None:
        """Forget the kernels' host-side state (head maps, launch plans holding the pools): called whenever the head
        groups or any pool tensor are replaced, the one place that state is invalidated."""
        self.kernel_cache: dict[str, Any] = {}

    buffer_k = _buffer_view("_buf_k", "The FP16 buffer's keys ``[B, H, T_buf, D]`` (a view of the buffer storage; K "
                            "smoothing: ``k - mu``). Assigning a tensor makes it the storage.")
    buffer_v = _buffer_view("_buf_v", "The FP16 buffer's values ``[B, H, T_buf, D]`` (a view of the buffer storage).")

    def _append_buffer(self, key_states: torch.Tensor, value_states: torch.Tensor, defer: bool = False) -> None:
        """Write ``key_states`` (minus mu under K smoothing) and ``value_states`` ``[B, H, T, D]`` after the buffer's
        tokens, in place when the storage has room (a decode step between flushes), else into new storage with room
        for ``residual_length + block_size`` tokens. Views of the buffer taken before keep their tokens: writes only
        go past them, and new storage leaves the old one untouched.

        ``defer``: when the tokens fit in place, only count them and keep them as :attr:`pending` (the decode kernel
        writes them; :meth:`write_pending` does for every other reader)."""
        self.write_pending()
        n, t = self._buf_len, key_states.shape[-2]
        if self._buf_k is None or self._buf_k.shape[-2] < n + t:
            self._new_buffer(self.buffer_k, self.buffer_v, t)
        elif defer:
            self.pending = (key_states, value_states, n)
            self._buf_len = n + t
            return
        self._write_buffer(key_states, value_states, n)
        self._buf_len = n + t

    def _write_buffer(self, key_states: torch.Tensor, value_states: torch.Tensor, n: int) -> None:
        """Store ``key_states`` (minus mu under K smoothing) and ``value_states`` at buffer positions ``n ..``."""
        t = key_states.shape[-2]
        if self.k_mean is not None:
            torch.sub(key_states, self.k_mean, out=self._buf_k.narrow(2, n, t))
        else:
            self._buf_k.narrow(2, n, t).copy_(key_states)
        self._buf_v.narrow(2, n, t).copy_(value_states)

    def write_pending(self) -> None:
        """Write the :attr:`pending` tokens into the buffer storage (nothing to do without them)."""
        pending = self.pending
        if pending is not None:
            self.pending = None
            self._write_buffer(*pending)

    def _new_buffer(self, keep_k: torch.Tensor, keep_v: torch.Tensor, extra: int) -> None:
        """Make ``keep_k, keep_v [B, H, n, D]`` the buffer, copied into new storage with room for ``extra`` more
        tokens and at least ``residual_length + block_size`` in all (the old storage is left as it was)."""
        n = keep_k.shape[-2]
        room = max(n + extra, self.turbo.residual_length + self.turbo.block_size)
        shape = (self.batch, self.num_heads, room, self.head_dim)
        self._buf_k, self._buf_v = keep_k.new_empty(shape), keep_v.new_empty(shape)
        self._buf_k[:, :, :n] = keep_k
        self._buf_v[:, :, :n] = keep_v
        self._buf_len = n

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype
        # compared per step with get_device() (cheaper than torch.device): the CUDA index, -1 for CPU (and others)
        self._device_index = key_states.get_device()
        self.batch, self.num_heads, _, self.head_dim = key_states.shape
        if self.turbo.quantize:
            self._choose_head_bits(key_states, value_states)
            self.buffer_k = key_states[:, :, :0].clone()
            self.buffer_v = value_states[:, :, :0].clone()
            if self.turbo.k_smooth:
                # mu = mean over the first update's tokens (left padding included; a sample of 256-511 evenly spaced
                # ones for long prompts, quant.attention.key_mean). Any fixed mu keeps attention exact (a constant
                # shift of each query row's scores); its value only decides how well the shifted keys quantize, and a
                # few padding rows barely move a channel's constant offset.
                self.k_mean = key_mean(key_states)

    def _choose_head_bits(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Bit-width per local KV head: calibrated priorities if given, else gap x std of this prefill (online).

        Under tensor parallelism (this layer holds ``H / world`` of the model's ``H`` KV heads) the assignment is
        made over all ``H`` heads — calibrated priorities are global, online ones are all-gathered — and then
        sliced, so a sharded model stores each head exactly as the unsharded one does. With
        ``int2_scope="model"`` the bits were chosen over all layers by :class:`TurboQuantCache` (``assigned_bits``)
        and are only sliced here."""
        t = self.turbo
        h = self.num_heads
        rank, world = tensor_parallel_shard(h, self.global_heads)
        h_all = h * world
        if self.assigned_bits is not None:
            bits = torch.as_tensor(self.assigned_bits, dtype=torch.int64)
            if bits.numel() != h_all:
                raise ValueError(f"assigned bits for this layer cover {bits.numel()} heads but the model has {h_all}")
            self._set_head_bits(bits[rank * h : (rank + 1) * h])
            return
        if t.int2_scope == "model" and _wants_low_heads(t):
            raise ValueError(MODEL_SCOPE_NEEDS_PRIORITIES)
        n_low = t.num_low_heads(h_all)
        if self.priorities is not None:
            pr = torch.as_tensor(self.priorities, dtype=torch.float32)
            if pr.numel() != h_all:
                raise ValueError(f"priorities for this layer have {pr.numel()} heads but the model has {h_all} KV heads")
        elif n_low and t.bits != t.low_bits:
            pr = head_priority(k)
            if t.priority_source == "kv":
                pr = pr + head_priority(v)
            if world > 1:
                parts = [torch.empty_like(pr) for _ in range(world)]
                torch.distributed.all_gather(parts, pr.contiguous())
                pr = torch.cat(parts)
        else:
            pr = torch.zeros(h_all)
        self._set_head_bits(assign_head_bits(pr.cpu(), n_low, t.bits, t.low_bits)[rank * h : (rank + 1) * h])

    def _set_head_bits(self, head_bits: torch.Tensor) -> None:
        self.head_bits = head_bits
        self.groups = {
            b: torch.nonzero(self.head_bits == b).flatten().to(self.device)
            for b in sorted(set(self.head_bits.tolist()), reverse=True)
        }
        self._storage_changed()

    # ------------------------------------------------------------------ pools
    def _group_dims(self, axis: str) -> int:
        return self.head_dim if axis == "channel" else self.turbo.block_size

    def _alloc(self, b: int, hb: int, cap: int) -> dict[str, torch.Tensor]:
        bs, d, dev = self.turbo.block_size, self.head_dim, self.device
        pool = {}
        for kv, axis in (("k", self.turbo.k_axis), ("v", self.turbo.v_axis)):
            g = self._group_dims(axis)
            pool[f"{kv}_codes"] = torch.zeros(self.batch, hb, cap, bs, d * b // 8, dtype=torch.uint8, device=dev)
            pool[f"{kv}_scale"] = torch.zeros(self.batch, hb, cap, dtype=torch.float32, device=dev)
            pool[f"{kv}_s2"] = torch.zeros(self.batch, hb, cap, g, dtype=torch.uint8, device=dev)
            pool[f"{kv}_zero"] = torch.zeros(self.batch, hb, cap, g, dtype=torch.int8, device=dev)
        return pool

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        cap = max(needed, 2 * self.capacity, 4)
        for b, idx in self.groups.items():
            new = self._alloc(b, idx.numel(), cap)
            old = self.pools.get(b)
            if old is not None:
                for name, tensor in old.items():
                    new[name][:, :, : self.n_blocks] = tensor[:, :, : self.n_blocks]
            self.pools[b] = new
        self.capacity = cap
        self._storage_changed()

    def _compress(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """BPQ ``k, v [B, H, nb * block_size, D]`` into the pools (blocks ``n_blocks ..``)."""
        bs = self.turbo.block_size
        nb = k.shape[-2] // bs
        # recorded on the device, checked before anything reads the new blocks (check_flushed_finite): a host check
        # here would stall every layer's flush on a device sync
        ok = torch.isfinite(k).all() & torch.isfinite(v).all()
        self._flushed_finite = ok if self._flushed_finite is None else self._flushed_finite & ok
        self._ensure_capacity(self.n_blocks + nb)
        backend = ops.kernel_backend(k.device)
        if backend is not None:
            backend.compress_into(self, k, v)  # one launch per layer per flush, writes the pools in place
            self.n_blocks += nb
            return
        sl = slice(self.n_blocks, self.n_blocks + nb)
        for kv, x, axis in (("k", k, self.turbo.k_axis), ("v", v, self.turbo.v_axis)):
            x8, scale = quantize_int8_blocks(x, bs)  # [B,H,T,D], [B,H,nb]
            x8 = x8.reshape(self.batch, self.num_heads, nb, bs, self.head_dim)
            for b, idx in self.groups.items():
                st = quantize_stage2(x8[:, idx], b, axis)
                pool = self.pools[b]
                pool[f"{kv}_codes"][:, :, sl] = pack_bits(st.codes, b)
                pool[f"{kv}_scale"][:, :, sl] = scale[:, idx]
                pool[f"{kv}_s2"][:, :, sl] = st.scale
                pool[f"{kv}_zero"][:, :, sl] = st.zero
        self.n_blocks += nb

    def check_flushed_finite(self) -> None:
        """Raise if a block flushed since the last check held NaN or Inf (:func:`check_flushed_finite`; nothing to do,
        and no device sync, when no block was flushed since). Runs before the compressed blocks are read: at the next
        update (for a whole :class:`TurboQuantCache` once per forward pass, for all layers together) and before any
        dequantized read. Until then the flushed tokens are only attended from the FP16 tail they came from."""
        if self._flushed_finite is not None:
            check_flushed_finite([self])

    def rebuild_int8(self, kv: str, n_blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed blocks ``[0, n_blocks)`` rebuilt to INT8 in head order.

        Returns ``(x8 int8 [B, H, n_blocks * block_size, D], scale float32 [B, H, n_blocks])``.
        """
        self.check_flushed_finite()
        n = self.n_blocks if n_blocks is None else n_blocks
        bs, d = self.turbo.block_size, self.head_dim
        axis = self.turbo.k_axis if kv == "k" else self.turbo.v_axis
        x8 = torch.zeros(self.batch, self.num_heads, n, bs, d, dtype=torch.int8, device=self.device)
        scale = torch.zeros(self.batch, self.num_heads, n, dtype=torch.float32, device=self.device)
        for b, idx in self.groups.items() if n else ():  # no pools exist before the first flush
            pool = self.pools[b]
            codes = unpack_bits(pool[f"{kv}_codes"][:, :, :n], b)
            x8[:, idx] = rebuild_stage2(codes, pool[f"{kv}_s2"][:, :, :n], pool[f"{kv}_zero"][:, :, :n], axis)
            scale[:, idx] = pool[f"{kv}_scale"][:, :, :n]
        return x8.reshape(self.batch, self.num_heads, n * bs, d), scale

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached tokens as ``[B, H, S, D]`` in the model's dtype (compressed blocks dequantized + buffer)."""
        if not self.turbo.quantize:
            return self.keys, self.values
        return self._read(self.n_blocks, self.buffer_k, self.buffer_v, original=True)

    def _read(self, n_blocks: int, tail_k: torch.Tensor, tail_v: torch.Tensor, *, original: bool):
        """Blocks ``[0, n_blocks)`` dequantized, then ``tail_k, tail_v``, as ``[B, H, S, D]`` in the model's dtype.
        ``original``: add the K-smoothing mean back (the keys as given); else the stored form ``k - mu``."""
        out = []
        for kv, tail in (("k", tail_k), ("v", tail_v)):
            x8, scale = self.rebuild_int8(kv, n_blocks)
            deq = dequantize_int8(x8, scale, self.turbo.block_size)
            if original and kv == "k" and self.k_mean is not None:
                out.append((torch.cat([deq, tail.float()], dim=-2) + self.k_mean.float()).to(self.dtype))
            else:
                out.append(torch.cat([deq.to(self.dtype), tail], dim=-2))
        return out[0], out[1]

    # ------------------------------------------------------------------ the transformers API
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, turbo_reader: bool = False,
        step_token: object | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states, value_states [B, H, T, D]``; return what the attention function reads."""
        self.step_token = step_token
        self.check_flushed_finite()
        if not self._is_next_step(key_states, value_states):  # the full checks (clear errors) off the common path
            self._check_kv(key_states, value_states)
        # NaN/Inf checks cost a device sync on CUDA: there they run on prefills and on every flushed block (so each
        # token is checked before it is compressed), not on every single decode token
        t = key_states.shape[-2]
        if self.turbo.quantize and (t > 1 or key_states.is_cpu):
            validate_kv("key_states", key_states)
            validate_kv("value_states", value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            key_states, value_states = key_states.to(self.dtype), value_states.to(self.dtype)
        self.cumulative_length += t

        if not self.turbo.quantize:
            keys, values = super().update(key_states, value_states)
            keys.turbo_layer = self
            return keys, values

        self.blocks_before = self.n_blocks
        bs, residual = self.turbo.block_size, self.turbo.residual_length
        # a step that flushes nothing, read by kernels that write the step's tokens themselves (they said so in
        # kernel_cache, see hf_turbo.kernels.decode), leaves them pending: no copy launches here
        defer = turbo_reader and self._buf_len + t - residual < bs and self.kernel_cache.get("writes_pending", False)
        self._append_buffer(key_states, value_states, defer)  # K smoothing: the buffer, pools and tail hold k - mu
        tail_k, tail_v = self._buf_k[:, :, : self._buf_len], self._buf_v[:, :, : self._buf_len]  # pending included
        n_full = max(self._buf_len - residual, 0) // bs  # the newest residual_length stay
        if n_full:
            self._compress(tail_k[:, :, : n_full * bs], tail_v[:, :, : n_full * bs])
            # copy the remainder into storage with room (a view would keep the whole, possibly long, tail alive)
            self._new_buffer(tail_k[:, :, n_full * bs :], tail_v[:, :, n_full * bs :], 1)
        self._tail_k, self._tail_v = tail_k, tail_v

        if turbo_reader:
            # placeholders with the right shape and no memory: a cached 0-d zero expanded (no launch per step)
            shape = (self.batch, self.num_heads, self.cumulative_length, self.head_dim)
            zero = self._zero  # in the layer's dtype and on its device, like key_states here
            if zero is None:
                zero = self._zero = key_states.new_zeros(())
            keys, values = zero.expand(shape), zero.expand(shape)
        else:
            keys, values = self.step_kv()
        keys.turbo_layer = self
        return keys, values

    def _is_next_step(self, k: torch.Tensor, v: torch.Tensor) -> bool:
        """True when ``k, v`` are plainly this cache's next tokens: tensors of its dtype and device and of the same
        ``[B, H, T, D]`` shape with its (B, H, D). Cheap (a decode step's host time counts); anything else goes
        through :meth:`_check_kv`, which raises the clear error or accepts (e.g. a dtype it converts)."""
        if not (self.is_initialized and type(k) is torch.Tensor and type(v) is torch.Tensor):
            return False
        shape = k.shape
        return (k.dtype == self.dtype and v.dtype == self.dtype and shape == v.shape and shape[0] == self.batch
                and shape[1] == self.num_heads and shape[3] == self.head_dim and shape[2] > 0
                and k.get_device() == self._device_index and v.get_device() == self._device_index
                and (k.is_cuda and v.is_cuda if self._device_index >= 0 else k.is_cpu and v.is_cpu))

    def _check_kv(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Raise a clear error unless ``key_states, value_states`` can be appended to this layer."""
        validate_kv("key_states", key_states, check_finite=False)
        validate_kv("value_states", value_states, check_finite=False)
        if key_states.shape != value_states.shape:
            raise ValueError(
                f"key_states {tuple(key_states.shape)} and value_states {tuple(value_states.shape)} differ in shape"
            )
        if value_states.device != key_states.device:
            raise ValueError(f"value_states is on {value_states.device}, but key_states is on {key_states.device}")
        if self.is_initialized:
            expect = (self.batch, self.num_heads, self.head_dim)
            got = (key_states.shape[0], key_states.shape[1], key_states.shape[3])
            if got != expect:
                raise ValueError(f"key_states has (batch, kv_heads, head_dim) = {got}, but this cache holds {expect}")
            if key_states.device != self.device:
                raise ValueError(f"key_states is on {key_states.device}, but this cache lives on {self.device}")

    def step_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What a non-turbo attention reads this step, ``[B, H, S, D]`` in the model's dtype: the blocks compressed
        before this step, dequantized, then the FP16 tail (old buffer + new tokens). The same state the turbo
        attention reads: tokens flushed by this very step are attended in full precision once (like the turbo
        prefill), not through their just-made 4-bit codes. Under K smoothing mu is added back to the keys."""
        self.write_pending()
        return self._read(self.blocks_before, self._tail_k, self._tail_v, original=True)

    def release_step(self) -> None:
        """Drop this step's FP16 tail once attention has read it (the buffer keeps the unflushed part), so that a
        long prefill does not stay resident in FP16 across layers."""
        self._tail_k = self._tail_v = None

    def attention_segments(self) -> list[KVSegment]:
        """Keys/values for the attention of the current step (reference path, see quant/attention.py):
        compressed blocks that existed before this step, rebuilt to INT8, then the FP16 tail (old buffer + new
        tokens), quantized per block on the fly (``buffer_attention="int8"``; values per ``tail_v``) or read as
        FP16."""
        self.write_pending()
        bs = self.turbo.block_size
        segments = []
        if self.blocks_before:
            k8, ks = self.rebuild_int8("k", self.blocks_before)
            v8, vs = self.rebuild_int8("v", self.blocks_before)
            per_tok = functools.partial(torch.repeat_interleave, repeats=bs, dim=-1)
            segments.append(KVSegment(k8, v8, per_tok(ks), per_tok(vs), 0))
        start = self.blocks_before * bs
        if self._tail_k is not None and self._tail_k.shape[-2]:
            if self.turbo.buffer_attention == "int8":
                segments += int8_segments(self._tail_k, self._tail_v, start, bs, tail_v=self.turbo.tail_v_precision)
            else:
                segments.append(KVSegment(self._tail_k, self._tail_v, None, None, start))
        return segments

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget every token (the configuration and calibrated priorities stay)."""
        was_init = self.is_initialized
        self._clear()
        if was_init:
            self.keys = self.keys[:, :, :0] if self.keys is not None and self.keys.dim() == 4 else self.keys
            self.values = self.values[:, :, :0] if self.values is not None and self.values.dim() == 4 else self.values
        self.is_initialized = False

    def _map_batch(self, fn) -> None:
        """Apply ``fn`` (a batch-dim operation) to every per-sequence tensor."""
        if not self.is_initialized:
            return
        if not self.turbo.quantize:
            if self.keys is not None and self.keys.numel():
                self.keys, self.values = fn(self.keys), fn(self.values)
                self.batch = self.keys.shape[0]
            return
        for pool in self.pools.values():
            for name in list(pool):
                pool[name] = fn(pool[name])
        self._storage_changed()
        self.buffer_k, self.buffer_v = fn(self.buffer_k), fn(self.buffer_v)
        if self._tail_k is not None:
            self._tail_k, self._tail_v = fn(self._tail_k), fn(self._tail_v)
        if self.k_mean is not None:
            self.k_mean = fn(self.k_mean)
        self.batch = self.buffer_k.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda x: x[indices.to(x.device) if isinstance(indices, torch.Tensor) else indices, ...])

    def crop(self, tokens_to_remove: int = 0, max_length: int | None = None) -> None:
        """Drop tokens from the end. Negative ``tokens_to_remove`` removes that many; a positive value is the legacy
        absolute length (transformers < 5.18). A block cut in the middle is dequantized back into the buffer."""
        cur = self.cumulative_length
        if max_length is not None:
            tokens_to_remove = max_length
        target = tokens_to_remove if tokens_to_remove > 0 else cur + tokens_to_remove
        if tokens_to_remove == 0 or target >= cur or not self.is_initialized:
            return
        target = max(target, 0)
        if not self.turbo.quantize:
            self.keys, self.values = self.keys[..., :target, :], self.values[..., :target, :]
            self.cumulative_length = target
            return
        bs = self.turbo.block_size
        compressed = self.n_blocks * bs
        if target >= compressed:
            keep = target - compressed
            self.buffer_k, self.buffer_v = self.buffer_k[:, :, :keep].clone(), self.buffer_v[:, :, :keep].clone()
        else:
            keep_blocks, partial = divmod(target, bs)
            k, v = self._read(self.n_blocks, self.buffer_k, self.buffer_v, original=False)  # stored (k - mu) form
            self.buffer_k = k[:, :, keep_blocks * bs : target].clone()
            self.buffer_v = v[:, :, keep_blocks * bs : target].clone()
            self.n_blocks = keep_blocks
        self._tail_k = self._tail_v = None
        self.blocks_before = self.n_blocks
        self.cumulative_length = target
        self._storage_changed()

    # ------------------------------------------------------------------ memory
    def nbytes(self) -> int:
        """Bytes held for this layer's tokens: used pool blocks, scales and zero points, the FP16 buffer and (K
        smoothing) the mean ``k_mean``."""
        if not self.is_initialized:
            return 0
        if not self.turbo.quantize:
            return self.keys.nbytes + self.values.nbytes
        total = self._unpooled_nbytes()
        for pool in self.pools.values():
            for tensor in pool.values():
                total += tensor[:, :, : self.n_blocks].nbytes
        return total

    def _unpooled_nbytes(self) -> int:
        """Bytes outside the pools: the FP16 buffer and (K smoothing) ``k_mean``."""
        mean = self.k_mean.nbytes if self.k_mean is not None else 0
        return self.buffer_k.nbytes + self.buffer_v.nbytes + mean

    def allocated_nbytes(self) -> int:
        """Bytes allocated (pool capacity included)."""
        if not self.is_initialized:
            return 0
        if not self.turbo.quantize:
            return self.nbytes()
        buffer = self._buf_k.nbytes + self._buf_v.nbytes - self.buffer_k.nbytes - self.buffer_v.nbytes  # its room
        return self._unpooled_nbytes() + buffer + sum(t.nbytes for pool in self.pools.values() for t in pool.values())

    def fp16_nbytes(self) -> int:
        """Bytes an FP16 cache would hold for the same tokens."""
        if not self.is_initialized:
            return 0
        return 2 * self.batch * self.num_heads * self.cumulative_length * self.head_dim * 2


def _wants_low_heads(t: TurboConfig) -> bool:
    """True when ``t`` sends some heads to a lower bit-width (so the heads must be ranked)."""
    count = t.int2_heads if t.int2_heads is not None else t.int2_fraction
    return t.bits != t.low_bits and count > 0


def tensor_parallel_shard(local_heads: int, global_heads: int | None) -> tuple[int, int]:
    """``(rank, world)`` of this process's head shard: ``(0, 1)`` unless the layer holds ``global_heads / world``
    heads of a tensor-parallel model (heads split contiguously by rank over the default process group)."""
    if global_heads is None or local_heads == global_heads:
        return 0, 1
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and local_heads * dist.get_world_size() == global_heads:
        return dist.get_rank(), dist.get_world_size()
    raise ValueError(
        f"key_states has {local_heads} KV heads but the model config has {global_heads}; a tensor-parallel shard "
        "must hold num_key_value_heads / world_size heads of an initialized torch.distributed group"
    )


def text_config(config: Any) -> Any:
    """The text decoder's config of a model config (itself for text-only models; None stays None)."""
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    return config


def kv_heads(config: Any) -> int:
    """KV heads of a model config (its text decoder's, for multimodal configs)."""
    text = text_config(config)
    return getattr(text, "num_key_value_heads", None) or text.num_attention_heads


def head_dim(config: Any) -> int:
    """Head dim of a model config (its text decoder's, for multimodal configs)."""
    text = text_config(config)
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def resolve_turbo_config(config: Any = None, turbo: TurboConfig | None = None, **overrides: Any) -> TurboConfig:
    """The TurboConfig for a model: explicit ``turbo`` > the model config's ``turbo_config`` entry > defaults,
    then ``overrides``. Calibrated priorities are checked against the model's layer and KV-head counts."""
    if turbo is None:
        saved = getattr(config, "turbo_config", None) if config is not None else None
        if isinstance(saved, TurboConfig):
            turbo = saved
        elif isinstance(saved, dict):
            turbo = TurboConfig.from_dict({k: v for k, v in saved.items() if k != "model"})
        else:
            turbo = TurboConfig()
    if overrides:
        turbo = turbo.replace(**overrides)
    text = text_config(config)
    if turbo.priorities is not None and text is not None:
        check_priorities(turbo.priorities, text)
    return turbo


def check_priorities(priorities: Any, config: Any) -> None:
    """Raise unless ``priorities`` is ``[num_hidden_layers][num_key_value_heads]`` for ``config``."""
    layers = config.num_hidden_layers
    heads = kv_heads(config)
    rows = len(priorities)
    cols = {len(r) for r in priorities}
    if rows != layers or cols != {heads}:
        raise ValueError(
            f"priorities have shape [{rows}][{'/'.join(map(str, sorted(cols))) or 0}] but this model needs "
            f"[{layers}][{heads}] (num_hidden_layers x num_key_value_heads): they were calibrated for another model"
        )
    if any(not math.isfinite(float(x)) for r in priorities for x in r):
        raise ValueError("priorities contain NaN or Inf")


class TurboQuantCache(Cache):
    """A ``transformers.Cache`` storing K/V with BPQ in INT4/INT2 blocks plus an FP16 buffer.

    Use a fresh one per ``generate`` call::

        cache = TurboQuantCache(model.config)                     # calibrated priorities if the config has them
        cache = TurboQuantCache(model.config, int2_fraction=0.25) # any TurboConfig field as an override
        model.generate(**inputs, past_key_values=cache)

    Args:
        config: the model's config (layer count, KV heads, ``turbo_config`` with calibrated priorities, and the
            live ``_attn_implementation`` that decides whether placeholders or real K/V are returned). Without it,
            layers are created lazily and real dequantized K/V are always returned.
        turbo: a full :class:`TurboConfig`; default from ``config.turbo_config`` or ``TurboConfig()``.
        **overrides: TurboConfig fields to change.
    """

    def __init__(self, config: Any = None, turbo: TurboConfig | None = None, **overrides: Any):
        self.turbo = resolve_turbo_config(config, turbo, **overrides)
        self._step_token: object | None = None
        self.model_config = config
        text = text_config(config)
        model_scope = self.turbo.quantize and self.turbo.int2_scope == "model" and _wants_low_heads(self.turbo)
        if model_scope and self.turbo.priorities is None:
            raise ValueError(MODEL_SCOPE_NEEDS_PRIORITIES)
        if text is not None:
            pr = self.turbo.priorities
            heads = kv_heads(text)
            # int2_scope="model": the INT2 heads are chosen over all layers here; each layer gets its row
            assigned = self.turbo.head_bits(pr) if model_scope else None
            layers = [
                TurboLayer(self.turbo, priorities=None if pr is None else pr[i], global_heads=heads,
                           assigned_bits=None if assigned is None else assigned[i])
                for i in range(text.num_hidden_layers)
            ]
            super().__init__(layers=layers)
        elif model_scope:
            raise ValueError('TurboConfig.int2_scope="model" needs the model config (TurboQuantCache(model.config))')
        else:
            super().__init__(layer_class_to_replicate=functools.partial(TurboLayer, self.turbo))

    def reader_is_turbo(self) -> bool:
        """True when the model that fills this cache runs the "turbo" attention (checked at every forward pass)."""
        return getattr(self.model_config, "_attn_implementation", None) == "turbo"

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0 or self._step_token is None:  # a new forward pass: its token, its attention reader
            self._step_token = object()
            self._turbo_reader = self.reader_is_turbo()
            self._check_flushed_finite()
        return super().update(key_states, value_states, layer_idx, *args, turbo_reader=self._turbo_reader,
                              step_token=self._step_token, **kwargs)

    def _check_flushed_finite(self) -> None:
        """The finiteness of every layer's blocks flushed by the previous forward pass, in one device sync."""
        check_flushed_finite(self.layers, name_layers=True)

    def nbytes(self) -> int:
        """Bytes held by all layers (codes, scales, zero points, FP16 buffer)."""
        return sum(layer.nbytes() for layer in self.layers)

    def fp16_nbytes(self) -> int:
        """Bytes an FP16 cache would hold for the same tokens."""
        return sum(layer.fp16_nbytes() for layer in self.layers)

    def compression_ratio(self) -> float:
        """FP16 bytes / our bytes for the same tokens (buffer and all metadata included)."""
        own = self.nbytes()
        return self.fp16_nbytes() / own if own else float("nan")

    def memory_report(self) -> dict[str, Any]:
        """A dict for reports: tokens, tokens in compressed blocks (the rest are in the FP16 buffer), bytes, FP16
        bytes, ratio, allocated bytes, head bit-widths per layer, the INT2 scope and the number of low-bit heads per
        layer (this process's heads under tensor parallelism)."""
        head_bits = [None if layer.head_bits is None else layer.head_bits.tolist() for layer in self.layers]
        low = self.turbo.low_bits if self.turbo.bits != self.turbo.low_bits else None
        return {
            "tokens": self.get_seq_length(),
            "compressed_tokens": self.layers[0].n_blocks * self.turbo.block_size if self.layers else 0,
            "kv_bytes": self.nbytes(),
            "kv_bytes_allocated": sum(layer.allocated_nbytes() for layer in self.layers),
            "fp16_bytes": self.fp16_nbytes(),
            "compression_ratio": self.compression_ratio(),
            "head_bits": head_bits,
            "int2_scope": self.turbo.int2_scope,
            "low_bit_heads_per_layer": [None if b is None else sum(x == low for x in b) for b in head_bits],
        }
