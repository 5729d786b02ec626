"""Typed configuration: every knob has one default here, with a one-line docstring.

A YAML recipe maps onto `Recipe` through jsonargparse (see `seq2seq/recipe.py`): its
top-level sections are `model`, `data`, `optim`, `trainer` and `decode`. Unknown keys
and wrong types fail with the key and the file named.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field

from seq2seq.constants import PAD_ID

#: ModelConfig's dropout rates: regularization, not architecture (a fine-tuning run takes
#: them from its recipe; checkpoints that differ only in them may be averaged).
DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout")


@dataclass
class ModelConfig:
    """Shape of the Transformer (Vaswani et al., 2017). Defaults are the paper's base model."""

    d_model: int = 512
    """Width of every residual-stream vector (paper: d_model)."""
    n_heads: int = 8
    """Attention heads per multi-head attention (paper: h); must divide d_model."""
    d_ff: int = 2048
    """Inner width of the position-wise feed-forward network (paper: d_ff)."""
    n_encoder_layers: int = 6
    """Encoder layers (paper: N)."""
    n_decoder_layers: int = 6
    """Decoder layers (paper: N)."""
    dropout: float = 0.1
    """Residual dropout on every sub-layer output and on embeddings + positions (paper: P_drop)."""
    attention_dropout: float = 0.0
    """Dropout on attention weights (not in the paper; tensor2tensor's option). Off by default."""
    activation_dropout: float = 0.0
    """Dropout after the FFN's ReLU (not in the paper). Off by default."""
    max_positions: int = 1024
    """Longest sequence (in pieces, BOS/EOS included) the position table covers."""
    pre_norm: bool = False
    """LayerNorm before each sub-layer (+ final LayerNorms) instead of the paper's post-norm."""
    share_embeddings: bool = True
    """With a joint vocabulary, one matrix for source, target and output embeddings (paper 3.4)."""
    tie_output: bool = True
    """With separate vocabularies, tie the output projection to the target embedding."""
    output_bias: bool = False
    """A bias on the pre-softmax projection (the paper has none)."""
    src_vocab_size: int = 0
    """Source vocabulary size; 0 means 'take it from the tokenizer'."""
    tgt_vocab_size: int = 0
    """Target vocabulary size; 0 means 'take it from the tokenizer'."""
    pad_id: int = PAD_ID
    """Padding id (fixed by the tokenizer: seq2seq.constants)."""

    def __post_init__(self) -> None:
        for name in DROPOUT_KEYS:
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"model.{name}={value} must be in [0, 1)")
        for name in ("d_model", "n_heads", "d_ff", "n_encoder_layers", "n_decoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be at least 1")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
            )

    @property
    def joint_vocab(self) -> bool:
        """One vocabulary for both sides: then all three embeddings can be one matrix."""
        return self.share_embeddings and self.src_vocab_size == self.tgt_vocab_size


#: Named shapes. `small` is the CPU speed-comparison shape; `tiny` is for tests.
PRESETS: dict[str, ModelConfig] = {
    "base": ModelConfig(),
    "big": ModelConfig(d_model=1024, n_heads=16, d_ff=4096, dropout=0.3),
    "small": ModelConfig(d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=3, n_decoder_layers=3),
    "iwslt": ModelConfig(d_model=512, n_heads=4, d_ff=1024, dropout=0.3),
    "tiny": ModelConfig(d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2),
}


