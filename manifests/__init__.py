"""Parquet manifests, their pinned schemas, the DuckDB run catalog and stdin/stdout piping."""
