"""Parallelism applied to built models: expert parallelism (all-to-all dispatch), process layout."""
