"""Ablations: sweep grids over configs and seeds, their t-intervals and reports."""
