"""The special token ids, once: SentencePiece is trained to give them these ids
(`seq2seq.data.tokenizer`), batches pad with PAD (`seq2seq.data.batching`), decoding starts from BOS and
ends at EOS (`seq2seq.inference.search`), and the model's padding mask compares with `ModelConfig.pad_id`."""

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
