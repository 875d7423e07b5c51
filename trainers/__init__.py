"""TRL trainers with keel interventions: SFT now; DPO and GRPO reuse the same mixin."""

from .mixin import InterventionTrainerMixin
from .monitoring import MonitoredDirection, ProjectionMonitor, ProjectionMonitorConfig
from .sft import InterventionSFTConfig, InterventionSFTTrainer

__all__ = [
    "InterventionTrainerMixin",
    "InterventionSFTConfig",
    "InterventionSFTTrainer",
    "MonitoredDirection",
    "ProjectionMonitor",
    "ProjectionMonitorConfig",
]
