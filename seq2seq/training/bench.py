"""`seq2seq bench`: training and decoding speed on real batches, from timers only.

Training: a preset's model on token-budget batches of Multi30k en-de with a joint 8k
SentencePiece vocabulary, or a recipe's model on its own data (e.g. the WMT-sized
recipes/scale_wmt_like.yaml), timing `seq2seq train`'s own training step (the Lightning
module under a Trainer); median target tokens/s and source+target tokens/s over `--steps`
optimizer steps after `--warmup`, step time, peak memory, and on a GPU the model FLOPs
utilization; with a training peer (`--against hf`, seq2seq.export.peer), HF's MarianMTModel
of the same shape steps on the same batches in turn. Decoding (with `-m MODEL`): sentences/s
and output tokens/s for greedy and beam 5 over the 1,000 test_2016_flickr sentences, with the
BLEU of that output beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import resource
import statistics
import time
import warnings
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from seq2seq.config import DecodeConfig, ModelConfig, OptimConfig, Recipe, TrainerConfig, preset
from seq2seq.inference.translate import check_cuda_device
from seq2seq.kernels.onednn import onednn_works
from seq2seq.training.module import TranslationModule
from seq2seq.training.optim import peak_lr
from seq2seq.training.train import PYTREE_WARNING

#: Multi30k en-de with a joint 8k vocabulary: the data every bench runs on.
MULTI30K = {
    "root": "data/multi30k",
    "download": "multi30k",
    "train": {"src": "train.en.gz", "tgt": "train.de.gz"},
    "valid": {"src": "val.en.gz", "tgt": "val.de.gz"},
    "test": {"src": "test_2016_flickr.en.gz", "tgt": "test_2016_flickr.de.gz"},
    "tokenizer": {"vocab_size": 8000, "joint": True},
}

#: Dense bf16 peak of known GPUs, FLOP/s (for model FLOPs utilization).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def bench_recipe(
    recipe_path: str | None, preset_name: str | None, overrides: Sequence[str]
) -> Recipe:
    """The recipe to measure: a recipe file (its model on its data), a preset (default small)
    on Multi30k, or both: the preset's shape on the recipe's data."""
    from seq2seq.recipe import load_recipe, parse_recipe

    if recipe_path:
        recipe = load_recipe(recipe_path, overrides)
        if preset_name:
            recipe = dataclasses.replace(recipe, model=preset(preset_name))
        return recipe
    model = dataclasses.asdict(preset(preset_name or "small"))
    text = yaml.safe_dump({"model": model, "data": MULTI30K})
    # Errors name the preset given, or say which one stands in for the recipe not given.
    name = f"--preset {preset_name}" if preset_name else "the default benchmark (preset small)"
    return parse_recipe(text, overrides, name)


def comparison_batches(tgt_lengths: np.ndarray, src_lengths: np.ndarray, max_tokens: int):
    """Batches cut the way the peers' scripts cut them (../shared/bench/peers/common.py), so
    both sides time the same work: rows sorted by (target, source) length with random ties,
    cut greedily at `max_tokens` real target tokens (EOS included) by the training batch
    cutter, batch order shuffled."""
    from seq2seq.data.batching import cut

    rng = np.random.default_rng(0)
    order = rng.permutation(len(tgt_lengths))
    order = order[np.lexsort((src_lengths[order], tgt_lengths[order]))]
    batches = cut(order, src_lengths, tgt_lengths, max_tokens, budget="target")
    return [batches[i].tolist() for i in rng.permutation(len(batches))]


def training_batches(
    recipe: Recipe, run_dir: str, max_tokens: int, n: int, row_tokens: int | None = None
) -> tuple[list, object]:
    """`n` training batches of real Multi30k pairs of at most `max_tokens` target tokens each,
    as the peers' scripts cut them, and the tokenizer. When the corpus cuts into fewer than
    `n` batches (large GPU budgets), they are taken again in the same order. With
    `row_tokens`, each batch's pairs share rows (`collate`)."""
    from seq2seq.data.batching import PairDataset, batch_lengths, collate
    from seq2seq.data.download import ensure_downloaded
    from seq2seq.data.pipeline import load_splits

    ensure_downloaded(recipe.data)
    prepared = load_splits(recipe.data, run_dir)
    src_lengths, tgt_lengths = batch_lengths(prepared.train)
    pairs = PairDataset(prepared.train)
    cut = comparison_batches(tgt_lengths, src_lengths, max_tokens)
    chosen = [cut[k % len(cut)] for k in range(n)]
    return [collate(pairs.__getitems__(rows), row_tokens) for rows in chosen], prepared.tokenizer


