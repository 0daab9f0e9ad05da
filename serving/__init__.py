"""Serving adapters with vLLM."""
