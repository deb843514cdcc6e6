"""Evaluation metrics that ship with the project, loadable offline with `evaluate.load(<folder>)`."""
