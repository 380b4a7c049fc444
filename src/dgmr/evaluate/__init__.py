"""Evaluation of (pruned, distilled) vision models: the standard protocols on tensors
(:func:`knn_classify`, :func:`linear_probe`, :func:`clip_benchmark_probe`, :func:`zeroshot_classify`,
:func:`retrieval_recall`), speed (:func:`measure_speed`), folder wrappers
(:func:`eval_knn`, :func:`eval_linear`, :func:`eval_zeroshot`, :func:`eval_retrieval`,
:func:`eval_speed`) and clip_benchmark-compatible result files
(:func:`with_clip_benchmark_fields`, :func:`from_clip_benchmark`)."""
from ..data.labeled import ImageFolderSplit, ImageListDataset, read_captions
from ..models.transforms import crop_transform as eval_transform
from .features import FeatureCache, extract_features, weights_hash
from .knn import knn_classify
from .linear import linear_probe
from .linear_cb import clip_benchmark_probe
from .metrics import classification_metrics, mean_per_class_recall
from .results import from_clip_benchmark, with_clip_benchmark_fields
from .retrieval import retrieval_recall
from .settings import FeatureSettings, KnnSettings, LinearSettings, RetrievalSettings, SpeedSettings, ZeroshotSettings
from .speed import measure_speed
from .tasks import eval_knn, eval_linear, eval_retrieval, eval_speed, eval_zeroshot, save_result
from .zeroshot import clip_towers, imagenet_classnames, imagenet_templates, text_classifier, zeroshot_classify

__all__ = [
    "ImageFolderSplit", "ImageListDataset", "eval_transform", "read_captions", "FeatureCache", "extract_features",
    "weights_hash", "knn_classify", "linear_probe", "retrieval_recall", "measure_speed", "eval_knn",
    "eval_linear", "eval_retrieval", "eval_speed", "eval_zeroshot", "save_result", "clip_towers",
    "imagenet_classnames", "imagenet_templates", "text_classifier", "zeroshot_classify", "clip_benchmark_probe",
    "classification_metrics", "mean_per_class_recall", "FeatureSettings", "KnnSettings", "LinearSettings",
    "RetrievalSettings", "SpeedSettings", "ZeroshotSettings", "from_clip_benchmark", "with_clip_benchmark_fields",
]
