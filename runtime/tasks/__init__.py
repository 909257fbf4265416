"""Embedded tasks whose data a job of the graph generates (the spec's ``data.generator``)."""

from runtime.tasks.arithmetic import ArithmeticConfig, Example, generate_splits, write_dataset

__all__ = ["ArithmeticConfig", "Example", "generate_splits", "write_dataset"]