def model_flops(cfg: ModelConfig, n_src: int, n_tgt: int, src_len: int, tgt_len: int) -> float:
    """Training FLOPs of one step (forward + backward = 3 x forward, matmuls only)."""
    d, ff = cfg.d_model, cfg.d_ff
    enc_layer = 4 * d * d + 2 * d * ff  # Q, K, V, O + FFN weights
    dec_layer = 8 * d * d + 2 * d * ff  # + cross-attention
    forward = 2 * (
        cfg.n_encoder_layers * enc_layer * n_src
        + cfg.n_decoder_layers * dec_layer * n_tgt
        + cfg.tgt_vocab_size * d * n_tgt  # output projection
        + 2
        * d
        * (
            cfg.n_encoder_layers * n_src * src_len
            + cfg.n_decoder_layers * n_tgt * (tgt_len + src_len)
        )
    )
    return 3.0 * forward


def sentence_lengths(batch) -> tuple[int, int]:
    """The longest source and target sentence of a (host) batch: the key lengths its
    attention FLOPs are counted over, whether pairs have rows of their own or share them."""
    if batch.rows is None:
        return batch.src.size(1), batch.tgt_in.size(1)
    return int(batch.rows.src_position.max()) + 1, int(batch.rows.tgt_position.max()) + 1


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextlib.contextmanager
def _quiet_lightning():
    """No "GPU available" or "`Trainer.fit` stopped" lines in the bench's output."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _same(batch):
    return batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepTimer(Callback):
    """Times each training step as the Trainer runs it: forward, loss, backward, clipping,
    optimizer and schedule (the batch is on the device already); the first `warmup` steps
    are not kept. With a `peer` (`--against hf`), the peer steps on each batch too, outside
    our timing: after our step on even batches, before it on odd ones."""

    def __init__(
        self, device: torch.device, warmup: int, lengths: list[tuple[int, int]], peer=None
    ):
        self.device, self.warmup, self.lengths, self.peer = device, warmup, lengths, peer
        self.records: list[tuple[float, int, int, int, int]] = []
        self.peer_seconds: list[float] = []  # the peer's step on each kept batch
        self.positions = 0  # source and target positions computed over, padding included
        self._start = 0.0

    def _peer_step(self, batch, batch_idx: int) -> None:
        seconds = self.peer.step(batch)
        if batch_idx >= self.warmup:
            self.peer_seconds.append(seconds)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.peer is not None and batch_idx % 2:
            self._peer_step(batch, batch_idx)
        _sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        _sync(self.device)
        seconds = time.perf_counter() - self._start
        if batch_idx >= self.warmup:
            n = (batch.n_src_tokens, batch.n_tgt_tokens)
            self.records.append((seconds, *n, *self.lengths[batch_idx]))
            self.positions += batch.src.numel() + batch.tgt_in.numel()
        if self.peer is not None and not batch_idx % 2:
            self._peer_step(batch, batch_idx)


def measure_training(
    cfg: ModelConfig,
    batches: list,
    device: torch.device,
    precision: str,
    warmup: int,
    compile_model: bool = False,
    optim: OptimConfig | None = None,
    trainer_cfg: TrainerConfig | None = None,
    peer_factory=None,
) -> dict:
    """Time the very training step `seq2seq train` runs: `TranslationModule.training_step`
    under a Lightning Trainer, with the recipe's optimizer, schedule, label smoothing,
    gradient clipping and logging interval (`optim`, `trainer_cfg`; the defaults without
    them) and the kernels the module swaps in at fit time. The first `warmup` steps are not
    counted (with `compile_model`, they include torch.compile's compilations). With
    `peer_factory` (seq2seq.export.peer.HfTrainingPeer), a peer of the same shape steps on the
    same batches in turn, and its figures come beside ours under `hf_` keys."""
    optim, t = optim or OptimConfig(), trainer_cfg or TrainerConfig()
    peer = None
    if peer_factory is not None:
        lr = peak_lr(optim, cfg.d_model)
        bf16 = precision == "bf16-mixed"
        peer = peer_factory(cfg, optim, lr, t.gradient_clip_val, device, bf16)
    torch.manual_seed(0)
    module = TranslationModule(cfg, optim, DecodeConfig(), {}, compile_model=compile_model)
    timer = _StepTimer(device, warmup, [sentence_lengths(b) for b in batches], peer)
    with warnings.catch_warnings(), _quiet_lightning():
        warnings.filterwarnings("ignore", message=PYTREE_WARNING)
        warnings.filterwarnings("ignore", message=".*does not have many workers")
        warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no")
        trainer = L.Trainer(
            accelerator=device.type,
            devices=[device.index or 0] if device.type == "cuda" else 1,
            precision=precision,
            max_steps=max(t.max_steps, len(batches)),  # the schedule decays to the recipe's
            max_epochs=1,
            limit_train_batches=len(batches),
            limit_val_batches=0,
            num_sanity_val_steps=0,
            gradient_clip_val=t.gradient_clip_val,
            log_every_n_steps=t.log_every_n_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        loader = DataLoader(batches, batch_size=None, collate_fn=_same)
        trainer.fit(module, train_dataloaders=loader)
    records, model = timer.records, module.model
    step = statistics.median(r[0] for r in records)
    result = {
        "params": sum(p.numel() for p in model.parameters()),
        "measured_steps": len(records),
        "warmup_steps": warmup,
        "median_step_s": round(step, 4),
        "train_tgt_tokens_per_s": round(statistics.median(r[2] / r[0] for r in records), 1),
        "train_src_tgt_tokens_per_s": round(
            statistics.median((r[1] + r[2]) / r[0] for r in records), 1
        ),
        "mean_tgt_tokens_per_batch": round(statistics.mean(r[2] for r in records), 1),
        "padding_percent": round(
            100 * (1 - sum(r[1] + r[2] for r in records) / max(timer.positions, 1)), 1
        ),
        "train_peak_mem_mib": round(peak_memory_mib(device), 1),
    }
    if peer is not None:
        theirs = timer.peer_seconds
        result["hf_params"] = peer.params
        result["hf_median_step_s"] = round(statistics.median(theirs), 4)
        result["hf_train_tgt_tokens_per_s"] = round(
            statistics.median(r[2] / s for r, s in zip(records, theirs, strict=True)), 1
        )
        # Per batch, their step time over ours: the same work, a minute apart at most.
        result["train_ratio_ours_over_hf"] = round(
            statistics.median(s / r[0] for r, s in zip(records, theirs, strict=True)), 3
        )
    if device.type == "cuda":
        flops = statistics.median(model_flops(cfg, r[1], r[2], r[3], r[4]) / r[0] for r in records)
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        result["model_tflops_per_s"] = round(flops / 1e12, 1)
        result["mfu_percent"] = round(100 * flops / peak, 1) if peak else None
    return result


def measure_decoding(
    model_path: str, recipe: Recipe, device: torch.device, precision: str, stop: str | None = None
) -> dict:
    """Greedy and beam-5 speed and BLEU over the test sentences, with a trained model, and
    beam search's stopping rule `stop` (default: the model's)."""
    from seq2seq.inference.evaluate import read_text, score
    from seq2seq.inference.translator import Translator

    test, root = recipe.data.test, recipe.data.root
    sources = read_text(os.path.join(root, test.src))
    refs = read_text(os.path.join(root, test.tgt))
    translator = Translator.load(model_path, device.type, precision)
    stop = stop or translator.decode.stop
    result: dict = {"decode_sentences": len(sources), "decode_precision": precision, "stop": stop}
    for name, beam in (("greedy", 1), ("beam5", 5)):
        cfg = dataclasses.replace(translator.decode, beam=beam, nbest=1, stop=stop)
        translator.translate_texts(sources[:50], cfg)  # warm-up
        _sync(device)
        start = time.perf_counter()
        hyps = translator.translate_texts(sources, cfg)
        _sync(device)
        seconds = time.perf_counter() - start
        out_tokens = sum(len(ids) + 1 for ids in translator.tokenizer.encode_tgt(hyps))
        result[f"{name}_sentences_per_s"] = round(len(sources) / seconds, 1)
        result[f"{name}_tokens_per_s"] = round(out_tokens / seconds, 1)
        result[f"{name}_bleu"] = round(score(hyps, refs, ["bleu"])["bleu"], 2)
    return result


def machine() -> dict:
    return {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def run_bench(args: argparse.Namespace, overrides: Sequence[str], peer=None) -> dict:
    """Everything `seq2seq bench` measures, as one dict; with `peer` (a factory such as
    seq2seq.export.peer.HfTrainingPeer), training beside that peer."""
    check_cuda_device(args.device)  # before any data work
    device = torch.device(args.device)
    recipe = bench_recipe(args.recipe, args.preset, overrides)
    run_dir = args.run_dir or os.path.join("runs", "bench-multi30k")
    batches, tokenizer = training_batches(
        recipe, run_dir, args.max_tokens, args.warmup + args.steps, args.row_tokens
    )
    cfg = dataclasses.replace(
        recipe.model,
        src_vocab_size=tokenizer.src_vocab_size,
        tgt_vocab_size=tokenizer.tgt_vocab_size,
    )
    result = {
        **machine(),
        "shape": {
            k: getattr(cfg, k)
            for k in ("d_model", "n_heads", "d_ff", "n_encoder_layers", "n_decoder_layers")
        },
        "vocab_size": cfg.tgt_vocab_size,
        "precision": args.precision,
        "max_tokens": args.max_tokens,
        "row_tokens": args.row_tokens,
    }
    result["compile"] = args.compile
    # The oneDNN linear layers run in float32 CPU training only (not under autocast or
    # torch.compile).
    cpu_fp32 = device.type == "cpu" and args.precision == "32-true" and not args.compile
    onednn = cpu_fp32 and onednn_works()
    result["cpu_linear"] = "onednn" if onednn else "torch"
    result.update(
        measure_training(
            cfg,
            batches,
            device,
            args.precision,
            args.warmup,
            args.compile,
            recipe.optim,
            recipe.trainer,
            peer,
        )
    )
    if args.model:
        result.update(
            measure_decoding(args.model, recipe, device, args.decode_precision, args.stop)
        )
    return result


def format_result(result: dict) -> str:
    lines = [
        f"seq2seq bench on {result['device_name']} ({result['machine']}, {result['cpu_count']} cores, "
        f"torch {result['torch']}, {result['threads']} threads)"
    ]
    lines += [
        f"  {key:<28} {value}" for key, value in result.items() if key not in ("machine", "torch")
    ]
    return "\n".join(lines)


def bench_cli(args: argparse.Namespace, overrides: Sequence[str], peer=None) -> int:
    result = run_bench(args, overrides, peer)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0
