"""Reading run directories back: plots and tables built from metrics.jsonl/summary.json;
and the EP communication cost model (``cost_model``) that the EP benchmarks compare against."""
