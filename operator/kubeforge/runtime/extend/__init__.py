"""ContextExtensionJob runtime: RoPE schedules, sequence-parallel attention, the stage loop and its evals."""
