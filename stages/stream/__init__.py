"""The interactive streaming generator: engine (chunk loop, caches), inputs, outputs, web page."""
