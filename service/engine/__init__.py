"""Turns many requests into few model steps: targets, scheduling, workers. No HTTP in here."""

from .errors import DeadlineExceeded, EngineError, EngineStopped, EngineUnavailable, QueueFull, StepFailed
from .interface import EngineInterface
from .jobs import Job, ReconstructJob, TokenizeJob
from .observer import EngineObserver
from .records import IterationRecord, Selection, TokenizeResult
from .targets import Limits, Target, TargetError, check_token_ids, parse_target
from .workers import Engine, EngineSettings

__all__ = [
    "DeadlineExceeded", "Engine", "EngineError", "EngineInterface", "EngineObserver", "EngineSettings",
    "EngineStopped", "EngineUnavailable", "IterationRecord", "Job", "Limits", "QueueFull", "ReconstructJob",
    "Selection", "StepFailed", "Target", "TargetError", "TokenizeJob", "TokenizeResult", "check_token_ids",
    "parse_target",
]
