"""Reasoning reward model (RRM) at work: prompts (`prompts`), robust output parsing (`parse`)."""
