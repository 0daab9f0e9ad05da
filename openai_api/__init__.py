"""`tuneloom api`: OpenAI's fine-tuning API (files, jobs, events, checkpoints, models, inference) over
tuneloom's trainer, registry and `tuneloom serve`, on one machine."""
