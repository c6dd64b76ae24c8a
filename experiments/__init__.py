"""Experiments on ringattn: ``python -m experiments.ablate`` sweeps every registered strategy."""
