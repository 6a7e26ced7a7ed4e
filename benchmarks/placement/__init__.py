"""Adapter placement benchmark (gradient rank vs every-layer vs random) on MiniLM-L6."""
