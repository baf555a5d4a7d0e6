"""Data: the offline verifiable editing world (`synthetic`) and its tokenizer (`world_tokenizer`)."""
