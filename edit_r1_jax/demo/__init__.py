"""The embedded default: the whole Edit-R1 pipeline on the synthetic editing world, offline, on a CPU."""
