"""Evaluation of GPT-2 checkpoints, ours or official: HellaSwag, validation loss, comparison, plots.

Each module exposes plain functions and a small command-line wrapper (`python -m eval.hellaswag`,
`eval.val_loss`, `eval.compare`, `eval.plot`). Importing the package itself loads nothing heavy;
the trainer imports `eval.hellaswag` and `eval.val_loss` directly.
"""
