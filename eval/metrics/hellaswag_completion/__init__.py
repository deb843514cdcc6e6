"""The `hellaswag_completion` metric; `evaluate.load` reads `hellaswag_completion.py` from this folder."""
