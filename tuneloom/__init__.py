"""Tuneloom: fine-tune LLMs on Kubernetes and serve the adapters with vLLM."""

__version__ = "0.1.0"
