"""DETR with Hungarian or UOT matching (hard or plan-weighted losses)."""
