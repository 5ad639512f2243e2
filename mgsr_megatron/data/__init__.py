"""Data pipeline: tokenizers, instruction JSONL, preprocessing to Megatron indexed files, span priors,
the DP-sharded resumable sampler and collate, and the embedded demo corpus (docs/data.md).

Modules are imported directly (`from mgsr_megatron.data.tokenizer import load_tokenizer`); this package
file stays empty of imports so that light users (the demo corpus, the tokenizer) do not pull in Megatron.
"""
