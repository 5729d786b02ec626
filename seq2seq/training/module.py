"""The LightningModule: calls the model and the loss; Lightning does loops, precision,
checkpointing, logging and distribution. No tensor math here beyond those calls.

Validation decodes the whole validation set (greedy or a small beam, per the recipe's
`decode` section), detokenizes, and scores BLEU and chrF with sacreBLEU against the raw
references. Under DDP every rank decodes the full (small) validation set, so all ranks agree
on the score without gathering strings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time

import lightning as L
import torch

from seq2seq.config import DecodeConfig, ModelConfig, OptimConfig
from seq2seq.data.batching import Batch
from seq2seq.inference.checkpoint import KEY, inference_state
from seq2seq.kernels import for_cpu_training
from seq2seq.nn.loss import LossOutput, translation_loss
from seq2seq.nn.transformer import Transformer
from seq2seq.training.optim import Decay, build_optimizer


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


log = logging.getLogger(__name__)


def batch_loss(model: Transformer, batch: Batch, epsilon: float) -> LossOutput:
    """`translation_loss` of a collated `Batch`, with the positions (and rows) it carries."""
    return translation_loss(
        model,
        batch.src,
        batch.tgt_in,
        batch.tgt_out,
        epsilon,
        batch.tgt_positions,
        batch.src_positions,
        batch.rows,
    )


class TranslationModule(L.LightningModule):
    def __init__(
        self,
        model_cfg: ModelConfig,
        optim: OptimConfig,
        decode: DecodeConfig,
        recipe: dict,
        val_beam: int = 1,
        compile_model: bool = False,
    ):
        super().__init__()
        self.model_cfg, self.optim, self.decode, self.recipe = model_cfg, optim, decode, recipe
        self.val_decode = dataclasses.replace(decode, beam=val_beam, nbest=1)
        self.model = Transformer(model_cfg)
        self._forward = torch.compile(self.model) if compile_model else self.model
        self.tokenizer = None  # set by train(): saved inside every checkpoint
        self.valid_refs: list[str] = []  # raw validation references, set by train()
        self._hyps: dict[int, list[int]] = {}
        self._val_sums = torch.zeros(3, dtype=torch.float64)  # loss, nll, tokens
        self._tokens_since, self._time_since = 0, time.perf_counter()  # since the last log
        self._train_tokens, self._train_seconds, self._step_start = 0, 0.0, 0.0
        self.last_saved_step = -1  # global step of the latest checkpoint written
        self._nonfinite: torch.Tensor | None = None  # count of NaN/inf losses, on the device
        self._interval_sums: torch.Tensor | None = None  # (loss, nll) * tokens since the last log
        self._logged_step = -1
        self._lr = 0.0  # learning rate of the latest update
        self.first_update_at: float | None = None  # perf_counter() after this process's first

    def setup(self, stage: str) -> None:
        """Before fitting: the CPU training kernels, swapped in from outside the model (same
        parameters, same checkpoints; `seq2seq.kernels`)."""
        if stage == "fit":
            swapped = for_cpu_training(self.model, self.trainer.strategy.root_device)
            log.debug("kernels swapped in: %s", ", ".join(swapped) or "none")

    # --- training -------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        out = batch_loss(self._forward, batch, self.optim.label_smoothing)
        self._note_nonfinite(out.loss)
        self._tokens_since += batch.n_tgt_tokens
        # Summed over the logging interval on the device (no host sync); logged as means.
        sums = torch.stack([out.loss.detach(), out.nll.detach()]) * out.n_tokens
        self._interval_sums = sums if self._interval_sums is None else self._interval_sums + sums
        self._lr = self.lr_schedulers().get_last_lr()[0]  # this update's; logged at log steps
        return out.loss

    def _note_nonfinite(self, loss: torch.Tensor) -> None:
        """Count NaN/inf losses on the device (no host sync); read the count every step on a
        CPU, every log_every_n_steps on an accelerator, and always before validation, so a
        non-finite model never reaches a checkpoint."""
        bad = (~torch.isfinite(loss.detach())).int()
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite + bad
        if (
            loss.device.type == "cpu"
            or self.global_step % max(self.trainer.log_every_n_steps, 1) == 0
        ):
            self._raise_if_nonfinite()

    def _raise_if_nonfinite(self) -> None:
        """Every rank reaches this at the same step; the decision is collective ('any rank'),
        so no rank is left waiting in an all-reduce for one that stopped."""
        bad = self._nonfinite is not None and int(self._nonfinite) > 0
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(
                f"the loss became NaN or infinite at step {self.global_step}; stopping. The last "
                "good checkpoint is kept: lower optim.lr or raise optim.warmup_steps, then resume."
            )

    def on_validation_start(self) -> None:
        self._raise_if_nonfinite()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def tokens_per_second(self) -> float:
        """Target tokens per second of training steps in this process (validation excluded)."""
        return self._train_tokens / max(self._train_seconds, 1e-9)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._train_tokens += batch.n_tgt_tokens
        self._train_seconds += time.perf_counter() - self._step_start
        if self.first_update_at is None:
            self.first_update_at = time.perf_counter()
        step = self.global_step
        if step % max(self.trainer.log_every_n_steps, 1) == 0 and step != self._logged_step:
            now = time.perf_counter()
            rate = self._tokens_since / max(now - self._time_since, 1e-9)
            self.log("tgt_tokens_per_s", rate, prog_bar=True)
            # Host numbers become device tensors when logged (a blocking copy on a GPU), so they
            # are logged at logging steps only, not every step.
            self.log("lr", self._lr, prog_bar=True)
            # The token-weighted means over the updates since the last log (as fairseq's
            # log-interval averages), not one batch's values: those swing with batch lengths.
            loss, nll = self._interval_sums / max(self._tokens_since, 1)
            self.log("train_loss", loss, prog_bar=True)
            self.log("train_nll", nll)
            self._tokens_since, self._time_since, self._interval_sums = 0, now, None
            self._logged_step = step  # once per update, also with gradient accumulation

    def configure_optimizers(self):
        # Lightning's mixed-precision plugin (bf16 or fp16) refuses to clip the gradients of an
        # optimizer that could unscale them itself, as fused Adam can.
        clipped_mixed = bool(self.trainer.gradient_clip_val) and "mixed" in self.trainer.precision
        optimizer, schedule = build_optimizer(
            self.model.parameters(),
            self.optim,
            self.model_cfg.d_model,
            self.trainer.max_steps,
            fused=not clipped_mixed,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_start(self) -> None:
        # A resumed run's schedule state comes from its checkpoint; trained further (a larger
        # max_steps), a decay starts the new plan's.
        for fn in self.lr_schedulers().lr_lambdas:
            if isinstance(fn, Decay):
                fn.replan(self.optim.decay_steps or self.trainer.max_steps)

    # --- validation -----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._hyps.clear()
        self._val_sums.zero_()

    def validation_step(self, batch, batch_idx: int) -> None:
        out = batch_loss(self.model, batch, self.optim.label_smoothing)
        n = out.n_tokens
        self._val_sums += torch.tensor(
            [out.loss.item() * n, out.nll.item() * n, n], dtype=torch.float64
        )
        for index, hyp in zip(batch.index.tolist(), self._translate(batch.src), strict=True):
            self._hyps[index] = hyp

    def _translate(self, src: torch.Tensor) -> list[list[int]]:
        """The best hypothesis of each sentence of a padded batch, by the decoding path that
        `seq2seq translate` takes (seq2seq.inference.translator)."""
        from seq2seq.inference.translator import Translator

        translator = Translator([self.model], self.tokenizer, self.val_decode)
        hyps = translator.decode_batch(src, scores=False)  # tokens alone
        return [hypotheses[0].tokens for hypotheses in hyps]

    def on_validation_epoch_end(self) -> None:
        from seq2seq.inference.evaluate import score

        sums, hyps = self._gather_validation()
        loss, nll, n = sums
        n = max(n, 1.0)
        # Every rank scores the gathered validation set, so the ranks' values agree; sync_dist
        # states that (a mean of equal values) and keeps Lightning's DDP warning away.
        self.log("val_loss", loss / n, sync_dist=True)
        self.log("val_ppl", math.exp(min(nll / n, 50.0)), sync_dist=True)
        if not self.valid_refs or len(hyps) != len(self.valid_refs):
            return  # e.g. a sanity check over a few batches: no BLEU on a partial set
        hyps = [self.tokenizer.decode_tgt(hyps[i]) for i in range(len(self.valid_refs))]
        scores = score(hyps, self.valid_refs, ["bleu", "chrf"])
        # A lowercasing model writes lowercase: it is chosen by lowercased BLEU.
        bleu = scores["bleu_lc"] if self.tokenizer.lowercase else scores["bleu"]
        self.log("val_bleu", bleu, prog_bar=True, sync_dist=True)
        self.log("val_chrf", scores["chrf"], sync_dist=True)
        self.last_val_scores = scores

    def _gather_validation(self) -> tuple[list[float], dict[int, list[int]]]:
        """The validation sums (loss, nll, tokens) and hypotheses of all ranks: under DDP each
        rank decoded its share of the pairs (every rank calls this at the epoch's end)."""
        sums, hyps = self._val_sums.tolist(), self._hyps
        if self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return sums, hyps
        shares: list = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(shares, (sums, hyps))
        totals = [sum(share[0][k] for share in shares) for k in range(3)]
        return totals, {i: h for _, share in shares for i, h in share.items()}

    # --- checkpoints: self-contained, and exactly resumable --------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.last_saved_step = self.global_step
        checkpoint[KEY] = inference_state(
            self.model_cfg, self.tokenizer.to_state(), self.decode, self.recipe
        )
        # Dropout draws from torch's generator. (numpy's is unused: the batch sampler seeds its
        # own generator from (seed, epoch).) Plain tensors and tuples: loads with weights_only.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            random.setstate(_tuples(states["python"]))


def _tuples(value):
    """random.setstate wants the tuples that a checkpoint round-trip may turn into lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value
