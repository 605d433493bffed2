"""Training objectives, one module each, and what the rest of tuneforge knows about them.

facts.py: one row of facts per method (torch-free, read by data/, plan/, fast/, track/ and the loop);
objective.py: the Objective interface every method implements; build.py: a config's objective;
run.py: an objective run over micro-batches. This package imports no torch, so plan/ can read the facts.
"""
