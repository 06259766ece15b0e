"""LangChain components backed by CLaRa memory tokens."""
