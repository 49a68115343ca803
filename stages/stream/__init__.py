"""The interactive streaming generator: engine (chunk loop, caches), inputs, outputs (the live page: stages/serve/single.py)."""
