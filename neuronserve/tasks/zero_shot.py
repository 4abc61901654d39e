"""zero-shot-classification: any labels, named at request time, scored by an NLI model (text-pair classification).

Each text is paired with one hypothesis per candidate label (`hypothesis_template`, default "This example is
{}."), and the model's entailment logits score the labels as the transformers pipeline does: a softmax over the
labels' entailment logits, or with `multi_label` (or a single label) each label on its own, the softmax of its
entailment against its contradiction logit. Inputs: "text" or a list of texts; parameters `candidate_labels`
(required: a list, or one comma-separated string), `multi_label`, `hypothesis_template`. The answer per text is
[{"label", "score"}, ...] best first, as the Hugging Face Inference API answers it.
"""
from __future__ import annotations

import numpy as np

from neuronserve.tasks.base import TRUNCATION, BadParameter, Pair, Request, Task, boolean, listed, softmax, string, \
    strings, text
from neuronserve.tasks.classification import TextClassification, logits

TEMPLATE = "This example is {}."


class ZeroShotClassification(Task):
    name = "zero-shot-classification"
    auto_class = TextClassification.auto_class
    output_names = TextClassification.output_names
    parameters = {"candidate_labels": strings(), "multi_label": boolean, "hypothesis_template": string, **TRUNCATION}
    warmup = (["A new moon was seen over the hills.", "This example is astronomy."],
              ["A new moon was seen over the hills.", "This example is cooking."])

    def parse(self, inputs, parameters, manifest) -> Request:
        options = self.options(parameters)
        labels = options["candidate_labels"]
        if not labels:
            raise BadParameter("parameters.candidate_labels: required: the labels to score each text against")
        template = options["hypothesis_template"] or TEMPLATE
        try:
            hypotheses = [template.format(label) for label in labels]
        except (IndexError, KeyError, ValueError) as e:
            raise BadParameter(f"parameters.hypothesis_template: {template!r} must hold one {{}} for the label: "
                               f"{e}") from None
        if hypotheses[0] == template:
            raise BadParameter(f"parameters.hypothesis_template: {template!r} has no {{}} for the label")
        texts, many = listed(inputs, text)
        items = [Pair(t, h) for t in texts for h in hypotheses]
        multi = bool(options["multi_label"]) or len(labels) == 1
        entailment = manifest.entailment
        contradiction = -1 if entailment == 0 else 0

        def finish(answers: list):
            logits = np.asarray(answers, dtype=np.float64).reshape(len(texts), len(labels), -1)
            if multi:
                scores = softmax(logits[..., [contradiction, entailment]])[..., 1]
            else:
                scores = softmax(logits[..., entailment])
            out = []
            for row in scores:
                order = np.argsort(-row, kind="stable")
                out.append([{"label": labels[i], "score": float(row[i])} for i in order])
            return out if many else out[0]

        return Request(items, options, finish)

    def head(self, input_names, **options):
        return logits

    def decode(self, manifest, outputs, items, options, tokenizer):
        """Each pair's raw logits: `finish` scores the labels of a text together."""
        return outputs[0][:len(items)].tolist()
