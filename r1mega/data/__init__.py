"""Prompt datasets: local JSONL/Parquet files and shipped synthetic verifiable tasks."""
