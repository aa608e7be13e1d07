"""Training: typed config, one loop, tasks, checkpoints and resume, DDP. See README's Training section."""

from lorakit.train.config import ConfigError, TrainConfig, load_config
from lorakit.train.loop import RunDirError, TrainingDivergedError, TrainResult, train
from lorakit.train.use import evaluate_run, predict

__all__ = ["ConfigError", "RunDirError", "TrainConfig", "TrainResult", "TrainingDivergedError", "evaluate_run",
           "load_config", "predict", "train"]
