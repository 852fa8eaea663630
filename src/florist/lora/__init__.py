"""The LoRA update type, its validation and PEFT adapter-directory I/O (no transformers import)."""

from florist.lora.update import ClientUpdate, LoraFactors, lora_scaling
from florist.lora.validation import client_weights, validate_updates

__all__ = ["ClientUpdate", "LoraFactors", "client_weights", "lora_scaling", "validate_updates"]
