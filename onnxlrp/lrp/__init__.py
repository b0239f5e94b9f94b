"""The relevance layer: rules as data and the one skeleton, composites, what is explained, the walk, per-layer
outputs, what is known of tensors, and the emitters by op family."""