def preset(name: str, **overrides: object) -> ModelConfig:
    """A copy of preset `name` with `overrides` applied (e.g. vocabulary sizes)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


@dataclass
class CorpusConfig:
    """One split of parallel data. Give exactly one of: src+tgt files, a TSV, or a dataset.

    Paths are relative to `data.root` unless absolute.
    """

    src: str | None = None
    """Source-side file: plain text, .gz/.xz/.bz2, or a WMT .sgm file."""
    tgt: str | None = None
    """Target-side file, line-aligned with `src`."""
    tsv: str | None = None
    """A tab-separated file with source and target columns."""
    tsv_columns: tuple[int, int] = (0, 1)
    """Which TSV columns hold source and target."""
    dataset: str | None = None
    """A `datasets` name on the hub (e.g. 'wmt14') or a local `save_to_disk` directory."""
    dataset_config: str | None = None
    """The dataset's configuration name (e.g. 'de-en')."""
    split: str = "train"
    """The dataset's split name."""
    max_pairs: int | None = None
    """Keep only the first N pairs (for smoke runs)."""
    name: str | None = None
    """What reports and messages call this corpus (None: its file or dataset name)."""
    weight: float = 1.0
    """Training corpora only: how many times an epoch holds each of its pairs (fairseq's
    --upsample-primary, Marian's data weighting). 2 repeats every pair; 1.5 adds a fixed,
    seeded half of them once more; 0.5 keeps a seeded half."""

    def label(self) -> str:
        """The corpus's name: `name`, else its source file, TSV or dataset name."""
        if self.name:
            return self.name
        if self.dataset:
            return self.dataset + (f"/{self.split}" if self.split != "train" else "")
        path = self.src or self.tsv or ""
        return os.path.basename(path) or "corpus"


@dataclass
class TokenizerConfig:
    """SentencePiece, trained inside the tool on the training data."""

    joint: bool = True
    """One model for both languages (needed for shared embeddings)."""
    model_type: str = "unigram"
    """'unigram' or 'bpe'."""
    vocab_size: int = 8000
    """Pieces per model, special pieces included."""
    character_coverage: float = 1.0
    """Share of characters covered by the vocabulary (0.9995 for large alphabets)."""
    input_sentence_size: int = 2_000_000
    """Sample at most this many sentences to train SentencePiece (big corpora)."""
    normalization: str = "nmt_nfkc"
    """SentencePiece normalization rule: 'nmt_nfkc', 'nfkc', or 'identity' (exact round trip)."""
    lowercase: bool = False
    """Lowercase after `normalization`, inside the SentencePiece model (as Multi30k's tokenized
    release and the baselines trained on it do; str.lower(): ß stays ß). The model then reads
    and writes lowercase, and validation picks checkpoints by lowercased BLEU."""


@dataclass
class CleanConfig:
    """Filters applied to training pairs; each dropped pair is counted by reason."""

    max_length: int = 250
    """Drop pairs where either side has more pieces than this."""
    max_ratio: float = 3.0
    """Drop pairs whose length ratio (pieces, longer/shorter) exceeds this; 0 disables."""
    dedup: bool = False
    """Drop exact duplicate pairs."""
    drop_identical: bool = True
    """Drop pairs whose source equals their target."""


