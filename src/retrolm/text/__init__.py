"""Text: corpus ingestion, the LM tokenizer, the frozen sentence encoder, near-duplicate detection."""
