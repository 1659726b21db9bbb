"""Tuning: data -> LoRA training -> evaluation -> baseline profile -> register.

Imports `registry` (never `serving`). Also builds the offline base models (`tinymodel`).
"""
