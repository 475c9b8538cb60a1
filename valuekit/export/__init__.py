"""From a run to a table: scores, weights and subsets of the user's table (Parquet or CSV, streamed), instruction
tables per task."""
