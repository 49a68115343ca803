"""What attention derives from a key prefix, kept while the prefix stays the same (issue 18).

A stream's chunk attends, at each of its denoising steps and in its cache pass, to [cached context + the chunk's
own keys]: the context keys are one tensor for the whole chunk (the engine keeps them rotated in its buffers,
stages.stream.engine.ContextBuffers, and hands every forward the same KV), only the chunk's keys change. Whatever a fast attention backend
derives from the context alone — INT8 attention's quantized key blocks (vidu_kernels.int8_attention) — is then the
same at every step, and a `PrefixCache` keeps it instead of recomputing it per call. (Block-sparse attention builds
its map from each call's q and k in two launches, cheaper than keeping its pooled keys: vidu_kernels.sparse_attention.)

An entry is keyed on the prefix tensor itself and on what was derived (`what`: a tuple naming the kind and its
parameters). The tensor counts by identity (a weak reference: a freed tensor whose memory another reuses never
matches, the cache does not keep it alive, and its entry is dropped when it is freed), its in-place version counter (a write into the keys invalidates the
entry), shape, strides, dtype and device. Inference tensors (torch.inference_mode) keep no version counter, so their
entries could not see a write: they are never cached (`get` builds every call). At most `size` entries are kept,
least recently used dropped first: a stream's step reads the noisy context and its last step and cache pass the
clean one, two prefixes per chunk.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


def _version(t) -> int | None:
    """t's in-place version counter, None for an inference tensor (which has none)."""
    return None if t.is_inference() else t._version


class PrefixCache:
    """Values derived from a key prefix, by (prefix tensor, what); see the module's docstring."""

    def __init__(self, size: int = 2):
        if size < 1:
            raise ValueError(f"size must be >= 1, not {size}")
        self.size = size
        self._entries: OrderedDict[tuple, tuple[weakref.ref, int, Any]] = OrderedDict()
        self.hits = self.misses = 0

    def _key(self, prefix, what: Hashable) -> tuple:
        return (id(prefix), tuple(prefix.shape), tuple(prefix.stride()), prefix.dtype, prefix.device,
                prefix.storage_offset(), what)

    def lookup(self, prefix, what: Hashable) -> Any | None:
        """The value kept for (prefix, what) if the prefix is that tensor, unmodified since; else None."""
        version = _version(prefix)
        if version is None:
            return None
        key = self._key(prefix, what)
        entry = self._entries.get(key)
        if entry is None:
            return None
        ref, kept_version, value = entry
        if ref() is not prefix or kept_version != version:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, prefix, what: Hashable, value: Any) -> None:
        """Keep value for (prefix, what) at the prefix's current version (not for an inference tensor)."""
        version = _version(prefix)
        if version is None:
            return
        key = self._key(prefix, what)
        entries = self._entries

        def gone(ref, key=key):             # the prefix freed: its entry (and the memory it holds) goes at once
            entry = entries.get(key)
            if entry is not None and entry[0] is ref:
                del entries[key]

        self._entries[key] = (weakref.ref(prefix, gone), version, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get(self, prefix, what: Hashable, build: Callable[[], Any]) -> Any:
        """lookup, or build() kept by put."""
        value = self.lookup(prefix, what)
        if value is not None:
            self.hits += 1
            return value
        self.misses += 1
        value = build()
        self.put(prefix, what, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo) -> "PrefixCache":
        """A copy of a model starts with an empty cache (its entries are of the original's tensors)."""
        return PrefixCache(self.size)

    def __reduce__(self):
        """Pickled (a model saved whole, or sent to another process) as an empty cache: weak references do not
        pickle, and the entries are of this process's tensors."""
        return PrefixCache, (self.size,)


def prefix_length(prefix, k) -> int | None:
    """How many of the keys k [B, Lk, H, D] the prefix [B, Lc, H, D] stands for: Lc, or None for no prefix (None or
    empty). ValueError when it cannot be their start (more tokens, other batch / heads / head dim)."""
    if prefix is None or prefix.shape[1] == 0:
        return None
    if prefix.shape[1] > k.shape[1] or prefix.shape[0] != k.shape[0] or prefix.shape[2:] != k.shape[2:]:
        raise ValueError(f"the prefix {tuple(prefix.shape)} is not the start of the keys {tuple(k.shape)}")
    return prefix.shape[1]
