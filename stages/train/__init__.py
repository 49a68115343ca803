"""Training stages: objectives, data, the shared loop (single process or torchrun + FSDP2)."""
