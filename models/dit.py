"""The video-audio diffusion transformer: ONE definition for the bidirectional teacher, the causal
teacher, the distilled student and the streaming generator.

Wan2.1's DiT (wan/modules/model.py) with its module and parameter names, so Wan2.1-T2V-1.3B,
CausVid, Self-Forcing and LongLive weights load, plus:
- per-frame timesteps (t: [B] or [B, F]) for diffusion forcing and streaming;
- the attention mask as an argument: `mask="full"` (bidirectional) or `mask="causal"` (block-causal
  by chunks of `chunk_frames` latent frames), and an explicit key/value context `kv` (keys stored
  before RoPE, with their positions) that the current tokens attend to: the streaming form;
- a reference image as a clean latent frame (t = 0) at the start of the sequence; it attends only to
  itself, so its keys/values are the same in every mode and can be cached once;
- speech features per latent frame through an audio adapter (`audio_embedding` + per-block,
  per-frame cross-attention `audio_attn`, output zero-initialised);
- joint audio generation: `audio_latent_tokens` audio latent tokens per latent frame appended to
  the frame's video tokens (x = [v; a], eq. 1 of the paper), predicted by `audio_head`;
- Ulysses sequence parallelism (`DiT.shard_sequence(group)`, models/ulysses.py): the ranks of a
  process group split every frame's tokens and exchange them for heads around self-attention.

Token layout is frame-major: [B, F, S, dim] with S = h*w video tokens (+ audio tokens), flattened
to [B, F*S, dim] for self-attention.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.functional import layer_norm
from torch.utils.checkpoint import checkpoint

from models.config import DiTConfig
from models.rope import apply_rope, grid_positions, grid_tables, rope_angles
from models.ulysses import SequenceShards, check_heads
from vidu_kernels import adaln, qk_rope
from vidu_kernels.attention import attention
from vidu_kernels.int8_attention import int8_attention
from vidu_kernels.prefix_cache import PrefixCache
from vidu_kernels.sparse_attention import sparse_attention
from vidu_kernels.w8a8 import dit_block_linears, quantize_linears


@dataclass
class KV:
    """Self-attention keys (before RoPE, unless `rotated`) and values of some tokens, per block, with
    their positions. Under sequence parallelism a rank holds its heads of every token (H/N)."""
    k: list[torch.Tensor]   # per block [B, L, H, D]
    v: list[torch.Tensor]   # per block [B, L, H, D]
    pos: torch.Tensor       # [L, 3] (frame, row, column)
    rotated: bool = False   # keys already rotated to `pos` (a stream's cache, DiT.rotate): used as they are
    angles: tuple | None = None   # rope_angles(pos) when already at hand (models.rope.grid_tables), or None
    # (k_bufs, v_bufs) per block: buffers whose first len(self) tokens ARE k[i] / v[i] (same memory) with room after
    # them, where a forward without gradients writes its own keys/values to attend to [context + its tokens]
    # without concatenating (stages.stream.engine.ContextBuffers.context); None: concatenate. What derives a new KV
    # (cat, tokens, a stack of rows) leaves it None.
    room: tuple[list, list] | None = None
    # bool [B, L]: which of each row's tokens exist (the rest pad a shorter context to the batch's length, zeros a
    # forward masks out of every query's keys: stages/stream/batch.py stacks streams at other context lengths);
    # None: all of them. `pos` then holds the longest row's positions.
    valid: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.pos.shape[0]

    def cat(self, other: "KV") -> "KV":
        if other.rotated != self.rotated:
            raise ValueError("cannot join keys rotated to their positions with keys before RoPE")
        if self.valid is not None or other.valid is not None:
            raise ValueError("a padded context (KV.valid) is a batch's stack, not joined further")
        return KV([torch.cat([a, b], 1) for a, b in zip(self.k, other.k)],
                  [torch.cat([a, b], 1) for a, b in zip(self.v, other.v)], torch.cat([self.pos, other.pos]),
                  self.rotated)

    def tokens(self, start: int, stop: int) -> "KV":
        if self.valid is not None:
            raise ValueError("a padded context (KV.valid) is a batch's stack, not sliced")
        return KV([k[:, start:stop] for k in self.k], [v[:, start:stop] for v in self.v], self.pos[start:stop],
                  self.rotated)


def _sdpa(q, k, v, mask=None, prefix=None, cache=None):
    return attention(q, k, v, mask)


# The fast backends run eagerly inside compiled blocks (a graph break around the call): traced, their launchers would
# become their torch references (INT8 attention's materialises the [H, Lq, Lk] float32 scores), and the prefix
# cache is Python state. Eager, the Triton kernels run and the cache serves the chunk's steps.
@torch.compiler.disable
def _int8(q, k, v, mask=None, prefix=None, cache=None):
    return int8_attention(q, k, v, mask, prefix=prefix, cache=cache)


@torch.compiler.disable
def _sparse(q, k, v, mask=None, prefix=None, cache=None):
    return attention(q, k, v, mask) if mask is not None else sparse_attention(q, k, v)


# self-attention backends (DiT.use_kernels): PyTorch SDPA; INT8 Q.K^T with per-block scales and K smoothing;
# block-sparse from pooled block similarity (keep 0.9). The fast ones take no mask: a masked call runs SDPA.
# Each is called (q, k, v, mask, prefix=, cache=): `prefix` the cached context's keys that k starts with, `cache`
# the module's PrefixCache, where a backend keeps what it derives from them (INT8 attention's quantized key blocks)
# for the next calls over the same context (a chunk's steps). Sparse attention keeps nothing: it builds its block map
# from each call's q and k in two launches (vidu_kernels.sparse_attention.block_map).
SELF_ATTENTION = {"sdpa": _sdpa, "int8": _int8, "sparse": _sparse}


@dataclass
class TextCache:
    """A text condition prepared once for several forwards over it (a chunk's denoising steps, the chunks
    of one instruction; `DiT.prepare_text`): each block's cross-attention keys/values and the pooled
    text, the numbers the forward computes from the features. `forward(context=...)` takes either."""
    kv: list[tuple[torch.Tensor, torch.Tensor]]   # per block (k, v) [rows, text_len, H, D]
    pooled: torch.Tensor | None                   # pool_text(features): [B, dim], or [B, F, dim] per frame
    rows: int                                     # B
    frames: int                                   # F of a text per frame (0: one text for all frames)
    n_ref: int                                    # ref frames a per-frame text's rows include


@dataclass
class DiTOutput:
    video: torch.Tensor                # [B, C, F, H, W] prediction for the generated frames
    audio: torch.Tensor | None         # [B, F, Na, Ca] joint audio prediction, or None
    kv: KV | None                      # keys/values of this call's tokens (ref frame first), if asked


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return qk_rope.rms_norm_reference(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (Wan's WanLayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class Attention(nn.Module):
    """q/k/v/o projections with RMS q/k norm; self-attention (RoPE, mask, cached context) or
    cross-attention (no RoPE) by how it is called."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.backend = "sdpa"                   # self-attention's (SELF_ATTENTION; DiT.use_kernels)
        self.kernels = False                    # DiT.use_kernels: q/k norm + RoPE in one Triton pass
        self.prefix_cache = PrefixCache(2)      # the backend's derived context keys, per context (noisy, clean)

    def _heads(self, x):
        return x.unflatten(-1, (self.num_heads, -1))

    def context_kv(self, context):
        """Cross-attention keys and values [B, Lc, H, D] of an embedded context [B, Lc, dim]."""
        context = context.to(self.k.weight.dtype)
        return self._heads(self.norm_k(self.k(context))), self._heads(self.v(context))

    def qkv(self, x):
        x = x.to(self.q.weight.dtype)
        return self._heads(self.norm_q(self.q(x))), self._heads(self.norm_k(self.k(x))), self._heads(self.v(x))

    def self_attend(self, x, rope, mask, ctx=None, sp: SequenceShards | None = None):
        """x: [B, L, dim]; rope: (cos, sin) of the L tokens; ctx: (k, v, cos, sin) of context tokens
        (keys before RoPE; cos None: keys already rotated), or (k, v, None, None, room_k, room_v): rotated keys
        that are the first n tokens of the buffers room_k / room_v (KV.room), whose tokens n..n+L this call
        overwrites with its rotated keys and values to attend to the buffers' first n+L tokens in place of a
        concatenation (when the dtypes match and the room is there; else it concatenates). Returns (out
        [B, L, dim], k before RoPE, v) — k and v tensors of their own, never views of the buffers.
        With `sp`, x holds this rank's tokens, and rope, mask, ctx and the returned k, v are those of the
        whole sequence (k, v, ctx, room: this rank's heads)."""
        cos, sin = rope
        if self.kernels:                     # qk_rope's kernels where they run, their references elsewhere
            x = x.to(self.q.weight.dtype)
            wq, wk = (n.weight if isinstance(n, RMSNorm) else None for n in (self.norm_q, self.norm_k))
            eps = self.norm_q.eps if wq is not None else 0.0
        if self.kernels and sp is None:      # the norms and rotations fused: one pass each for q and k
            q_r = qk_rope.qk_norm_rope(self.q(x), wq, cos, sin, self.num_heads, eps, unrotated=False)[0]
            k_r, k = qk_rope.qk_norm_rope(self.k(x), wk, cos, sin, self.num_heads, eps)
            v = self._heads(self.v(x))
        else:
            if self.kernels:                 # Ulysses: the norms (whole tokens) before the exchange, one pass each
                q = qk_rope.rms_norm_heads(self.q(x), wq, self.num_heads, eps)
                k = qk_rope.rms_norm_heads(self.k(x), wk, self.num_heads, eps)
                v = self._heads(self.v(x))
            else:
                q, k, v = self.qkv(x)
            if sp is not None:               # [B, L, H, 3D]: one exchange for the three
                qkv = sp.seq_to_heads(torch.stack([q, k, v], -2).flatten(-2))
                q, k, v = qkv.unflatten(-1, (3, -1)).unbind(-2)
            rotate = qk_rope.rope if self.kernels else apply_rope     # at the sequence's positions
            q_r, k_r = rotate(q, cos, sin), rotate(k, cos, sin)
        prefix = cache = None
        if ctx is not None:
            ck, cv, ccos, csin = ctx[:4]
            room_k, room_v = ctx[4:] if len(ctx) > 4 else (None, None)
            rotate = qk_rope.rope if self.kernels else apply_rope
            # keys already rotated (a stream's cache: one tensor for all the forwards of a chunk) are what a backend may
            # keep derived forms of; keys rotated here are new in every call
            cache = self.prefix_cache if ccos is None and ck.dtype == k.dtype else None
            n, L = ck.shape[1], k_r.shape[1]
            if (room_k is not None and ccos is None and ck.dtype == k_r.dtype and cv.dtype == v.dtype
                    and room_k.shape[1] >= n + L):
                # the chunk's keys/values written after the context in its buffers (tokens n.. are free: the
                # next ring slot, or the buffers' extra room): no copy of the whole context per forward
                room_k[:, n:n + L].copy_(k_r)
                room_v[:, n:n + L].copy_(v)
                prefix = ck
                k_r, v_all = room_k[:, :n + L], room_v[:, :n + L]
            else:
                ck = ck.to(k.dtype) if ccos is None else rotate(ck.to(k.dtype), ccos, csin)
                prefix = ck
                k_r = torch.cat([ck, k_r], 1)
                v_all = torch.cat([cv.to(v.dtype), v], 1)
        else:
            v_all = v
        out = SELF_ATTENTION[self.backend](q_r, k_r, v_all, mask, prefix=prefix, cache=cache)
        if sp is not None:
            out = sp.heads_to_seq(out)
        return self.o(out.flatten(2)), k, v

    def cross_attend(self, x, context, rope=None):
        """x: [B, L, dim] queries, context: [B, Lc, dim] (already embedded) or its (k, v) from `context_kv`;
        rope: (q_cos, q_sin, k_cos, k_sin) to rotate queries and keys by their own positions (the audio
        adapter; k_cos, k_sin None: `context`'s keys are rotated already), or None."""
        x = x.to(self.q.weight.dtype)
        q = self._heads(self.norm_q(self.q(x)))
        k, v = context if isinstance(context, tuple) else self.context_kv(context)
        if rope is not None:
            q = apply_rope(q, *rope[:2])
            if rope[2] is not None:                       # (k_cos None: keys given already rotated)
                k = apply_rope(k, *rope[2:])
        return self.o(attention(q, k, v).flatten(2))


