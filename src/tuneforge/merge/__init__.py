"""Model merging (linear, slerp, task arithmetic, TIES, DARE, Model Stock) from a mergekit-like YAML."""
