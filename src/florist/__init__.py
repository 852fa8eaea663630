"""florist: federated LoRA fine-tuning of LLMs with FLoRIST aggregation.

The aggregation engine (``florist.aggregation``) and the LoRA update type with its PEFT I/O
(``florist.lora``) are pure tensor code: they import neither Flower nor transformers.
"""

__version__ = "0.1.0"
