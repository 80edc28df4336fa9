"""Few-shot training and evaluation CLIs: ``python -m training.finetune``, ``python -m training.evaluate``."""
