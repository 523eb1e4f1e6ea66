"""Profiling: measured latency lookup tables (LUTs) keyed by device signature,
their validation against end-to-end engines, and latency-accuracy curves.

Uses ``export``'s runners to time micro-models; never imports the pipeline stages.
"""
