"""The `vidu` command line: thin adapters over stages/."""
__version__ = "0.1.0"
