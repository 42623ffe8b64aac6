"""Helpers shared by test modules (see common.py)."""
