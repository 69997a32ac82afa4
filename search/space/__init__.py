"""The search space: what a space file asks for, parsed and checked (no torch, no Ray at import)."""
