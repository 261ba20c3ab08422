"""Storage: URLs to filesystems, the store's layout, manifests, Parquet schemas and the DuckDB catalog."""
