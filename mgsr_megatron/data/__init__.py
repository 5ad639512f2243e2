"""Data pipeline: tokenizers, instruction JSONL, preprocessing to Megatron indexed files, span priors,
the DP-sharded resumable sampler and collate, and the embedded demo corpus (docs/data.md).

Modules are imported directly (`from mgsr_megatron.data.tokenizer import load_tokenizer`); this package
file stays empty of imports so that light users (the demo corpus, the tokenizer) do not pull in Megatron.

Public:
  tokenizer.load_tokenizer, tokenizer.train_sentencepiece   SentencePiece models and HF tokenizer directories
  formats.read_jsonl, formats.iter_json_objects             instruction JSONL (dolly, alpaca, prompt/response,
                                                            messages) and plain JSONL objects
  preprocess.preprocess                                     JSONL -> Megatron indexed files (tools/preprocess_data.py)
  preprocess.PreprocessOptions                              how it runs: workers, chunk rows, progress, log
  indexed.InstructionDataset, indexed.PromptDataset         the preprocessed rows, held-out prompts
  spans.get_span_extractor                                  span priors of the span loss
  demo_corpus.build_demo_corpus, demo_corpus.write_demo_corpus   the embedded demo corpus
collate.py, sampler.py and schedule.py serve the trainer.
"""
