"""HellaSwag accuracy from per-ending losses (completion style), as an `evaluate` metric.

Load it offline from this repository: `evaluate.load("eval/metrics/hellaswag_completion")`. It takes
what any scorer can produce, so it composes with other `evaluate` metrics and with other models:

    metric.compute(losses=[[l0, l1, l2, l3], ...], lengths=[[n0, n1, n2, n3], ...], references=[label, ...])

`losses` are the summed negative log-likelihoods of the four endings given the context, `lengths`
their token counts. Returns `acc` (lowest summed loss is right) and `acc_norm` (lowest mean loss per
token is right), the two numbers of build-nanogpt's `hellaswag.py`. `eval/hellaswag.py` in the same
repository produces these inputs; `tests/test_eval_hellaswag.py` checks that both agree.
"""

import datasets
import evaluate
import numpy as np

_CITATION = """\
@inproceedings{zellers2019hellaswag,
  title={HellaSwag: Can a Machine Really Finish Your Sentence?},
  author={Zellers, Rowan and Holtzman, Ari and Bisk, Yonatan and Farhadi, Ali and Choi, Yejin},
  booktitle={Proceedings of the 57th Annual Meeting of the Association for Computational Linguistics},
  year={2019}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    losses: for each example, the four endings' summed negative log-likelihoods (lower is likelier).
    lengths: for each example, the four endings' token counts.
    references: for each example, the index of the right ending (0..3).
Returns:
    acc: fraction of examples whose lowest summed loss is the right ending.
    acc_norm: fraction of examples whose lowest mean loss per token is the right ending.
Examples:
    >>> metric = evaluate.load("eval/metrics/hellaswag_completion")
    >>> metric.compute(losses=[[9.0, 4.0, 5.0, 6.0]], lengths=[[3, 1, 3, 3]], references=[2])
    {'acc': 0.0, 'acc_norm': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class HellaswagCompletion(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "losses": datasets.Sequence(datasets.Value("float64"), length=4),
                    "lengths": datasets.Sequence(datasets.Value("int64"), length=4),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, losses, lengths, references):
        losses, lengths, references = np.asarray(losses), np.asarray(lengths), np.asarray(references)
        if (lengths < 1).any():
            raise ValueError("every ending needs at least one token (a length of 0 found)")
        acc = losses.argmin(-1) == references
        acc_norm = (losses / lengths).argmin(-1) == references
        return {"acc": float(acc.mean()), "acc_norm": float(acc_norm.mean())}
