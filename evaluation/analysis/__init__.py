"""The seed study's analyses: text-encoder similarity and cross-attention mass on concept tokens."""
