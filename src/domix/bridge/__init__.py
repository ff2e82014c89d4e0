"""Stages 2–3 of DoMIX: mix library modules through a trainable bridge, fine-tune, export."""