class Block(nn.Module):
    """One Wan attention block (self-attn, text cross-attn, FFN under 6-way adaLN) + audio adapter."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps)
        self.self_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm(dim, cfg.eps, affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        if cfg.audio_dim:
            self.norm_audio = LayerNorm(dim, cfg.eps, affine=True)
            self.audio_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.kernels = False                    # DiT.use_kernels: the fused Triton element-wise passes

    def forward(self, x, e, rope, mask, text, audio, ctx, sp=None):
        """x: [B, F, S, dim] (float32 residual stream); e: [B, F, 6, dim] float32; text: [B, Lt, dim] or
        per frame [B, F, Lt, dim], or this block's cross-attention (k, v) of either (a TextCache's:
        [B, Lt, H, D], or per frame [B*F, Lt, H, D]);
        audio: (context, rope, Fa) — the last Fa frames' windows of speech tokens [B*Fa, W*K, dim], or this
        block's audio cross-attention (k, v) of them [B*Fa, W*K, H, D] (DiT._speech) — or None; ctx: (k, v,
        cos, sin), with the buffers (room_k, room_v) after them (Attention.self_attend), or None;
        sp: SequenceShards (x: this rank's S of each frame) or None."""
        B, F, S, dim = x.shape
        fused = self.kernels                    # the launchers (Triton where it runs), else the same math in torch
        norm_modulate = adaln.norm_modulate if fused else adaln.norm_modulate_reference
        gated_residual = adaln.gated_residual if fused else adaln.gated_residual_reference
        m = (self.modulation.unsqueeze(1) + e).unsqueeze(3).unbind(2)   # 6 x [B, F, 1, dim]
        h = norm_modulate(x, m[0], m[1], self.norm1.eps, out_dtype=self.self_attn.q.weight.dtype)
        y, k, v = self.self_attn.self_attend(h.flatten(1, 2), rope, mask, ctx, sp)
        x = gated_residual(x, y.unflatten(1, (F, S)), m[2])
        per_frame = text[0].shape[0] != B if isinstance(text, tuple) else text.ndim == 4
        if per_frame:                           # a text per frame: each frame reads its own
            text = text if isinstance(text, tuple) else text.flatten(0, 1)
            y = self.cross_attn.cross_attend(self.norm3(x).flatten(0, 1), text).unflatten(0, (B, F))
        else:
            y = self.cross_attn.cross_attend(self.norm3(x).flatten(1, 2), text).unflatten(1, (F, S))
        x = x + y.float()
        if audio is not None:
            audio, audio_rope, Fa = audio
            xa = x[:, F - Fa:]
            ya = self.audio_attn.cross_attend(self.norm_audio(xa).flatten(0, 1), audio, audio_rope)
            x = torch.cat([x[:, :F - Fa], xa + ya.unflatten(0, (B, Fa)).float()], 1)
        h = norm_modulate(x, m[3], m[4], self.norm2.eps, out_dtype=self.ffn[0].weight.dtype)
        x = gated_residual(x, self.ffn(h), m[5])
        return x, k, v


class Head(nn.Module):
    """Modulated output projection (Wan's Head; also used, under `audio_head`, for audio tokens)."""

    def __init__(self, dim: int, out: int, eps: float = 1e-6):
        super().__init__()
        self.norm = LayerNorm(dim, eps)
        self.head = nn.Linear(dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x, e):
        """x: [B, F, S, dim], e: [B, F, dim] time embedding (before projection)."""
        m = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).unsqueeze(3).unbind(2)
        return self.head((self.norm(x) * (1 + m[1]) + m[0]).to(self.head.weight.dtype))


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """t: [N] -> [N, dim] = [cos(t w), sin(t w)], w_i = 10000^(-i / (dim/2)), computed in float64."""
    half = dim // 2
    t = t.to(torch.float64)
    w = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    a = torch.outer(t, w)
    return torch.cat([a.cos(), a.sin()], dim=1).float()


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        if cfg.pooled_text:
            self.text_pool = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(dim, math.prod(cfg.patch_size) * cfg.out_dim, cfg.eps)
        if cfg.audio_dim:
            self.audio_embedding = nn.Sequential(nn.Linear(cfg.audio_dim, dim), nn.GELU(approximate="tanh"),
                                                 nn.Linear(dim, dim))
        if cfg.joint_audio:
            self.audio_patch = nn.Linear(cfg.audio_latent_dim, dim)
            self.audio_ref_tokens = nn.Parameter(torch.zeros(1, 1, cfg.audio_latent_tokens, dim))
            self.audio_head = Head(dim, cfg.audio_latent_dim, cfg.eps)
        if cfg.voices:
            self.voice_embedding = nn.Embedding(cfg.voices, dim)
        self.gradient_checkpointing = False
        self.keep_speech = False           # a stream's engine: _speech keeps a chunk's speech keys/values
        self._kept_speech = None
        self.sequence_parallel: dist.ProcessGroup | None = None      # shard_sequence
        self.init_weights()

    def compile_blocks(self, dynamic: bool | None = None, mode: str | None = None) -> None:
        """Compile each block with torch.compile (Inductor fuses the float32 adaLN / norm / RoPE arithmetic
        into a few kernels: a small model's forward is bound by how many it launches). `dynamic`: False for
        one sequence length (training), None to let lengths that change become symbolic after one
        recompile (streaming: the cached context grows until the window fills). The blocks share one compiled
        code object whose variants (grad mode, context or none, batch, guidance) can outnumber dynamo's
        default limit of 8, past which it silently runs eagerly: the limit is raised to 64. `mode`: torch.compile's
        (None: the default; "reduce-overhead" replays each block as a CUDA graph, for a loop bound by launches).
        A block Inductor fails to compile runs eagerly (dynamo's suppress_errors; torch logs why) instead of ending
        the run: session 56's distillation died so in Inductor's tiling on an H100, costing a GPU call."""
        import torch._dynamo.config as dynamo
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
        dynamo.suppress_errors = True
        for block in self.blocks:
            block.compile(dynamic=dynamic, mode=mode)

    def use_kernels(self, on: bool = True, attention: str = "sdpa", keep_context: bool = True) -> None:
        """The blocks' element-wise passes (LayerNorm + adaLN modulation, gated residual adds; self-attention's
        q/k RMSNorm + RoPE, under shard_sequence the norm before the all-to-all and RoPE after it) through the fused
        Triton kernels of vidu_kernels.adaln / qk_rope where they can run (CUDA, no autograd through them, not
        under torch.compile), their torch references anywhere else: the same numbers either way; and
        self-attention by `attention` (SELF_ATTENTION: "sdpa", "int8", "sparse"; the last two approximate).
        keep_context: the fast backends keep what they derive from a context of rotated keys (a stream's cache) for
        the chunk's next forwards (vidu_kernels.prefix_cache: INT8 attention's int8 key blocks; the sparse backend
        keeps nothing); False derives it in every forward (the same numbers, to measure what keeping buys)."""
        if attention not in SELF_ATTENTION:
            raise ValueError(f"attention is one of: {', '.join(SELF_ATTENTION)}, not {attention!r}")
        for block in self.blocks:
            block.kernels = block.self_attn.kernels = on
            block.self_attn.backend = attention
            block.self_attn.prefix_cache = PrefixCache(2) if keep_context else None

    def kernel_settings(self) -> dict:
        """What use_kernels set, as its arguments (another copy of the model, a rank's, is set the same with them)."""
        attn = self.blocks[0].self_attn
        return dict(on=attn.kernels, attention=attn.backend, keep_context=attn.prefix_cache is not None)

    def quantize(self, fmt: str = "fp8") -> list[str]:
        """The blocks' attention projections and FFNs as W8A8 GEMMs (vidu_kernels.w8a8: weights quantized here,
        once, per 128x128 block; activations per token and 128 channels in each call; Triton where it runs,
        the dequantized reference elsewhere; in compiled blocks one custom op, torch.ops.vidu.w8a8_linear, that
        runs the same). For inference only, and for good: returns the layers swapped."""
        return quantize_linears(self, fmt, dit_block_linears)

    def shard_sequence(self, group: dist.ProcessGroup | None) -> None:
        """Run every forward over the ranks of `group` (Ulysses, models/ulysses.py): each rank passes
        the same inputs and gets the same outputs; a key/value context (`kv`) and the keys/values it
        returns hold the rank's num_heads / N heads. None: one process again."""
        if group is not None:
            check_heads(self.cfg.num_heads, dist.get_world_size(group))
        self.sequence_parallel = group

    @property
    def local_heads(self) -> int:
        """Heads of this rank's keys/values: all of them, or num_heads / N under shard_sequence."""
        group = self.sequence_parallel
        return self.cfg.num_heads // (1 if group is None else dist.get_world_size(group))

    # -- initialisation (Wan's, plus identity-at-start for the new branches) --
    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding, getattr(self, "audio_embedding", nn.Sequential())):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        if self.cfg.audio_dim:
            for b in self.blocks:
                nn.init.zeros_(b.audio_attn.o.weight)
        if self.cfg.joint_audio:
            nn.init.zeros_(self.audio_head.head.weight)
        if self.cfg.voices:
            nn.init.normal_(self.voice_embedding.weight, std=0.02)
        if self.cfg.pooled_text:
            nn.init.normal_(self.text_pool[0].weight, std=0.02)
            nn.init.zeros_(self.text_pool[2].weight)

    # -- pieces --
    def embed_time(self, t: torch.Tensor, pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """t: [B, F] -> e [B, F, dim], e0 [B, F, 6, dim] (float32); `pooled` [B, F, dim]
        (`pool_text`) is added to e before the projection."""
        B, F = t.shape
        with torch.autocast(t.device.type, enabled=False):
            e = self.time_embedding(sinusoidal_embedding(self.cfg.freq_dim, t.flatten()).to(
                self.time_embedding[0].weight.dtype)).float()
            if pooled is not None:
                e = e + pooled.flatten(0, 1).float()
            e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float()
        return e.unflatten(0, (B, F)), e0.unflatten(0, (B, F)).unflatten(-1, (6, self.cfg.dim))

    def pool_text(self, context: torch.Tensor) -> torch.Tensor:
        """context: [..., L, text_dim] -> [..., dim]: the mean of the non-padding token features (text
        encoders give zeros at padding) through `text_pool` (cfg.pooled_text)."""
        with torch.autocast(context.device.type, enabled=False):
            valid = (context.abs().amax(-1, keepdim=True) > 0).to(context.dtype)
            mean = (context * valid).sum(-2) / valid.sum(-2).clamp(min=1)
            return self.text_pool(mean.to(self.text_pool[0].weight.dtype)).float()

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """context: [B, L, text_dim], L <= text_len; zero-padded to text_len as Wan does (no mask)."""
        B, L, C = context.shape
        if L > self.cfg.text_len:
            raise ValueError(f"text context has {L} tokens; this model takes at most {self.cfg.text_len}")
        if C != self.cfg.text_dim:
            raise ValueError(f"text features have {C} channels; this model expects text_dim={self.cfg.text_dim}")
        pad = context.new_zeros(B, self.cfg.text_len - L, C)
        return self.text_embedding(torch.cat([context, pad], 1).to(self.text_embedding[0].weight.dtype))

    def _text(self, context: torch.Tensor, n_ref: int) -> torch.Tensor:
        """Embedded text [B, text_len, dim], or per frame [B, n_ref + F, text_len, dim] (the ref frames
        read the first frame's)."""
        if context.ndim == 3:
            return self.embed_text(context)
        B, F = context.shape[:2]
        text = self.embed_text(context.flatten(0, 1)).unflatten(0, (B, F))
        return torch.cat([text[:, :1].expand(-1, n_ref, -1, -1), text], 1) if n_ref else text

    def prepare_text(self, context: torch.Tensor, n_ref: int = 0) -> TextCache:
        """Text features [B, L, text_dim], or [B, F, L, text_dim] a text per frame, as every block's
        cross-attention keys/values and the pooled text: what a forward computes from them, once for
        several forwards. It reads the blocks' parameters outside their forward: not for a model
        sharded by FSDP (streaming, not training)."""
        text = self._text(context, n_ref)
        text = text.flatten(0, 1) if context.ndim == 4 else text
        pooled = self.pool_text(context) if self.cfg.pooled_text else None
        return TextCache([b.cross_attn.context_kv(text) for b in self.blocks], pooled, context.shape[0],
                         context.shape[1] if context.ndim == 4 else 0, n_ref if context.ndim == 4 else 0)

    def embed_frames(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, F, H, W] latent -> [B, F, h*w, dim]."""
        if x.shape[1] != self.cfg.in_dim:
            raise ValueError(f"latent has {x.shape[1]} channels; this model expects in_dim={self.cfg.in_dim}")
        y = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        return y.permute(0, 2, 3, 4, 1).flatten(2, 3).float()

    def unpatchify(self, y: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """y: [B, F, h*w, pt*ph*pw*C] -> [B, C, F*pt, h*ph, w*pw]."""
        B, F = y.shape[:2]
        pt, ph, pw = self.cfg.patch_size
        y = y.reshape(B, F, h, w, pt, ph, pw, -1)
        return torch.einsum("bfhwpqrc->bcfphqwr", y).reshape(B, -1, F * pt, h * ph, w * pw)

    def embed_audio(self, audio: torch.Tensor, F: int, device):
        """[B, before + F + after, K, audio_dim] -> (per generated frame, its window of before + 1 + after
        frames' speech tokens [B, F, W*K, dim], and the RoPE of queries and keys along time). Keys sit at
        their mel step in the window, queries at the middle of their own frame's steps, so the adapter
        hears the steps in order and knows which are its own."""
        before, after = self.cfg.audio_context
        W = before + 1 + after
        if audio.shape[1] != F + W - 1:
            raise ValueError(f"audio features cover {audio.shape[1]} frames; {F} latent frames with "
                             f"{before} before and {after} after need {F + W - 1}")
        K = audio.shape[2]
        tokens = self.audio_embedding(audio.to(self.audio_embedding[0].weight.dtype))     # [B, Fa, K, dim]
        windows = tokens.unfold(1, W, 1).permute(0, 1, 4, 2, 3).flatten(2, 3)            # [B, F, W*K, dim]
        return windows, _audio_rope(W, K, before, self.cfg.head_dim, torch.device(device))

    def _speech(self, audio: torch.Tensor, F: int, device) -> tuple[list, tuple, int]:
        """(per block its audio cross-attention context, the RoPE of queries and keys, F): the speech windows'
        tokens [B*F, W*K, dim] for every block; with `keep_speech` and no gradients, every block's keys (rotated)
        and values of them, kept for the next forwards over the same `audio` tensor, unmodified, under
        unmodified weights (a chunk's denoising steps and cache pass hear the same speech: computed once, not in
        each)."""
        if not self.keep_speech or torch.is_grad_enabled():
            windows, rope = self.embed_audio(audio, F, device)
            return [windows.flatten(0, 1)] * len(self.blocks), rope, F
        key = (audio, tensor_version(audio), F, str(device), self.weights_version())
        kept = self._kept_speech
        if kept is None or kept[0] is not audio or kept[1:-1] != key[1:]:
            windows, (qc, qs, kc, ks) = self.embed_audio(audio, F, device)
            kv = [b.audio_attn.context_kv(windows.flatten(0, 1)) for b in self.blocks]
            kv = [(apply_rope(k, kc, ks), v) for k, v in kv]
            self._kept_speech = kept = (*key, (kv, (qc, qs, None, None), F))
        return kept[-1]

    def weights_version(self) -> int:
        """In-place changes to the weights so far (what is kept across forwards is kept under unchanged weights)."""
        return sum(tensor_version(p) for p in self.parameters())

    def rotate(self, kv: KV) -> KV:
        """Keys/values with the keys rotated to their positions (a stream's cache keeps keys rotated: the
        forwards over it skip re-rotating every cached key); by qk_rope's one-pass kernel under use_kernels."""
        if kv.rotated:
            return kv
        cos, sin = kv.angles or rope_angles(kv.pos.to(kv.k[0].device), self.cfg.head_dim)
        rot = qk_rope.rope if self.blocks[0].self_attn.kernels else apply_rope
        return KV([rot(k, cos, sin) for k in kv.k], kv.v, kv.pos, rotated=True)

    # -- the forward pass --
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *,
                audio: torch.Tensor | None = None, audio_latent: torch.Tensor | None = None,
                ref: torch.Tensor | None = None, mask: str = "full", chunk_frames: int = 1,
                kv: KV | None = None, frame_pos=None, return_kv: bool = False,
                voice: torch.Tensor | None = None) -> DiTOutput:
        """
        x: [B, C, F, H, W] noisy video latent; t: [B] or [B, F] timesteps (0..1000);
        context: [B, L, text_dim] text features, or [B, F, L, text_dim] a text per frame (the
        instruction in force at each frame; the ref frame reads the first frame's), or either one's
        TextCache (`prepare_text`, with the same ref frames); audio: [B, before + F + after, K, audio_dim] speech
        features of x's frames with the speech context the model hears (cfg.audio_context; models/audio.py);
        audio_latent: [B, F, Na, Ca] noisy joint audio latent (required when the model has the branch);
        ref: [B, C, 1, H, W] clean reference latent, put first (t = 0, frame position 0);
        voice: [B] the character voice of each row (cfg.voices; < 0 or None: none), on the ref's audio tokens;
        mask: "full" or "causal" (block-causal by `chunk_frames` among this call's frames);
        kv: context keys/values (pre-RoPE, with positions) every generated token attends to;
        frame_pos: RoPE frame positions of x's frames (default: following the ref / the kv context).
        """
        cfg = self.cfg
        B, _, F, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        h, w = H // ph, W // pw
        if mask not in ("full", "causal"):
            raise ValueError(f"mask must be 'full' or 'causal', not {mask!r}")
        if t.ndim == 1:
            t = t[:, None].expand(B, F)
        tokens = self.embed_frames(x)                                     # [B, F, h*w, dim]
        if cfg.joint_audio:
            if audio_latent is None:
                raise ValueError("this model generates audio jointly: pass audio_latent [B, F, Na, Ca]")
            tokens = torch.cat([tokens, self.audio_patch(audio_latent.to(self.audio_patch.weight.dtype)).float()], 2)
        n_ref = 0 if ref is None else 1
        if ref is not None:
            ref_tokens = self.embed_frames(ref)
            if cfg.joint_audio:
                said = self.audio_ref_tokens.float().expand(B, -1, -1, -1)
                if cfg.voices and voice is not None:
                    voice = torch.as_tensor(voice, device=x.device)
                    chosen = self.voice_embedding(voice.clamp_min(0)).float() * (voice >= 0)[:, None].float()
                    said = said + chosen[:, None, None, :]
                ref_tokens = torch.cat([ref_tokens, said], 2)
            tokens = torch.cat([ref_tokens, tokens], 1)
            t = torch.cat([t.new_zeros(B, 1), t], 1)
        S = tokens.shape[2]
        sp = None if self.sequence_parallel is None else SequenceShards(self.sequence_parallel, S)
        if sp is not None:
            if kv is not None and kv.k[0].shape[2] != cfg.num_heads // sp.world:
                raise ValueError(f"the kv context holds {kv.k[0].shape[2]} heads; over {sp.world} ranks each "
                                 f"holds {cfg.num_heads // sp.world}")
            tokens = sp.shard(tokens)                                 # [B, Fq, S/N, dim]

        if frame_pos is None:
            start = int(kv.pos[:, 0].max()) + 1 if kv is not None and len(kv) else n_ref
            frame_pos = torch.arange(start, start + F)
        frame_pos = torch.as_tensor(frame_pos, dtype=torch.long)
        if frame_pos.device.type == "cpu":      # the layout's tables, built once (no host-to-device copy per forward)
            pos, *rope = grid_tables((0,) * n_ref + tuple(frame_pos.tolist()), h, w, cfg.audio_latent_tokens,
                                     cfg.head_dim, torch.device(x.device))
        else:
            all_pos = torch.cat([frame_pos.new_zeros(n_ref), frame_pos])
            pos = grid_positions(all_pos, h, w, cfg.audio_latent_tokens)
            rope = rope_angles(pos, cfg.head_dim)
        ctx_rope = (None, None) if kv is None or kv.rotated else kv.angles or rope_angles(kv.pos.to(x.device), cfg.head_dim)
        attn_mask = self.token_mask(F, n_ref, S, 0 if kv is None else len(kv), mask, chunk_frames, x.device)
        if kv is not None and kv.valid is not None:         # rows of a padded context: its padding attended by none
            if sp is not None:
                raise ValueError("a padded context (KV.valid) under sequence parallelism is not supported")
            attn_mask = _key_mask(attn_mask, kv.valid, (n_ref + F) * S)

        if isinstance(context, TextCache):
            cache = context
            if cache.rows != B or (cache.frames and (cache.frames, cache.n_ref) != (F, n_ref)):
                raise ValueError(f"the prepared text is for {cache.rows} rows"
                                 + (f", {cache.frames} frames and {cache.n_ref} ref" if cache.frames else "")
                                 + f"; this forward has {B} rows, {F} frames and {n_ref} ref")
            texts, pooled, per_frame = cache.kv, cache.pooled, bool(cache.frames)
        else:
            if context.ndim == 4 and context.shape[1] != F:
                raise ValueError(f"per-frame text covers {context.shape[1]} frames; the latent has {F}")
            texts = [self._text(context, n_ref)] * len(self.blocks)   # each block computes its keys/values
            pooled = self.pool_text(context) if cfg.pooled_text else None
            per_frame = context.ndim == 4
        if cfg.pooled_text:                  # per frame (the ref frame reads the first frame's, as above)
            pooled = pooled if per_frame else pooled[:, None].expand(-1, F, -1)
            pooled = torch.cat([pooled[:, :1].expand(-1, n_ref, -1), pooled], 1)
        e, e0 = self.embed_time(t, pooled)
        speech = self._speech(audio, F, x.device) if audio is not None and cfg.audio_dim else None

        # the context's buffers with room for this call's keys/values (KV.room): without gradients only (an in-place
        # write into a buffer the autograd graph shares would break it: the distillation rollout concatenates)
        room = kv is not None and kv.room is not None and kv.rotated and not torch.is_grad_enabled()
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            ctx = None if kv is None else (kv.k[i], kv.v[i], *ctx_rope)
            if room and _starts(kv.k[i], kv.room[0][i]) and _starts(kv.v[i], kv.room[1][i]):
                ctx = (*ctx, kv.room[0][i], kv.room[1][i])
            args = (tokens, e0, rope, attn_mask, texts[i], None if speech is None else
                    (speech[0][i], speech[1], speech[2]), ctx, sp)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens, k, v = checkpoint(block, *args, use_reentrant=False)
            else:
                tokens, k, v = block(*args)
            if return_kv:
                ks.append(k)
                vs.append(v)

        gen, e_gen = tokens[:, n_ref:], e[:, n_ref:]
        video = self.unpatchify(_predict(self.head, gen, e_gen, sp, 0, h * w), h, w).float()
        audio_out = _predict(self.audio_head, gen, e_gen, sp, h * w, S).float() if cfg.joint_audio else None
        return DiTOutput(video, audio_out, KV(ks, vs, pos) if return_kv else None)

    @staticmethod
    def token_mask(F: int, n_ref: int, S: int, n_ctx: int, mask: str, chunk_frames: int, device) -> torch.Tensor | None:
        """Bool [Lq, n_ctx + Lq]: the ref frame sees itself; generated frames see the ref, every context
        token and this call's frames (all of them, or by block-causal chunks). None when all True.
        Decided on the host from the shapes and built once per shape: no device sync per forward."""
        causal = mask == "causal" and F > max(1, chunk_frames)
        if not n_ref and not causal:
            return None
        return _token_mask(F, n_ref, S, n_ctx, causal, max(1, chunk_frames), torch.device(device))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _starts(t: torch.Tensor, buf: torch.Tensor) -> bool:
    """Whether t is buf's first t.shape[1] tokens (the same memory and layout): KV.room's promise, checked on the
    host before a forward writes after them."""
    return (t.data_ptr() == buf.data_ptr() and t.stride() == buf.stride() and t.dtype == buf.dtype
            and t.shape[0] == buf.shape[0] and t.shape[2:] == buf.shape[2:] and t.shape[1] <= buf.shape[1])


def _predict(head: Head, tokens: torch.Tensor, e: torch.Tensor, sp: SequenceShards | None, lo: int, hi: int):
    """`head` on tokens [lo, hi) of every frame (tokens [B, F, S, dim], e [B, F, dim]). Under sequence
    parallelism it runs on all of the rank's tokens and the predictions are gathered, the other
    kind's rows (video / joint audio) dropped."""
    if sp is None:
        return head(tokens[:, :, lo:hi], e)
    return sp.gather(head(tokens, e))[:, :, lo:hi]


def null_condition(x: torch.Tensor) -> torch.Tensor:
    """What a dropped condition becomes, in training (condition dropout, stages/train/objectives.py)
    and in the samplers' unconditional pass (guidance): zeros (text features, speech features, the
    reference latent)."""
    return torch.zeros_like(x)


GUIDES = ("all", "text")   # what guidance's unconditional pass nulls: text and speech, or the text alone


def guided_conditions(text: torch.Tensor, audio: torch.Tensor | None, guide: str = "all"):
    """(text, speech) of one forward of classifier-free guidance, [2B, ...]: the conditional rows, then
    the unconditional ones, which null the text, and the speech too unless `guide` is "text"
    (guidance on the instruction alone: v_u keeps the speech, so lip sync is not guided away)."""
    if guide not in GUIDES:
        raise ValueError(f"guide is one of: {', '.join(GUIDES)}, not {guide!r}")
    text2 = torch.cat([text, null_condition(text)])
    if audio is None:
        return text2, None
    return text2, torch.cat([audio, null_condition(audio) if guide == "all" else audio])


def guided(both: torch.Tensor | None, scale) -> torch.Tensor | None:
    """A prediction of the 2B rows of a `guided_conditions` forward -> the guided B rows:
    u + scale (c - u), the conditional rows first (`scale`: a number or broadcastable to B rows)."""
    if both is None:
        return None
    c, u = both.chunk(2)
    return u + scale * (c - u)


def _key_mask(tok: torch.Tensor | None, valid: torch.Tensor, Lq: int) -> torch.Tensor:
    """The token mask (bool [Lq, n_ctx + Lq] or None: all True) of a forward whose context rows are padded
    (valid: bool [B, n_ctx]) -> bool [B, 1, Lq or 1, n_ctx + Lq]: no query attends to a row's padding. Every
    backend runs a masked call as SDPA."""
    keys = torch.cat([valid, valid.new_ones(valid.shape[0], Lq)], 1)[:, None, None, :]
    return keys if tok is None else tok[None, None] & keys


@functools.lru_cache(maxsize=8)
def _token_mask(F: int, n_ref: int, S: int, n_ctx: int, causal: bool, chunk_frames: int, device) -> torch.Tensor:
    with torch.inference_mode(False):   # cached: must serve training too, even if first built under inference
        Fq = n_ref + F
        frame_ok = torch.ones(Fq, Fq, dtype=torch.bool)
        if causal:
            chunk = torch.arange(F) // chunk_frames
            frame_ok[n_ref:, n_ref:] = chunk[:, None] >= chunk[None, :]
        if n_ref:
            frame_ok[:n_ref, n_ref:] = False
        tok = frame_ok.repeat_interleave(S, 0).repeat_interleave(S, 1)
        if n_ctx:
            ctx_ok = torch.ones(Fq * S, n_ctx, dtype=torch.bool)
            ctx_ok[:n_ref * S] = False
            tok = torch.cat([ctx_ok, tok], 1)
        return tok.to(device)


@functools.lru_cache(maxsize=8)
def _audio_rope(W: int, K: int, before: int, head_dim: int, device) -> tuple[torch.Tensor, ...]:
    """RoPE of the audio adapter (the same for every frame and every forward): queries at the middle of
    their own frame's K mel steps, keys at their step in the window of W frames."""
    with torch.inference_mode(False):   # cached: must serve training too, even if first built under inference
        steps = torch.arange(W * K, dtype=torch.float64)
        zero = torch.zeros_like(steps)
        k_rope = rope_angles(torch.stack([steps, zero, zero], 1), head_dim)
        q_rope = rope_angles(torch.tensor([[before * K + K / 2, 0.0, 0.0]], dtype=torch.float64), head_dim)
        return tuple(x.to(device) for x in (*q_rope, *k_rope))


def tensor_version(t: torch.Tensor) -> int:
    """How many times `t` was modified in place (an inference tensor keeps no count: 0)."""
    return 0 if t.is_inference() else t._version
