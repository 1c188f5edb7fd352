"""Gradient-based samplers for Pyro models, and diagnostics shared by every sampler."""
