"""The ablation harness: generated tasks, seeds x arms training, statistics, verdicts."""
