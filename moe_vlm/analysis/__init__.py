"""Reading run directories back: plots and tables built from metrics.jsonl/summary.json."""
