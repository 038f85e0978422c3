"""edgekit's device side: verify bundles, serve them, report drift.

This package runs on edge devices, so it never imports torch, transformers or
edgekit (tests/device_agent/test_light_imports.py checks that).
"""