@dataclass
class DataConfig:
    """Where the corpora are, how they are cleaned and tokenized, and how batches are made."""

    src_lang: str = "en"
    """Source language code."""
    tgt_lang: str = "de"
    """Target language code."""
    root: str = "data/multi30k"
    """Folder the corpus files live in (and where a known corpus is downloaded)."""
    download: str | None = None
    """Fetch a known corpus into `root` when missing: 'multi30k' or none."""
    download_url: str | None = None
    """Base URL to fetch the known corpus from (None: its public home, e.g. GitHub)."""
    cache_dir: str | None = None
    """Folder for the Arrow caches of read and tokenized splits (None: <run_dir>/cache)."""
    train: CorpusConfig | list[CorpusConfig] = field(default_factory=CorpusConfig)
    """Training split: one corpus, or a list of corpora (each with an optional `weight`),
    cleaned and deduplicated together and reported one by one."""
    valid: CorpusConfig = field(default_factory=CorpusConfig)
    """Validation split (checkpoint selection)."""
    test: CorpusConfig | None = None
    """Test split, scored once at the end of training."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """SentencePiece settings."""
    clean: CleanConfig = field(default_factory=CleanConfig)
    """Training-pair filters."""
    max_tokens: int = 4096
    """Token budget of one batch, padding included, bounding both source and target."""
    row_tokens: int | None = None
    """Pack training pairs side by side into rows of this many tokens (e.g. 128), attention
    masked per sentence: fewer, fuller attention tiles on a GPU; None: a row per pair."""
    num_workers: int = 0
    """DataLoader worker processes."""
    num_proc: int = 1
    """Processes for `datasets.map` when tokenizing."""
    seed: int = 1
    """Seed of the per-epoch batch shuffle."""

    def __post_init__(self) -> None:
        if isinstance(self.train, list) and not self.train:
            raise ValueError("data.train is an empty list; give at least one corpus")
        names: dict[str, str] = {}
        for key, corpus in self.train_corpora():
            if not 0 < corpus.weight < math.inf:  # also refuses NaN
                raise ValueError(f"{key}.weight={corpus.weight} must be a finite number above 0")
            if corpus.label() in names:
                raise ValueError(
                    f"{key} and {names[corpus.label()]} are both named {corpus.label()!r}; "
                    "give one of them another `name`"
                )
            names[corpus.label()] = key
        for key, corpus in self.corpora():
            if min(corpus.tsv_columns) < 0:  # counted from 0: the TSV reader checks max() only
                raise ValueError(
                    f"{key}.tsv_columns={list(corpus.tsv_columns)} must be column numbers >= 0"
                )
        if self.max_tokens < 1:
            raise ValueError(f"data.max_tokens={self.max_tokens} must be at least 1")
        if self.row_tokens is not None and self.row_tokens < 1:
            raise ValueError(f"data.row_tokens={self.row_tokens} must be positive (or null)")

    def train_corpora(self) -> list[tuple[str, CorpusConfig]]:
        """Every training corpus with its key in the recipe: `data.train` for a single one,
        `data.train[i]` in a list."""
        if isinstance(self.train, CorpusConfig):
            return [("data.train", self.train)]
        return [(f"data.train[{i}]", corpus) for i, corpus in enumerate(self.train)]

    def corpora(self) -> list[tuple[str, CorpusConfig]]:
        """Every corpus of every split with its key in the recipe (train, valid, test)."""
        held_out = [("data.valid", self.valid)] + ([("data.test", self.test)] if self.test else [])
        return self.train_corpora() + held_out


SCHEDULES = ("inverse_sqrt", "linear", "cosine")


@dataclass
class OptimConfig:
    """Adam with the paper's inverse-square-root warm-up (eq. 3), or a warm-up then a decay
    to zero at a known step count (for a fixed budget)."""

    lr: float | None = None
    """Peak learning rate; None means the paper's d_model^-0.5 * warmup^-0.5 (times lr_scale)."""
    lr_scale: float = 1.0
    """Multiplier on the paper's schedule when `lr` is None."""
    warmup_steps: int = 4000
    """Linear warm-up steps, then the decay named by `schedule`."""
    schedule: str = "inverse_sqrt"
    """After warm-up: 'inverse_sqrt' (paper eq. 3, lr ~ step^-0.5), or 'linear' / 'cosine'
    decay from the peak to zero at `decay_steps`."""
    decay_steps: int | None = None
    """'linear'/'cosine': the update at which lr reaches zero; None means trainer.max_steps."""
    decay_within_time: bool = False
    """'linear'/'cosine' with trainer.max_time_minutes: at every validation, move the end of the
    decay to the update the run will have reached when its time runs out (at its speed so
    far), where that comes first, so that a run stopped by the time budget ends decayed too.
    The lr then depends on the machine's speed (a resumed run is not bit-identical)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas (paper section 5.3)."""
    eps: float = 1e-9
    """Adam epsilon (paper section 5.3)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW); 0 is plain Adam as in the paper."""
    label_smoothing: float = 0.1
    """Label-smoothing epsilon (paper section 5.4)."""

    def __post_init__(self) -> None:
        for name in ("lr", "lr_scale"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"optim.{name}={value} must be a positive number")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"optim.schedule={self.schedule!r} must be one of {', '.join(SCHEDULES)}"
            )
        if self.decay_within_time and self.schedule == "inverse_sqrt":
            raise ValueError(
                "optim.decay_within_time needs optim.schedule 'linear' or 'cosine' (inverse_sqrt "
                "never reaches zero)"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.warmup_steps == 0 and self.lr is None:  # inverse_sqrt_factor takes 0: no warm-up
            raise ValueError(
                "optim.warmup_steps=0 needs an optim.lr: the paper's peak lr "
                "d_model^-0.5 * warmup_steps^-0.5 is undefined without warm-up"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"optim.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"optim.decay_steps={self.decay_steps} must exceed "
                f"optim.warmup_steps={self.warmup_steps}"
            )


@dataclass
class TrainerConfig:
    """What Lightning's Trainer gets, plus checkpointing and validation choices."""

    max_steps: int = 100_000
    """Optimizer updates to train for."""
    max_epochs: int | None = None
    """Stop after this many epochs (None: only max_steps)."""
    max_time_minutes: float | None = None
    """Stop after this much wall time (None: no limit)."""
    accelerator: str = "auto"
    """'cpu', 'gpu' or 'auto'."""
    devices: int | str = "auto"
    """Devices per node."""
    num_nodes: int = 1
    """Machines."""
    strategy: str = "auto"
    """'auto', 'ddp', 'fsdp', 'ddp_spawn'."""
    precision: str = "32-true"
    """'32-true', 'bf16-mixed', '16-mixed', or 'auto': bf16-mixed where the hardware has
    native bf16 (a recent GPU, a CPU with AVX-512 BF16 or AMX), else 32-true."""
    accumulate_grad_batches: int = 1
    """Batches per optimizer update."""
    gradient_clip_val: float | None = None
    """Clip the gradient norm to this (None: no clipping)."""
    val_check_interval: int = 1000
    """Validate every this many optimizer updates."""
    log_every_n_steps: int = 50
    """Log training metrics every this many updates."""
    save_top_k: int = 5
    """Keep the best k checkpoints by validation BLEU (plus last.ckpt)."""
    save_every_minutes: float | None = 10.0
    """Also save last.ckpt after the first update this many minutes after the previous save,
    so a kill loses at most that much training (None: save only at validations). It skips
    updates that log a row or validate, whose checkpoint would precede their log: with
    log_every_n_steps 1 only validations save."""
    keep_last: int = 0
    """Also keep the checkpoints of the last N validations (recent-stepNNNNNNN.ckpt), whatever
    their BLEU: what `average_last` averages when set (fairseq's last-N averaging)."""
    average_last: int = 0
    """At the end, average the last N checkpoints by step into averaged.ckpt, which is then
    scored: of the `keep_last` ones when kept, else of the best k (0: off)."""
    val_beam: int = 1
    """Beam for validation BLEU (1: greedy, fast); final scores use the `decode` section."""
    early_stopping_patience: int | None = None
    """Stop after this many validations without BLEU improvement (None: never)."""
    compile: bool = False
    """torch.compile the model."""
    seed: int = 1
    """Seed for weights, dropout and data order."""
    threads: int | None = None
    """CPU threads for torch (None: torch's default)."""

    def __post_init__(self) -> None:
        capped = self.max_time_minutes is not None or self.max_epochs is not None
        if self.max_steps < 1 and not (self.max_steps == -1 and capped):
            raise ValueError(
                f"trainer.max_steps={self.max_steps} must be at least 1 (-1, no step limit, "
                "only with trainer.max_time_minutes or trainer.max_epochs)"
            )
        for name in (
            "val_check_interval",
            "log_every_n_steps",
            "accumulate_grad_batches",
            "val_beam",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name}={getattr(self, name)} must be at least 1")
        for name in ("save_top_k", "keep_last", "average_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name}={getattr(self, name)} must be >= 0")
        for name in ("max_time_minutes", "save_every_minutes", "gradient_clip_val"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"trainer.{name}={value} must be a positive number (or null)")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"trainer.max_epochs={self.max_epochs} must be at least 1 (or null)")
        for name in ("devices", "num_nodes"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 1 and not (name == "devices" and value == -1):
                raise ValueError(
                    f"trainer.{name}={value} must be at least 1"
                    + (" (or -1: every device; 'auto')" if name == "devices" else "")
                )


#: Beam search's stopping rules (DecodeConfig.stop): fairseq's and CTranslate2's.
STOP_RULES = ("beam", "best")


@dataclass
class DecodeConfig:
    """Search settings, used for validation BLEU and saved as the model's decoding defaults."""

    beam: int = 5
    """Beam size; 1 is greedy search."""
    nbest: int = 1
    """Hypotheses returned per sentence."""
    lenpen: float = 1.0
    """GNMT length penalty alpha: score / ((5 + |y|) / 6) ** alpha; 0 disables."""
    max_len_a: float = 1.2
    """Maximum output length a * source_length + b."""
    max_len_b: int = 10
    """Maximum output length a * source_length + b."""
    min_len: int = 1
    """Minimum output length (EOS is forbidden before it)."""
    max_tokens: int = 4096
    """Source tokens in one decoding batch, padding included (a longer sentence goes alone)."""
    max_sentences: int | None = None
    """Sentences in one decoding batch at most (fairseq's --batch-size, CTranslate2's
    max_batch_size); None: max_tokens alone cuts batches."""
    stop: str = "beam"
    """When beam search ends a sentence: 'beam' once `beam` hypotheses have ended (fairseq's
    rule, Hugging Face's early_stopping); 'best' as soon as its best candidate ends, once `nbest`
    hypotheses have ended, however many others have (CTranslate2's rule without a length
    penalty): with lenpen 0 the best hypothesis its beams reach, where 'beam' may stop while a
    live beam scores higher. Either ends a sentence sooner once no live beam can reach its
    n-best (an exact bound: the same output; seq2seq.inference.search)."""

    def __post_init__(self) -> None:
        self._check_types()
        if self.stop not in STOP_RULES:
            rules = " or ".join(map(repr, STOP_RULES))
            raise ValueError(f"decode.stop={self.stop!r} must be {rules}")
        if self.beam < 1:
            raise ValueError(f"decode.beam={self.beam} must be at least 1")
        if not 1 <= self.nbest <= self.beam:
            raise ValueError(
                f"decode.nbest={self.nbest} must be between 1 and decode.beam={self.beam}"
            )
        if self.max_tokens < 1:
            raise ValueError(f"decode.max_tokens={self.max_tokens} must be positive")
        if self.max_sentences is not None and self.max_sentences < 1:
            raise ValueError(f"decode.max_sentences={self.max_sentences} must be positive")
        if not math.isfinite(self.lenpen):
            raise ValueError(f"decode.lenpen={self.lenpen} must be a finite number")
        if not (math.isfinite(self.max_len_a) and self.max_len_a >= 0):
            raise ValueError(f"decode.max_len_a={self.max_len_a} must be a finite number >= 0")
        for name in ("max_len_b", "min_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"decode.{name}={getattr(self, name)} must be >= 0")
        if self.max_len_a == 0 and self.max_len_b == 0:
            raise ValueError("decode.max_len_a=0 and decode.max_len_b=0 leave no room for output")

    def _check_types(self) -> None:
        """A recipe or the CLI type-checks these, but the Python API does not: a beam of 2.5
        would otherwise end in torch's topk. bool is refused too (True is an int in Python)."""
        for name in ("beam", "nbest", "max_len_b", "min_len", "max_tokens", "max_sentences"):
            value = getattr(self, name)
            if name == "max_sentences" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"decode.{name}={value!r} must be an integer")
        for name in ("lenpen", "max_len_a"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"decode.{name}={value!r} must be a number")


@dataclass
class Recipe:
    """A whole experiment: what a YAML file in recipes/ describes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Transformer shape."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpora, tokenizer, cleaning and batching."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Training loop."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """The model's decoding defaults (saved in checkpoints; used for the final test scores)."""
