"""Run configuration: frozen dataclasses (schema.py) and the TOML + key=value loader (loader.py)."""

from florist.config.loader import from_flower_run_config, load_config, to_toml
from florist.config.packaged import DEMO_CONFIG, PAPER_CONFIG
from florist.config.schema import (
    AdapterConfig,
    AggregationConfig,
    DataConfig,
    EvalConfig,
    FederationConfig,
    FloristConfig,
    ModelConfig,
    OutputConfig,
)

__all__ = [
    "DEMO_CONFIG",
    "PAPER_CONFIG",
    "AdapterConfig",
    "AggregationConfig",
    "DataConfig",
    "EvalConfig",
    "FederationConfig",
    "FloristConfig",
    "ModelConfig",
    "OutputConfig",
    "from_flower_run_config",
    "load_config",
    "to_toml",
]
