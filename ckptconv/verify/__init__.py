"""Verify: HF logits against Megatron logits (``runner``), on the same inputs (``inputs``), with
figures and tolerances (``metrics``) gathered in a report (``report``)."""
