"""The fine-tuning trainer: `tuneloom train` and `python -m tuneloom.trainer`."""
