"""Triton kernels of TurboAttention, installed as ``hf_turbo.kernels`` (source: ``kernels/`` at the repo root).

Contract with :mod:`hf_turbo.ops` (every function computes what the reference in :mod:`hf_turbo.quant` defines):

* ``unavailable_reason(device, allow_interpreter=False) -> str | None``
* ``unsupported(turbo) -> str | None``: a TurboConfig choice the compiled kernels do not compute; ops then runs the
  reference, with a warning, and the functions below raise NotImplementedError (``check_supported``).
* ``compress_into(layer, k, v)``: BPQ of ``k, v [B, H, nb * block_size, D]`` written into ``layer.pools`` at blocks
  ``layer.n_blocks ..`` (the caller then advances ``n_blocks``), like ``TurboLayer._compress``'s reference branch
  (:mod:`.quantize_pack`).
* ``attend_layer(query, layer, *, sm_scale, causal, pad, sliding_window) -> [B, Hq, Sq, D]``: attention over
  ``layer.attention_segments()`` (compressed blocks before this step + the FP16 tail quantized per block on the fly):
  :mod:`.prefill` for query blocks, :mod:`.decode` (GQA heads packed into the MMA rows, split context, LSE merge)
  for short queries; on the GPU with enough (sequence, KV head) pairs and compressed tiles
  (:func:`.decode_mma.walk_choice`), :mod:`.decode_mma` (Gluon: packed codes unpacked straight into the MMA operand
  registers) walks the compressed blocks and :mod:`.decode` adds the FP16 tail and merges.
* ``prefill(query, key, value, turbo, *, sm_scale, causal, pad, sliding_window) -> [B, Hq, Sq, D]``: no-cache path.

``pad`` is None or int32 ``[B]`` leading padding per row (left padding). Outputs are in the query dtype.

The kernels are plain Triton (pointer arithmetic, ``out_dtype=tl.int32`` on int8 dots, no libdevice), so they also
run under ``TRITON_INTERPRET=1`` on CPU tensors; that is for tests, which pass ``allow_interpreter=True``: ops
dispatches to the kernels on CUDA only. The one piece of inline PTX (the decode kernel's unpacking of int32 code
words, :func:`._tiles.word_codes_f16`) has a plain-Triton twin computing the same values, used when interpreted; the
GPU suite checks the compiled path bit for bit against the integer rebuild.
"""

if __name__ == "kernels":
    # Imported as the top-level ``kernels``: Python runs from the repository root, whose kernels/ folder comes first
    # on sys.path. That name belongs to Hugging Face's ``kernels`` distribution, which transformers imports when it is
    # installed; hand the name over to it then (this folder is ``hf_turbo.kernels``). Without it the module stays
    # empty: transformers finds no version and treats ``kernels`` as absent.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec("kernels", [p for p in _sys.path if _os.path.abspath(p or ".") != _root])
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds once this file ran
        _spec.loader.exec_module(_module)
    del _machinery, _util, _os, _sys, _root, _spec
else:
    from .decode import decode_layer  # noqa: F401
    from .dispatch import attend_layer, unavailable_reason  # noqa: F401
    from .prefill import check_supported, launch_prefill, prefill, quantize_kv_segment, unsupported  # noqa: F401
    from .quantize_pack import compress_into  # noqa: F401
