"""Evaluation of reward models and editors (preference accuracy; editing benchmarks)."""
