"""The latent codec of a stream: what encodes the reference image and decodes generated chunks.

Always a TAEHV (models/taehv.py): the autoencoder a checkpoint was trained with (stages/train/, the
file its "sampling" metadata names beside it, e.g. ../codec.safetensors), taew2_1 weights given as
--decoder-weights for Wan-latent models, or random weights when there is neither. The session uses

    dec.config.latent_channels
    dec.encode_video(frames)        # [N, T, 3, H, W] in [0, 1] -> [N, T', C, H/8, W/8]
    dec.stream_decoder().push(z)    # [N, t, C, h, w] -> the frames they complete, [N, T, 3, H, W] in [0, 1]

and the stream decoder is the same weights as the codec the model was trained on.
"""
from __future__ import annotations

from pathlib import Path

from models.checkpoint import CheckpointError, checkpoint_file, load_taehv
from models.taehv import TAEHV
from stages.stream.events import StreamError


def load_codec(ckpt: str | Path | None, trained: dict | None, decoder_weights: str | Path | None,
               device="cpu") -> tuple[TAEHV, list[str]]:
    """(decoder, notes for the user) for a model checkpoint `ckpt` whose sampling metadata is `trained`."""
    codec = (trained or {}).get("codec") or {}
    kind = codec.get("kind")
    if kind == "pca":
        raise StreamError("the checkpoint was trained on PCA-codec latents, which vidu no longer decodes; "
                          "train it again with an autoencoder (vidu train --stage autoencoder, then --codec)")
    if kind == "taehv":
        if decoder_weights:
            raise StreamError("the checkpoint was trained with its own autoencoder (beside it, "
                              f"{codec['file']}); --decoder-weights decodes another latent space")
        path = checkpoint_file(ckpt).parent / codec["file"]
        if not path.is_file():
            raise StreamError(f"the checkpoint was trained with the autoencoder {path}, which is missing")
        try:
            return load_taehv(path, device), []
        except CheckpointError as e:
            raise StreamError(str(e)) from None
    if decoder_weights:
        return load_taehv(decoder_weights, device), []
    return TAEHV().to(device).eval(), ["no --decoder-weights (taew2_1.pth): TAEHV with random weights"]
