"""The streaming engine against the model's own full-sequence forward (the oracle): windowed
streaming equals block-causal generation, the caches are what recomputation gives, positions are
re-assigned inside the window, resources stay flat, and instructions act from the next chunk."""
from __future__ import annotations

import dataclasses
import resource

import pytest
import torch

from models.config import PRESETS, DiTConfig
from models.dit import KV, DiT
from models.flow import sigmas
from stages.stream.engine import ChunkInputs, StreamEngine, StreamSettings

TINY = PRESETS["tiny"].replace(height=32, width=32)


def scrambled(cfg: DiTConfig, seed=0) -> DiT:
    torch.manual_seed(seed)
    m = DiT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return m


def rel(a, b):
    return float((a - b).norm() / b.norm())


def conditions(n_chunks, cf, seed=3, cfg=TINY):
    g = torch.Generator().manual_seed(seed)
    d = cfg.dit
    text = torch.randn(1, 5, d.text_dim, generator=g)
    audio = torch.randn(1, n_chunks * cf + sum(d.audio_context), 16, d.audio_dim, generator=g)  # + speech context
    ref = torch.randn(1, d.in_dim, 1, cfg.height // 8, cfg.width // 8, generator=g)
    return text, audio, ref


def run_engine(model, st, n_chunks, seed=0, cfg=TINY, texts=None):
    text, audio, ref = conditions(n_chunks, st.chunk_frames, cfg=cfg)
    eng = StreamEngine(model, cfg, st, seed=seed)
    eng.start(ref)
    outs = []
    for j in range(n_chunks):
        s = slice(j * st.chunk_frames, (j + 1) * st.chunk_frames + sum(cfg.dit.audio_context))
        outs.append(eng.step(ChunkInputs(texts[j] if texts else text, audio[:, s])))
    return eng, outs


def reference_generation(model, st, n_chunks, seed=0, cfg=TINY):
    """Block-causal sampling over the whole growing sequence: chunk j, step k denoises
    [ref | clean chunks < j at t=0 | chunk j at sigma_k] with mask='causal', by st.sampler (x0 and
    renoise, or Euler steps). Same noise draws."""
    text, audio, ref = conditions(n_chunks, st.chunk_frames, cfg=cfg)
    g = torch.Generator().manual_seed(seed)
    d, cf = cfg.dit, st.chunk_frames
    sig = sigmas(st.steps, st.shift)
    vs = (1, d.in_dim, cf, cfg.height // 8, cfg.width // 8)
    as_ = (1, cf, d.audio_latent_tokens, d.audio_latent_dim)
    hist_v, hist_a, outs = [], [], []
    for j in range(n_chunks):
        x, xa = torch.randn(vs, generator=g), torch.randn(as_, generator=g)
        for k, s in enumerate(sig):
            xs = torch.cat(hist_v + [x], 2)
            xas = torch.cat(hist_a + [xa], 1)
            t = torch.cat([torch.zeros(j * cf), torch.full((cf,), s * 1000.0)])[None]
            with torch.no_grad():
                out = model(xs, t, text, audio=audio[:, : (j + 1) * cf + sum(d.audio_context)], audio_latent=xas, ref=ref, mask="causal",
                            chunk_frames=cf)
            x0 = x - s * out.video[:, :, -cf:]
            xa0 = xa - s * out.audio[:, -cf:]
            if k < len(sig) - 1 and st.sampler == "euler":       # the flow ODE: no noise drawn
                x = x + (sig[k + 1] - s) * out.video[:, :, -cf:]
                xa = xa + (sig[k + 1] - s) * out.audio[:, -cf:]
            elif k < len(sig) - 1:
                x = (1 - sig[k + 1]) * x0 + sig[k + 1] * torch.randn(vs, generator=g)
                xa = (1 - sig[k + 1]) * xa0 + sig[k + 1] * torch.randn(as_, generator=g)
        hist_v.append(x0)
        hist_a.append(xa0)
        outs.append((x0, xa0))
    return outs, (text, audio, ref)


@pytest.mark.parametrize("cf, sampler", [(1, "renoise"), (2, "renoise"), (2, "euler")])
def test_streaming_with_a_large_window_equals_block_causal_generation(cf, sampler):
    model = scrambled(TINY.dit)
    st = StreamSettings(chunk_frames=cf, steps=3, window=8 * cf, twin=False, sampler=sampler)
    _, outs = run_engine(model, st, 5)
    ref_outs, _ = reference_generation(model, st, 5)
    for j, (o, (v, a)) in enumerate(zip(outs, ref_outs)):
        assert rel(o.video, v) < 1e-4, j
        assert rel(o.audio, a) < 1e-4, j


@pytest.mark.parametrize("guidance", [1.0, 2.0])         # guided: the caches are still the conditional pass's
def test_twin_caches_equal_recomputation(guidance):
    model = scrambled(TINY.dit)
    st = StreamSettings(chunk_frames=1, steps=3, window=8, twin=True, noisy_step=1, guidance=guidance)
    eng, outs = run_engine(model, st, 5)
    text, audio, ref = conditions(5, 1)
    S, buf = eng.buffers.S, eng.buffers
    clean = torch.cat([o.video for o in outs], 2)
    clean_a = torch.cat([o.audio for o in outs], 1)
    with torch.no_grad():
        full_clean = model(clean, torch.zeros(1, 5), text, audio=audio, audio_latent=clean_a, ref=ref,
                           mask="causal", return_kv=True).kv
    n = len(full_clean)                                   # ref + sink + 4 ring chunks, all clean
    full_clean = model.rotate(full_clean)                 # the buffers keep keys rotated (at positions 0..5 here)
    for i in (0, len(full_clean.k) - 1):
        assert rel(buf.k["clean"][i][:, :n], full_clean.k[i]) < 1e-5
        assert rel(buf.v["clean"][i][:, :n], full_clean.v[i]) < 1e-5
    # noisy cache of chunk j (j >= 1): its state at step 1, computed over the noisy states of 1..j-1
    noisy_states = torch.cat([outs[0].video] + [o.states[1] for o in outs[1:]], 2)
    s1 = sigmas(3)[1] * 1000.0
    t = torch.tensor([[0.0] + [s1] * 4])
    noisy_audio = torch.cat([outs[0].audio] + [o.audio_states[1] for o in outs[1:]], 1)
    with torch.no_grad():
        full_noisy = model.rotate(model(noisy_states, t, text, audio=audio, audio_latent=noisy_audio, ref=ref,
                                        mask="causal", return_kv=True).kv)
    a = 2 * S                                             # skip ref and sink: those are clean in both sets
    for i in (0, len(full_noisy.k) - 1):
        assert rel(buf.k["noisy"][i][:, a:n], full_noisy.k[i][:, a:]) < 1e-5
        assert rel(buf.v["noisy"][i][:, a:n], full_noisy.v[i][:, a:]) < 1e-5
        assert rel(buf.k["noisy"][i][:, a:n], buf.k["clean"][i][:, a:n]) > 1e-3     # they are different caches


def test_sliding_window_reassigns_positions_of_cached_keys():
    """One block: cached keys depend only on their own tokens, so after the window has slid the
    engine must equal a fresh forward over exactly [ref | sink | last W frames | chunk] laid out
    at window positions. The engine keeps keys at absolute positions (the window layout shifted: the same
    offsets); wrong offsets (e.g. the ref left at 0 while the chunks move on) would break the equality."""
    cfg = TINY.replace(dit=dataclasses.replace(TINY.dit, num_layers=1))
    model = scrambled(cfg.dit)
    st = StreamSettings(chunk_frames=1, steps=2, window=3, twin=False)
    n = 9
    eng, outs = run_engine(model, st, n, cfg=cfg)
    assert eng.buffers.chunks_in_ring == n - 1 and max(eng.buffers.frame_positions()[1].tolist()) == 1 + 1 + 3
    text, audio, ref = conditions(n, 1, cfg=cfg)
    # last chunk: context = ref, sink (chunk 0), chunks n-4..n-2; recompute with states of the last chunk
    window = [0] + list(range(n - 4, n - 1))
    hist = torch.cat([outs[c].video for c in window], 2)
    hist_a = torch.cat([outs[c].audio for c in window], 1)
    last = outs[-1]
    sig = sigmas(st.steps, st.shift)
    x, xa_last = last.states[-1], last.audio_states[-1]
    with torch.no_grad():
        out = model(torch.cat([hist, x], 2), torch.tensor([[0.0] * 4 + [sig[-1] * 1000.0]]), text,
                    # one layer: history keys come before the audio adapter, so only the last frame's
                    # speech (with its context) matters; the first 4 rows fill the history's places
                    audio=torch.cat([audio[:, :4], audio[:, n - 1:]], 1),
                    audio_latent=torch.cat([hist_a, xa_last], 1), ref=ref, mask="causal")
    x0 = x - sig[-1] * out.video[:, :, -1:]
    assert rel(x0, last.video) < 1e-5


def twin_rule_error(mutant: str | None = None, n: int = 9) -> float:
    """The TwinCache rule, checked step by step on the last chunk of a stream whose ring has wrapped:
    a one-layer model (history keys depend only on their own tokens) with sharpened attention, so
    positions and cache contents show. Step k < last must equal a fresh forward over [ref | sink clean |
    ring chunks, oldest first, at their noisy_step state | current state]; the last step the same with
    the ring clean. Renoising is noise-free so each step's x0 is read back from the next state.
    `mutant` breaks the engine on purpose: "final_reads_noisy" (the last step attends to the noisy
    cache) or "noisy_wrong_slot" (after a wrap the noisy cache lands one slot off). Returns the largest
    relative error over the steps."""
    from stages.stream import engine as engine_mod
    cfg = TINY.replace(dit=dataclasses.replace(TINY.dit, num_layers=1))
    model = scrambled(cfg.dit)
    with torch.no_grad():
        model.blocks[0].self_attn.norm_q.weight.mul_(4.0)            # peaky attention: positions matter
        model.blocks[0].self_attn.norm_k.weight.mul_(4.0)
    st = StreamSettings(chunk_frames=1, steps=3, window=3, twin=True, noisy_step=1)
    patches = pytest.MonkeyPatch()
    if mutant == "final_reads_noisy":
        real = engine_mod.denoise_chunk
        patches.setattr(engine_mod, "denoise_chunk", lambda m, x, xa, sig, inp, noisy, clean, *a:
                        real(m, x, xa, sig, inp, noisy, noisy, *a))
    elif mutant == "noisy_wrong_slot":
        real_write = engine_mod.ContextBuffers.write_ring

        def write_ring(buf, clean, noisy):
            if buf.chunks_in_ring >= buf.slots:                       # after the first wrap
                slot = (buf.chunks_in_ring + 1) % buf.slots
                buf.write(("noisy",), noisy, buf.n_fixed + slot * buf.cf)
                noisy = KV([k[:, :0] for k in noisy.k], [v[:, :0] for v in noisy.v], noisy.pos[:0])
            real_write(buf, clean, noisy)
        patches.setattr(engine_mod.ContextBuffers, "write_ring", write_ring)
    elif mutant is not None:
        raise ValueError(mutant)
    try:
        text, audio, ref = conditions(n, 1, cfg=cfg)
        eng = StreamEngine(model, cfg, st, seed=0)
        eng._renoise = lambda x0, xa0, s: ((1 - s) * x0, (1 - s) * xa0)
        eng.start(ref)
        outs = [eng.step(ChunkInputs(text, audio[:, j:j + 1 + sum(cfg.dit.audio_context)])) for j in range(n)]
    finally:
        patches.undo()
    sig, last = sigmas(st.steps, st.shift), outs[-1]
    ring = list(range(n - 1 - st.window, n - 1))                    # oldest first
    worst = 0.0
    for k, s in enumerate(sig):
        final = k == len(sig) - 1
        hist = [(o.video, o.audio) if final or o is outs[0] else (o.states[st.noisy_step], o.audio_states[st.noisy_step])
                for o in [outs[0]] + [outs[c] for c in ring]]
        level = 0.0 if final else sig[st.noisy_step]
        t = torch.tensor([[0.0] + [level * 1000.0] * len(ring) + [s * 1000.0]])
        with torch.no_grad():
            out = model(torch.cat([h[0] for h in hist] + [last.states[k]], 2), t, text,
                        audio=torch.cat([audio[:, :len(hist)], audio[:, n - 1:]], 1),
                        audio_latent=torch.cat([h[1] for h in hist] + [last.audio_states[k]], 1),
                        ref=ref, mask="causal")
        want = last.states[k] - s * out.video[:, :, -1:]
        got = last.video if final else last.states[k + 1] / (1 - sig[k + 1])
        worst = max(worst, rel(got, want))
    return worst


def test_twin_cache_rule_holds_after_the_ring_wraps():
    assert twin_rule_error() < 2e-6                  # float32 floor: measured 2.4e-7


@pytest.mark.parametrize("mutant", ["final_reads_noisy", "noisy_wrong_slot"])
def test_twin_cache_rule_catches_mutants(mutant):
    assert twin_rule_error(mutant) > 1e-4            # measured 5e-4 for the wrong slot, far above the floor


def test_an_instruction_changes_the_next_chunk_and_no_earlier_one():
    model = scrambled(TINY.dit)
    st = StreamSettings(window=4)
    text, _, _ = conditions(6, 1)
    other = torch.randn_like(text)
    _, base = run_engine(model, st, 6)
    _, changed = run_engine(model, st, 6, texts=[text] * 3 + [other] * 3)
    for j in range(3):
        assert torch.equal(base[j].video, changed[j].video)
    assert rel(changed[3].video, base[3].video) > 1e-3


def test_switch_steps_takes_another_schedule_and_refuses_another_layout():
    """A running engine switched to fewer steps denoises its next chunk on that schedule (the chunk differs from the
    unswitched engine's, the same on a replay); a switch that would change the caches' layout (the window) is
    refused and changes nothing."""
    model = scrambled(TINY.dit)
    st, fewer = StreamSettings(window=4, twin=False), StreamSettings(window=4, twin=False, steps=2)
    text, audio, ref = conditions(3, st.chunk_frames)
    a, b = StreamEngine(model, TINY, st, seed=0), StreamEngine(model, TINY, st, seed=0)
    a.start(ref)
    b.start(ref)
    cut = lambda j: audio[:, j * st.chunk_frames:(j + 1) * st.chunk_frames + sum(TINY.dit.audio_context)]  # noqa: E731
    for j in range(2):
        assert torch.equal(a.step(ChunkInputs(text, cut(j))).video, b.step(ChunkInputs(text, cut(j))).video)
    with pytest.raises(ValueError, match="cannot change window; only its steps"):
        a.switch_steps(StreamSettings(window=5, twin=False, steps=2))
    assert a.st == st and a.sig == sigmas(st.steps, st.shift)
    a.switch_steps(fewer)
    assert a.st == fewer and a.sig == sigmas(2, fewer.shift)
    two, three = a.step(ChunkInputs(text, cut(2))), b.step(ChunkInputs(text, cut(2)))
    assert rel(two.video, three.video) > 1e-3                    # control: the schedule did change the chunk
    d = StreamEngine(model, TINY, st, seed=0)                    # the same switch again: the same chunk
    d.start(ref)
    for j in range(2):
        d.step(ChunkInputs(text, cut(j)))
    d.switch_steps(fewer)
    assert torch.equal(d.step(ChunkInputs(text, cut(2))).video, two.video)


@pytest.mark.slow
def test_a_thousand_chunks_use_constant_memory():
    """Structure only (DESIGN.md: no timing assertions in tests; benchmarks/stream_fps.py measures
    per-chunk latency): the buffers are never reallocated, the context's length and window layout stay
    bounded after the window fills (its absolute positions move on with the stream, the same offsets), and
    peak memory stays flat. One block: the buffers' bookkeeping is per
    block and the same for every block, and a chunk costs the forward passes' fixed overhead, so a
    second block only doubled the time of the chunks (every default setting kept: twin caches,
    3 steps, sink). 1000 chunks (was 2000): the 4-chunk ring still wraps ~250 times, the structure is
    checked at every chunk, and the peak-RSS bound is the old one scaled to the shorter span (50 MiB over
    chunks 200-2000 -> 21 MiB over 200-1000), so a leak of 27 KiB a chunk fails (before: 28.5; measured growth 0)."""
    cfg = TINY.replace(dit=dataclasses.replace(TINY.dit, num_layers=1))
    model = DiT(cfg.dit).eval()
    st = StreamSettings(window=4)
    text, audio, ref = conditions(1, 1, cfg=cfg)
    eng = StreamEngine(model, cfg, st)
    eng.start(ref)
    ptrs = [t.data_ptr() for s in eng.buffers.k for t in eng.buffers.k[s]]
    rss, lengths = [], set()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                         # ops this small gain nothing from a second thread
    try:
        for j in range(1000):
            eng.step(ChunkInputs(text, audio))
            if j >= 5:                               # ref + sink + a full window from here on
                ctx, nxt = eng.buffers.context("clean")
                frames, layout = eng.buffers.frame_positions()             # the window layout: bounded
                lengths.add((len(ctx), int(frames.max()), tuple(layout.tolist())))
                assert nxt.tolist() == [2 + j]                             # chunk j + 1 at its absolute frame
                assert int(ctx.pos[:, 0].max()) == 1 + j and int(ctx.pos[:, 0].min()) == j - 4   # ref at 5 behind
            if j % 100 == 99:
                rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    finally:
        torch.set_num_threads(threads)
    assert [t.data_ptr() for s in eng.buffers.k for t in eng.buffers.k[s]] == ptrs     # no reallocation
    assert len(lengths) == 1                                                           # one context shape
    (length, last_frame, nxt), = lengths
    assert length == (1 + 1 + 4) * eng.buffers.S and last_frame == 5 and nxt == (6,)  # bounded positions
    assert rss[-1] - rss[1] < 21 * 1024          # peak RSS (KiB) flat: 800 chunks x 27 KiB would exceed it


def test_context_chunks_lay_out_sink_and_the_newest_window():
    from stages.stream.engine import context_chunks
    assert context_chunks(0, 2, True) == [] and context_chunks(1, 2, True) == [0]
    assert context_chunks(2, 2, True) == [0, 1] and context_chunks(5, 2, True) == [0, 3, 4]
    assert context_chunks(5, 2, False) == [3, 4] and context_chunks(1, 3, False) == [0]


def test_compiled_blocks_stream_what_the_eager_ones_do():
    """DiT.compile_blocks (vidu stream --compile): the same chunks as eager within float32 rounding, through
    the window's growing context and past its wrap (the lengths that become symbolic); and a block that
    computes something else is caught (negative control)."""
    st = StreamSettings(chunk_frames=1, steps=3, window=2)
    eager = [o.video for o in run_engine(scrambled(TINY.dit), st, 5)[1]]
    compiled_model = scrambled(TINY.dit)
    compiled_model.compile_blocks()
    compiled = [o.video for o in run_engine(compiled_model, st, 5)[1]]
    torch._dynamo.reset()
    assert max(rel(a, b) for a, b in zip(compiled, eager)) < 1e-4
    broken = scrambled(TINY.dit)
    with torch.no_grad():
        broken.blocks[-1].ffn[2].bias.add_(1e-2)
    assert max(rel(o.video, b) for o, b in zip(run_engine(broken, st, 5)[1], eager)) > 1e-3


def test_a_block_inductor_cannot_compile_runs_eagerly(monkeypatch):
    """Inductor failing on the blocks (as on an H100 in session 56) leaves the stream running eagerly: the
    eager chunks bit for bit, no exception; without the fallback the same failure ends the run."""
    import torch._dynamo.config as dynamo
    import torch._inductor.compile_fx as compile_fx

    def fail(*args, **kwargs):
        raise AssertionError("simulated Inductor failure")
    st = StreamSettings(chunk_frames=1, steps=3, window=2)
    eager = [o.video for o in run_engine(scrambled(TINY.dit), st, 2)[1]]
    monkeypatch.setattr(compile_fx, "compile_fx", fail)
    try:
        model = scrambled(TINY.dit)
        model.compile_blocks()
        compiled = [o.video for o in run_engine(model, st, 2)[1]]
        assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
        torch._dynamo.reset()
        with dynamo.patch(suppress_errors=False), pytest.raises(Exception, match="simulated Inductor failure"):
            run_engine(model, st, 2)                                # negative control: no fallback
    finally:
        torch._dynamo.reset()


def _moved_state(eng: StreamEngine, chunks: int) -> dict:
    """eng's state as if `chunks` more chunks (a multiple of the ring's slots) had gone by: the ring chunks'
    indices and keys moved that far (keys rotated by the frames it adds: rotations compose), the sink and ref
    where they are (their keys before RoPE are what the engine re-rotates)."""
    from models.rope import apply_rope, frame_shift_angles
    buf = eng.buffers
    assert chunks % buf.slots == 0
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in eng.state().items()}
    turn = frame_shift_angles(chunks * buf.cf, buf.head_dim, torch.device("cpu"))
    a = buf.n_fixed * buf.S
    for s in buf.k:
        for i in range(len(buf.k[s])):
            k = state[f"k.{s}.{i}"]
            k[:, a:] = apply_rope(k[:, a:], *turn)
    state["chunks"] += chunks
    state["chunks_in_ring"] += chunks
    state["slot_chunk"] = [c + chunks for c in state["slot_chunk"]]
    return state


def _continued(model, st, state, inputs) -> list[torch.Tensor]:
    eng = StreamEngine(model, TINY, st)
    eng.start(inputs[0][2])
    eng.load_state(state)
    return [eng.step(ChunkInputs(text, audio)).video for (text, audio, _) in inputs[1:]]


def test_a_stream_a_million_frames_in_attends_as_it_did_at_its_start(monkeypatch):
    """Cached keys are rotated once, at their absolute frame positions (ContextBuffers): hours into a stream the
    positions pass 10^6 frames. The same history moved 10^6 frames on (999,999 chunks of one frame) streams the
    same next chunks, because RoPE angles are computed in float64 (models.rope.rope_angles). The model's q/k norm
    weights are scaled up so attention is sharp enough to read positions (scrambled weights alone attend almost
    uniformly: even keys left 10^6 frames off moved the output by 2e-4). Controls: keys moved without their
    rotation (wrong positions) and float32 angles (what a float32 position table gives) both go elsewhere."""
    import models.rope as rope_mod
    model = scrambled(TINY.dit)
    with torch.no_grad():
        for b in model.blocks:
            b.self_attn.norm_q.weight.mul_(30)
            b.self_attn.norm_k.weight.mul_(30)
    st = StreamSettings(chunk_frames=1, steps=3, window=3, twin=True, noisy_step=1)
    n, more = 7, 3
    text, audio, ref = conditions(n + more, 1)
    eng = StreamEngine(model, TINY, st)
    eng.start(ref)
    for j in range(n):                                  # the ring wrapped twice: ref + sink + 3 slots
        eng.step(ChunkInputs(text, audio[:, j:j + 1 + sum(TINY.dit.audio_context)]))
    inputs = [(text, audio[:, j:j + 1 + sum(TINY.dit.audio_context)], ref) for j in range(n - 1, n + more)]
    at_start = _continued(model, st, _moved_state(eng, 0), inputs)

    def errors(state) -> list[float]:
        return [rel(m, s) for m, s in zip(_continued(model, st, state, inputs), at_start)]

    far = _moved_state(eng, 999_999)
    assert far["chunks"] == 1_000_006
    assert max(errors(far)) < 2e-6                      # measured 2-3e-7
    unturned = dict(far, **{k: v for k, v in eng.state().items() if k.startswith(("k.clean.", "k.noisy."))})
    assert min(errors(unturned)) > 1e-2                 # positions matter (measured 0.07-0.11)

    def float32_angles(pos, head_dim):
        freqs = rope_mod._device_freqs(head_dim, pos.device)
        p = pos.to(torch.float32)
        ang = torch.cat([torch.outer(p[:, i], freqs[i].float()) for i in range(3)], dim=1)
        return ang.cos(), ang.sin()

    monkeypatch.setattr(rope_mod, "rope_angles", float32_angles)
    rope_mod.grid_tables.cache_clear()
    try:
        assert max(errors(_moved_state(eng, 999_999))) > 5e-5   # measured 1.2-3.6e-4: >= 400x the float64 error
    finally:
        monkeypatch.undo()
        rope_mod.grid_tables.cache_clear()
