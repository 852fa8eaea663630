"""Instruction data: records, loaders (Dolly, Alpaca, WizardLM; local files or the hub),
the prompt template, partitioners and the embedded skills set."""
