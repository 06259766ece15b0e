"""LlamaIndex components backed by CLaRa memory tokens."""
