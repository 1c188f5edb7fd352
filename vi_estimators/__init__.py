"""Variational objectives written as programs, transformed into unbiased gradient estimators."""
