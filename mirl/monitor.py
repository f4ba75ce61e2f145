"""Looking at an encoder's features: extraction, and the online k-nearest-neighbour monitor.

A contrastive loss says little about whether the features are useful (it may sit near ln(K+1) for a
long time while they improve). The monitor classifies validation images by their nearest labelled
training images in feature space (weighted kNN, k 20, as in Wu et al. 2018) every epoch, so a user
sees within minutes whether pretraining learns. Its labels serve the monitor only, never training.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mirl.cache import DecodedImageCache
from mirl.datasets import DatasetDescription, ImageRecord
from mirl.inference import evaluation_outputs
from mirl.loaders import make_loader
from mirl.metrics import evaluate, primary_metric
from mirl.spatial import InputSpace


def extract_features(encoder: nn.Module, records: list[ImageRecord], num_classes: int, inputs: InputSpace,
                     device: torch.device, precision: torch.dtype | None, batch_size: int,
                     workers: int, cache: DecodedImageCache | None = None) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised features and label vectors of every readable record (unreadable ones left out)."""
    loader = make_loader(inputs.dataset(records, num_classes, cache), batch_size, workers, shuffle=False,
                         drop_last=False, seed=0)
    features, labels, _ = evaluation_outputs(encoder, loader, device, precision, inputs.evaluation_view)
    return F.normalize(torch.from_numpy(features), dim=1).numpy(), labels


def knn_scores(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, k: int = 20,
               temperature: float = 0.07) -> np.ndarray:
    """Per query, the neighbours' label vectors averaged with weights exp(cosine / temperature)."""
    similarity = queries @ bank.T
    k = min(k, bank.shape[0])
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
    weights /= weights.sum(axis=1, keepdims=True)
    return np.einsum("qk,qkc->qc", weights, bank_labels[nearest])


class KnnMonitor:
    """kNN quality of an encoder's features: labelled training images as the bank, val as queries."""

    def __init__(self, description: DatasetDescription, bank: list[ImageRecord], queries: list[ImageRecord],
                 inputs: InputSpace, device: torch.device, precision: torch.dtype | None, batch_size: int,
                 workers: int, cache: DecodedImageCache | None = None) -> None:
        self.description = description
        self.bank, self.queries = bank, queries
        self.settings = dict(num_classes=len(description.classes), inputs=inputs, device=device,
                             precision=precision, batch_size=batch_size, workers=workers, cache=cache)
        self.metric = primary_metric(description.multilabel)

    def __call__(self, encoder: nn.Module) -> dict[str, float | None]:
        bank, bank_labels = extract_features(encoder, self.bank, **self.settings)
        queries, query_labels = extract_features(encoder, self.queries, **self.settings)
        scores = knn_scores(bank, bank_labels, queries)
        metrics = evaluate(query_labels, scores, self.description.classes, self.description.multilabel)
        return {f"knn_{self.metric}": metrics[self.metric]}


def sample_records(records: list[ImageRecord], limit: int, seed: int) -> list[ImageRecord]:
    """At most `limit` records, drawn at random but reproducibly."""
    if len(records) <= limit:
        return records
    chosen = np.random.default_rng(seed).choice(len(records), size=limit, replace=False)
    return [records[i] for i in sorted(chosen)]
