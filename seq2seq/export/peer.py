"""Hugging Face's MarianMTModel as a training peer for `seq2seq bench --against hf`.

The peer is the same architecture (seq2seq.export.hf.marian_config: shape, tied embeddings,
post-norm, sinusoidal positions, ReLU, dropout), randomly initialized, trained the way
transformers users train it and the peers' scripts (../shared/bench/peers/) do: the model's
forward pass, `F.cross_entropy` with the recipe's label smoothing over the full logits,
`backward`, the recipe's gradient clipping and AdamW with the recipe's peak lr, betas, eps
and weight decay. It steps on the very batches ours does, one step after (or before) each of
ours, so the two sides share every minute of the machine's drift.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from seq2seq.config import ModelConfig, OptimConfig
from seq2seq.constants import PAD_ID


def check_training_peer(args) -> None:
    """`seq2seq bench --against` without `-m` times training beside HF's MarianMTModel:
    refuse, in one line, what that cannot do."""
    if args.against != "hf":
        raise ValueError(
            f"--against {args.against} compares decoding: give -m MODEL (training compares "
            "against hf only)"
        )
    from seq2seq.export import require

    require("transformers")
    if args.row_tokens:
        raise ValueError("--against hf trains one pair per row: leave out --row-tokens")
    if args.precision not in ("32-true", "bf16-mixed"):
        raise ValueError(
            f"--against hf runs 32-true or bf16-mixed, not --precision {args.precision}"
        )
    if args.compile:
        raise ValueError("--against hf times eager steps: leave out --compile")


class HfTrainingPeer:
    """A MarianMTModel of `cfg`'s shape that takes one timed training step per batch."""

    def __init__(
        self,
        cfg: ModelConfig,
        optim: OptimConfig,
        lr: float,
        clip: float | None = None,
        device: torch.device | None = None,
        bf16: bool = False,
    ):
        from transformers import MarianConfig, MarianMTModel
        from transformers.utils import logging as hf_logging

        from seq2seq.export.hf import check_marian, marian_config

        check_marian(cfg)
        hf_logging.set_verbosity_error()
        torch.manual_seed(0)
        self.model = MarianMTModel(MarianConfig(**marian_config(cfg))).to(device).train()
        self.device, self.bf16, self.vocab = device or torch.device("cpu"), bf16, cfg.tgt_vocab_size
        self.label_smoothing, self.clip = optim.label_smoothing, clip
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=lr,  # the recipe's peak, constant: a schedule's cost is negligible
            betas=tuple(optim.betas),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )

    @property
    def params(self) -> int:
        """Trainable parameters (Marian's sinusoidal position tables are frozen)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def step(self, batch) -> float:
        """One optimizer step on a `seq2seq.data.batching.Batch` (one pair per row, on the
        peer's device); seconds, the device synchronized."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else lambda: None
        sync()
        start = time.perf_counter()
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            logits = self.model(
                input_ids=batch.src,
                attention_mask=(batch.src != PAD_ID).long(),
                decoder_input_ids=batch.tgt_in,
            ).logits
            labels = batch.tgt_out.masked_fill(batch.tgt_out == PAD_ID, -100)
            loss = F.cross_entropy(
                logits.view(-1, self.vocab).float(),
                labels.view(-1),
                ignore_index=-100,
                label_smoothing=self.label_smoothing,
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        sync()
        return time.perf_counter() - start
