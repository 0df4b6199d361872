"""Megatron-side code: CPU shims, checkpoint keys, and the per-family Megatron models used by verify."""
