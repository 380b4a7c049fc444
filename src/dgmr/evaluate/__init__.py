"""Evaluation of (pruned, distilled) vision models: the standard protocols on tensors
(:func:`knn_classify`, :func:`linear_probe`, :func:`zeroshot_classify`,
:func:`retrieval_recall`), speed (:func:`measure_speed`), folder wrappers
(:func:`eval_knn`, :func:`eval_linear`, :func:`eval_zeroshot`, :func:`eval_retrieval`,
:func:`eval_speed`) and the comparison report (:func:`render_report`)."""
from .datasets import ImageFolderSplit, ImageListDataset, eval_transform, read_captions
from .features import FeatureCache, extract_features, weights_hash
from .knn import knn_classify
from .linear import linear_probe
from .report import render_report
from .retrieval import retrieval_recall
from .speed import measure_speed
from .tasks import eval_knn, eval_linear, eval_retrieval, eval_speed, eval_zeroshot, save_result
from .zeroshot import clip_towers, imagenet_classnames, imagenet_templates, text_classifier, zeroshot_classify

__all__ = [
    "ImageFolderSplit", "ImageListDataset", "eval_transform", "read_captions", "FeatureCache", "extract_features",
    "weights_hash", "knn_classify", "linear_probe", "render_report", "retrieval_recall", "measure_speed", "eval_knn",
    "eval_linear", "eval_retrieval", "eval_speed", "eval_zeroshot", "save_result", "clip_towers",
    "imagenet_classnames", "imagenet_templates", "text_classifier", "zeroshot_classify",
]
