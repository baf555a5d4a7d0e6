"""Model-independent training infrastructure: train state and optimizer (``state``), the jitted sharded train
step with gradient accumulation and NaN guard (``step``), Orbax checkpoints with resume (``checkpoint``), metrics
writers and meters (``metrics``), SIGTERM handling (``preemption``) and a reference loop (``generic_loop``) that
the SFT / GCPO / GRPO loops follow."""
