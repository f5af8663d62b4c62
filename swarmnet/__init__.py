"""swarmnet: peer-to-peer decentralized training with SWARM-style pipeline stages.

Importing this package is cheap and has no side effects: torch and hivemind load only when a
role starts.
"""

from swarmnet.config import (
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    PeerConfig,
    RunManifest,
    TrainerConfig,
    TrainingConfig,
    load_manifest,
)
from swarmnet.errors import SwarmnetError

__all__ = [
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PeerConfig",
    "RunManifest",
    "SwarmnetError",
    "TrainerConfig",
    "TrainingConfig",
    "load_manifest",
]
__version__ = "0.1.0"
