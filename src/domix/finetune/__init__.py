"""Stage 3: end-task fine-tuning of a task model, and loading one back.

`config` (options: shared, and one class per method), `methods` (the method registry),
`taskmodel` (the base with its head; task-model files), `train` (`finetune`), `evaluate`
(metrics, prediction, generation), `plots`.
"""
from .config import FinetuneConfig
from .evaluate import classification_metrics, evaluate_rows, generate_answers, predict_classify
from .methods import METHODS, get_method
from .taskmodel import build_model, load_task_base, load_task_model, read_spec
from .train import finetune

__all__ = ["FinetuneConfig", "METHODS", "build_model", "classification_metrics", "evaluate_rows", "finetune",
           "generate_answers", "get_method", "load_task_base", "load_task_model", "predict_classify", "read_spec"]
