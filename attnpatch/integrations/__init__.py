"""Library integrations: diffusers (processors), transformers (AttentionInterface)."""
