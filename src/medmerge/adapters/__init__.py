"""LoRA adapters as exact weight deltas: read (lora), open and check (inputs), combine, merge and export, verify."""
