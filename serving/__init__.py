"""Serving: one base model behind a BentoML service, many adapters hot-swapped per request.

Imports `registry` (never `tuning`).
"""
