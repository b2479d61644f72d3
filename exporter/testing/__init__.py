"""Model factories for tests, demos and scale checks: tiny random LLaVAs, full-size random
checkpoints, the original-format writer and a tiny trained tokenizer. Not the export path."""
