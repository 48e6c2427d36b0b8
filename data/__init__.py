"""Prompt sources: dataset files and offline problem generators."""
