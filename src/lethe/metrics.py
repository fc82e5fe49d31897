"""The scores every part of Lethe reports, defined once: summed next-token NLL over the scored
positions (training's loss, validation, eval.py), and perplexity from a mean NLL."""

import math

import torch.nn.functional as F


def summed_nll(model, batch):
    """Over a batch's scored positions (labels != -100): the summed next-token negative
    log-likelihood, the number of scored tokens, and how many the argmax predicts right (the
    accuracy of the synthetic tasks, whose only scored positions are their answers). A batch of
    packed documents resets the model at its "document_starts"."""
    starts = batch.get("document_starts")  # packed documents (data.cross_document=false)
    logits = model(batch["input_ids"]) if starts is None else model(batch["input_ids"], document_starts=starts)
    labels = batch["labels"]
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
    scored = labels != -100
    return nll, scored.sum(), (logits.argmax(-1).eq(labels) & scored).sum()


def perplexity(loss: float) -> float:
    """exp(mean NLL); inf where the exponential would overflow a float."""
    return math.exp(loss) if loss < 700 else math.inf
