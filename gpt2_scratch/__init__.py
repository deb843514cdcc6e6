"""gpt2-scratch's own modules, under one name so that none of them shadows another project's:
the conversions, the training pieces, the export and conversion commands, and the user-error root.
The model file, the trainer, `data_prep` and `eval` stay at the top, as the design names them."""
