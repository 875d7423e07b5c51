"""TRL trainers with keel interventions: SFT, DPO and GRPO on one mixin."""

from .dpo import InterventionDPOConfig, InterventionDPOTrainer
from .grpo import InterventionGRPOConfig, InterventionGRPOTrainer, check_vllm_interventions
from .mixin import InterventionTrainerMixin
from .monitoring import MonitoredDirection, ProjectionMonitor, ProjectionMonitorConfig
from .passes import PassRouter
from .sft import InterventionSFTConfig, InterventionSFTTrainer

__all__ = [
    "InterventionTrainerMixin",
    "InterventionSFTConfig",
    "InterventionSFTTrainer",
    "InterventionDPOConfig",
    "InterventionDPOTrainer",
    "InterventionGRPOConfig",
    "InterventionGRPOTrainer",
    "check_vllm_interventions",
    "PassRouter",
    "MonitoredDirection",
    "ProjectionMonitor",
    "ProjectionMonitorConfig",
]
