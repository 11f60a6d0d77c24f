"""Speed of the batched engine against the lecture's training loop (``make bench``)."""
