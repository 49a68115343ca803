"""Stage 2 trains every chunk on one sequence length (objectives.training_frames), so that its blocks can
be compiled with static shapes: the stream's first chunks, whose context has not filled the window, are
extended by the clip's next frames, which block-causal attention hides from them."""
import pytest
import torch

from stages.train.loop import TrainSettings
from stages.train.objectives import causal_forward, stream_frames, stream_sequence, training_frames
from tests.test_train import _one_layer_tiny


def test_early_chunks_are_extended_to_the_full_window_and_later_ones_are_the_engines():
    # window 3 + sink: ref + sink + 3 ring + chunk, 5 frames after the ref
    for i in range(4):
        frames, p = training_frames(i, 1, 3, True, 13)
        assert frames.tolist() == [0, 1, 2, 3, 4] and p == i
    for i, want in ((4, [0, 1, 2, 3, 4]), (7, [0, 4, 5, 6, 7]), (12, [0, 9, 10, 11, 12])):
        frames, p = training_frames(i, 1, 3, True, 13)
        assert frames.tolist() == want == stream_frames(i, 1, 3, True).tolist() and p == 4
    frames, p = training_frames(1, 2, 2, False, 13)                  # chunks of 2, no sink: 3 chunks
    assert frames.tolist() == [0, 1, 2, 3, 4, 5] and p == 2
    frames, p = training_frames(1, 1, 3, True, 3)                    # a clip too short to extend
    assert frames.tolist() == [0, 1] and p == 1


def test_the_extension_leaves_the_chunks_output_as_the_short_sequence_gives_it():
    cfg, model = _one_layer_tiny()
    d, (before, after) = cfg.dit, cfg.dit.audio_context
    g = torch.Generator().manual_seed(3)
    F, h, i = 6, cfg.height // 8, 2
    batch = {"video": torch.randn(1, d.in_dim, F, h, h, generator=g), "ref": torch.randn(1, d.in_dim, 1, h, h, generator=g),
             "text": torch.randn(1, F, d.text_len, d.text_dim, generator=g),
             "audio": torch.randn(1, before + F + after, cfg.audio.mel_per_latent, d.audio_dim, generator=g),
             "audio_latent": torch.randn(1, F, d.audio_latent_tokens, d.audio_latent_dim, generator=g)}

    clip_noise = torch.randn(batch["video"].shape, generator=g)

    def chunk_x0(frames, p, mask="causal"):
        seq = stream_sequence(batch, frames, before, after)
        m = len(frames)
        sig = torch.full((1, m), 0.7)
        sig[:, :p] = 0.2                                             # history at tau, the chunk and after at s
        noise = clip_noise[:, :, frames]
        x_t = (1 - sig[:, None, :, None, None]) * seq["video"] + sig[:, None, :, None, None] * noise
        with torch.no_grad():
            if mask == "causal":
                out = causal_forward(model, seq, x_t, seq["audio_latent"], sig, 1)
            else:
                out = model(x_t, sig * 1000.0, seq["text"], audio=seq["audio"], audio_latent=seq["audio_latent"],
                            ref=seq["ref"], mask=mask, chunk_frames=1, frame_pos=torch.arange(1, m + 1))
        return (x_t - sig[:, None, :, None, None] * out.video)[:, :, p:p + 1]

    short = stream_frames(i, 1, 3, True)                              # [0, 1, 2]: what the engine attends to
    long, p = training_frames(i, 1, 3, True, F)                      # [0 .. 4]
    want, got = chunk_x0(short, i), chunk_x0(long, p)
    err = float((got - want).abs().max())
    assert len(long) == 5 and err < 1e-5, err
    leak = float((chunk_x0(long, p, mask="full") - want).abs().max())    # the later frames seen: differs
    assert leak > 1e4 * max(err, 1e-9) and leak > 0.01 * float(want.abs().mean()), (leak, err)   # measured: 0.14 vs 2e-7


def test_compile_is_for_the_teachers():
    assert TrainSettings(stage="bidirectional", compile=True).compile
    assert TrainSettings(stage="causal", compile=True).compile
    with pytest.raises(ValueError, match="--compile is for the teachers"):
        TrainSettings(stage="autoencoder", compile=True)
