"""Sparsity patterns: what attends to what, and how it becomes a FlexAttention BlockMask."""
