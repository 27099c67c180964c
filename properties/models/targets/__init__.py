"""Model-level targets: the reference (``lora_core`` on transformers models) and PEFT."""
