"""The model: presets, tokenizer and loading (`loading`), forward passes, micro-batches and log-probs
(`forward`), MoE routing records, replay and health (`routing`), and load-time fixes (`patches`)."""
