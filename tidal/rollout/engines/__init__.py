"""Generation engines: the interface (`base`), transformers' own decode loop (`transformers`), and
vLLM (`vllm`, with the extension it loads inside vLLM's worker, `vllm_ext`)."""
