"""Run configuration: frozen dataclasses (schema.py) and the TOML + key=value loader (loader.py)."""

from florist.config.loader import load_config, to_toml
from florist.config.packaged import DEMO_CONFIG, PAPER_CONFIG
from florist.config.schema import (
    AggregationConfig,
    DataConfig,
    EvalConfig,
    FederationConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    RunSection,
)

__all__ = [
    "DEMO_CONFIG",
    "PAPER_CONFIG",
    "AggregationConfig",
    "DataConfig",
    "EvalConfig",
    "FederationConfig",
    "LoraConfig",
    "ModelConfig",
    "RunConfig",
    "RunSection",
    "load_config",
    "to_toml",
]
