"""Turns many requests into few model steps: targets, scheduling, workers. No HTTP in here."""

from .errors import DeadlineExceeded, EngineError, EngineStopped, EngineUnavailable, QueueFull, StepFailed
from .observer import EngineObserver
from .scheduler import IterationRecord, TokenizeResult
from .targets import ModelLimits, Target, TargetError, check_token_ids, parse_target
from .workers import Engine, EngineSettings

__all__ = [
    "DeadlineExceeded", "Engine", "EngineError", "EngineObserver", "EngineSettings", "EngineStopped",
    "EngineUnavailable", "IterationRecord", "ModelLimits", "QueueFull", "StepFailed", "Target", "TargetError",
    "TokenizeResult", "check_token_ids", "parse_target",
]
