"""The `seq2seq` command: subcommands, each handler calling one library function; no logic.

Errors a user can cause (bad recipe, bad data, bad checkpoint, bad input file) surface as
one line on stderr and a non-zero exit; set SEQ2SEQ_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import select
import signal
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn


def _add_model_choice(p: argparse.ArgumentParser) -> None:
    from seq2seq.cli.decode import at_least

    p.add_argument("recipe", nargs="?", help="a recipe YAML (its model section)")
    p.add_argument(
        "--preset",
        help="a named shape: base, big, small, iwslt, or tiny (32 wide, for tests; the "
        "Transformer-tiny baseline is recipes/multi30k_en_de_tiny.yaml)",
    )
    p.add_argument(
        "--vocab-size",
        type=at_least(1),
        help="joint vocabulary size (default: the recipe's tokenizer size)",
    )


def _cmd_info(args: argparse.Namespace, overrides: list[str]) -> int:
    from seq2seq.nn.info import describe, format_breakdown
    from seq2seq.recipe import model_config_for

    cfg = model_config_for(args.recipe, args.preset, args.vocab_size, overrides)
    tree, breakdown = describe(cfg)
    if args.json:
        print(json.dumps(breakdown, indent=2))
    else:
        print(tree)
        print(format_breakdown(breakdown))
    return 0


def _cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    from seq2seq.data.report import format_report, prepare
    from seq2seq.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides)
    report = prepare(recipe.data, args.run_dir or _default_run_dir(args.recipe))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from seq2seq.recipe import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe, overrides)
    if args.print_config:
        print(dump_recipe(recipe), end="")
        return 0
    from seq2seq.training.train import Interrupted, run_finished, train

    run_dir = args.run_dir or _default_run_dir(args.recipe)
    try:
        results = train(
            recipe,
            run_dir,
            init_from=args.init_from,
            recipe_path=args.recipe,
            overwrite=args.overwrite,
        )
    except Interrupted:
        raise
    except KeyboardInterrupt as err:  # before training began (data preparation), or after
        raise Interrupted(
            Path(run_dir), isinstance(err, Terminated), run_finished(run_dir, recipe)
        ) from err
    if results:  # DDP's other ranks return none: one JSON object on stdout
        print(json.dumps(results, indent=2))
    return 0


def _cmd_plot(args: argparse.Namespace, overrides: list[str]) -> int:
    from seq2seq.training.plot import plot_run

    print(plot_run(args.run_dir))
    return 0


def _cmd_translate(args: argparse.Namespace, overrides: list[str]) -> int:
    from seq2seq.inference.translate import translate_cli

    return translate_cli(args)


def _cmd_evaluate(args: argparse.Namespace, overrides: list[str]) -> int:
    from seq2seq.inference.evaluate import evaluate_cli

    return evaluate_cli(args)


def _cmd_average(args: argparse.Namespace, overrides: list[str]) -> int:
    from seq2seq.training.average import average_cli

    return average_cli(args)


def _refuse_unused_bench_options(args: argparse.Namespace) -> None:
    """An option given where this bench would not read it is one line naming what reads it."""
    from seq2seq.cli.decode import TRAINING_DEFAULTS

    beside = bool(args.model and args.against)  # decoding beside another engine
    decodes = bool(args.profile or beside)  # the test sentences, batch by batch: no training
    ct2 = "is for -m MODEL --against ctranslate2"
    model = "sets how -m MODEL decodes: give -m MODEL"
    rows = [
        ("--against-compute-type", args.against_compute_type is not None, beside, ct2),
        ("--against-inter-threads", args.against_inter_threads is not None, beside, ct2),
        ("--whole-process", args.whole_process, beside, ct2),  # beside: compare_cli checks
        ("--rounds", args.rounds is not None, beside, "is for -m MODEL --against"),
        ("--stop", args.stop is not None, bool(args.model), model),
        ("--decode-precision", args.decode_precision != "fp32", bool(args.model), model),
        *(
            (
                "--" + name.replace("_", "-"),
                getattr(args, name) != default,
                not decodes,
                "sets the training step's timing, which this bench skips",
            )
            for name, default in TRAINING_DEFAULTS.items()
        ),
        (
            "--max-sentences",
            args.max_sentences is not None,
            decodes,
            "batches the decoding of --against or --profile: give -m MODEL too",
        ),
        (
            "--sentences",
            args.sentences is not None,
            decodes,
            "is for -m MODEL with --against or --profile",
        ),
    ]
    for flag, given, used, what in rows:
        if given and not used:
            raise ValueError(f"{flag} {what}")


def _cmd_bench(args: argparse.Namespace, overrides: list[str]) -> int:
    _refuse_unused_bench_options(args)
    if args.profile:
        if args.against:
            raise ValueError("--profile profiles our decoding alone: drop --against")
        from seq2seq.inference.profile import profile_cli
        from seq2seq.training.bench import bench_recipe

        return profile_cli(args, bench_recipe(args.recipe, args.preset, overrides).data)
    if args.against and args.model:  # decoding beside an exported copy: no training measured
        from seq2seq.export.compare import compare_cli
        from seq2seq.training.bench import bench_recipe

        return compare_cli(args, bench_recipe(args.recipe, args.preset, overrides).data)
    peer = None
    if args.against:  # training beside HF's MarianMTModel, on the same batches
        from seq2seq.export.peer import HfTrainingPeer, check_training_peer

        check_training_peer(args)  # before Lightning is imported, which imports transformers
        peer = HfTrainingPeer
    from seq2seq.training.bench import bench_cli

    return bench_cli(args, overrides, peer)


def _cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    from seq2seq.export import export

    print(export(args.model, args.to, args.out, args.quantization, args.overwrite))
    return 0


def _default_run_dir(recipe: str | None) -> str:
    name = os.path.splitext(os.path.basename(recipe or "run"))[0]
    return os.path.join("runs", name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seq2seq", description="Train Transformer translation models, translate, evaluate."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="module tree and parameter breakdown of a preset or recipe")
    _add_model_choice(p)
    p.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    p.set_defaults(handler=_cmd_info)

    p = sub.add_parser("prepare", help="run the data path of a recipe and report on it")
    p.add_argument("recipe", help="a recipe YAML")
    p.add_argument("--run-dir", help="where the tokenizer and caches go (default runs/<recipe>)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_cmd_prepare)

    p = sub.add_parser("train", help="train a model from a recipe (resumes an existing run)")
    p.add_argument(
        "recipe", help="a recipe YAML; dotted overrides follow, e.g. --trainer.max_steps 100"
    )
    p.add_argument("--run-dir", help="run directory (default runs/<recipe name>)")
    p.add_argument(
        "--init-from", help="fine-tune: start from this checkpoint's weights and tokenizer"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh: remove the run directory's earlier checkpoints, logs, tokenizer, caches "
        "and results first",
    )
    p.add_argument(
        "--print_config", "--print-config", action="store_true", help="print the resolved recipe"
    )
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("plot", help="draw curves.png of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(handler=_cmd_plot)

    from seq2seq.cli.decode import add_average, add_bench, add_evaluate, add_translate

    add_translate(sub, _cmd_translate)
    add_evaluate(sub, _cmd_evaluate)
    add_average(sub, _cmd_average)
    add_bench(sub, _cmd_bench)

    p = sub.add_parser(
        "export",
        help="write a model as a Hugging Face MarianMTModel folder or a CTranslate2 model",
        description="Export a run directory's model (or a checkpoint) to OUT. Needs the export "
        "extra: pip install -e .[export].",
    )
    p.add_argument("-m", "--model", required=True, help="a run directory or a checkpoint file")
    p.add_argument("--to", required=True, choices=["hf", "ctranslate2"], help="the format")
    p.add_argument("out", metavar="OUT", help="the output folder (new or empty)")
    p.add_argument("--quantization", help="ctranslate2: weight type, e.g. int8 (default: float32)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export's files in OUT"
    )
    p.set_defaults(handler=_cmd_export)
    return parser


#: Commands whose `--section.key value` arguments are recipe overrides.
_TAKES_OVERRIDES = {"info", "prepare", "train", "bench"}
_SECTIONS = ("--model.", "--data.", "--optim.", "--trainer.", "--decode.")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate recipe overrides (`--trainer.max_steps 100` or `--trainer.max_steps=100`)
    from the command's own arguments, so an override's value is never taken for a positional."""
    own, overrides, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token.startswith(_SECTIONS):
            takes_value = "=" not in token and i + 1 < len(argv)
            overrides += argv[i : i + 1 + takes_value]
            i += 1 + takes_value
        else:
            own.append(token)
            i += 1
    return own, overrides


#: oneDNN (bf16 matmuls, and float32 linear layers in training, on a CPU) keeps a compiled
#: kernel per matmul shape, up to 1,024 of them in its own cache and 1,024 in torch's ideep
#: layer above it, and variable-length batches make many shapes: bf16 training's memory grew by
#: about a gigabyte that way, float32 training's by 2.3 GB in 200 steps. 64 each bounds it at no
#: cost in speed (the default recipe's training runs peak at 1.4-1.9 GiB: README, "Recipes").
#: Set before torch first uses oneDNN; a value the user exported wins.
RUNTIME_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}


def import_torch_untracked() -> None:
    """Import torch with Python's cyclic garbage collector off, then freeze what the import
    made (the console script's process only: it lives until the command ends).

    torch's import makes some 170,000 objects, and the collector scanned them as they came:
    on the 2-core Intel Xeon G, 380 collections took 0.21-0.24 s of a one-line `seq2seq
    translate` (three full collections 0.14-0.17 s of it), 0.2-0.5 s of a 1,000-line one.
    Frozen, they are never scanned again, here or in the stream processes forked from this one
    (a scan writes to each object it visits, copying its page into the child). Objects made
    later are collected as usual."""
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        gc.freeze()
        gc.enable()


def use_attention_kernels() -> None:
    """Leave cuDNN's fused attention out of torch's SDPA choices (flash and memory-efficient
    attention remain). On an H100 in bf16 torch tries cuDNN first, and cuDNN builds an execution
    plan for every new shape: about 8 ms of host time per attention call, and variable-length
    batches and incremental decoding make a new shape nearly every call."""
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that files being written are cleaned up and the
    command ends with one line and exit 143 (128 + SIGTERM), as Ctrl-C ends with 130."""

    exit_code = 143


def _terminated(signum: int, frame: object) -> None:
    raise Terminated("terminated")


#: Commands whose process `run` ends with os._exit once their output is flushed and closed:
#: the interpreter's teardown of torch's thousand-odd modules took 0.4-0.6 s of every
#: `seq2seq translate` on a 2-core AMD EPYC (`python -c "import torch"` 1.58-1.71 s, with
#: os._exit(0) after the import 1.09-1.16 s). They leave no thread, buffer or temporary file
#: behind when they return; train (Lightning's loggers flush at exit) and the rest end normally.
QUICK_EXIT = frozenset({"translate", "evaluate"})


def run() -> None:
    """The console script (`seq2seq`, `python -m seq2seq`): `main`, then exit, skipping the
    interpreter's teardown after a successful QUICK_EXIT command."""
    code = main(quick_exit=True)
    try:
        if sys.stdout is not None:  # None: closed by the caller (`>&-`)
            sys.stdout.flush()  # here, not in the interpreter's teardown, which would print
    except BrokenPipeError:
        code = _reader_gone()
    sys.exit(code)


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (a BrokenPipeError may also come
    from a pipe to a child process, which is a failure to report)."""
    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no fd (captured), no poll (Windows)
        return False


#: The exit code of a command whose reader went away (`| head`): 128 + SIGPIPE, as a shell's.
BROKEN_PIPE_EXIT = 128 + getattr(signal, "SIGPIPE", 13)


def _reader_gone() -> int:
    """Stdout's reader closed the pipe: stop quietly, as Unix tools do (what is still
    buffered for stdout goes nowhere), and return BROKEN_PIPE_EXIT."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return BROKEN_PIPE_EXIT


def _exit_now(code: int) -> NoReturn:
    """Flush what the command wrote to stdout, stderr and the log, then end the process."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # closed by the caller (`>&-`)
            continue
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)


def users_error(err: BaseException) -> bool:
    """Whether an error is the user's to fix, reported in one line: ValueError, OSError and
    RuntimeError, and Lightning's refusal of a trainer setting (`--trainer.devices 0`), named
    rather than imported (importing Lightning here would slow every command). Others are bugs
    of ours: their traceback shows."""
    return (
        isinstance(err, ValueError | OSError | RuntimeError)
        or type(err).__name__ == "MisconfigurationException"
    )


def error_line(err: BaseException) -> str:
    """An error as one line. An OSError about a file reads 'FILE: what' ("in.en: no such
    file or directory", where Python says "[Errno 2] No such file or directory: 'in.en'")."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{os.fsdecode(err.filename)}: {err.strerror[:1].lower()}{err.strerror[1:]}"
    return " ".join(str(err).split()) or type(err).__name__


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a record comes (a caller, or a
    test's capture, may have replaced it since)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def show_own_log() -> None:
    """Print this package's log records, INFO and up, on stderr as 'LEVEL: message': what a
    command did that a user should know (a run resumed, a tokenizer trained, the pairs cleaning
    kept, a file named for another language). Without it only warnings reached a terminal, bare,
    and only `translate` set anything up. Other libraries' loggers are left alone (Lightning's
    has its own handler); records still propagate, so a root handler a caller set up sees them."""
    logger = logging.getLogger("seq2seq")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)


def main(argv: Sequence[str] | None = None, quick_exit: bool = False) -> int:
    """The `seq2seq` command on `argv` (default sys.argv[1:]); returns the exit code. With
    `quick_exit` (the console script only, never a caller that goes on), torch is imported
    untracked by the garbage collector (`import_torch_untracked`) and a successful QUICK_EXIT
    command ends the process itself (`_exit_now`)."""
    for key, value in RUNTIME_ENV.items():
        os.environ.setdefault(key, value)
    parser = build_parser()
    own, extra = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(own)
    if quick_exit:  # the console script: this process is the command's own
        import_torch_untracked()
    use_attention_kernels()  # after parsing: --help need not import torch
    if extra and args.command not in _TAKES_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    show_own_log()
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        code = args.handler(args, extra)
        if quick_exit and code == 0 and args.command in QUICK_EXIT:
            _exit_now(code)
        return code
    except KeyboardInterrupt as err:
        said = str(err) or ("terminated" if isinstance(err, Terminated) else "interrupted")
        print(f"seq2seq {args.command}: {said}", file=sys.stderr)
        return getattr(err, "exit_code", 130)
    except Exception as err:
        if isinstance(err, BrokenPipeError) and stdout_reader_gone():
            return _reader_gone()
        if not users_error(err) or os.environ.get("SEQ2SEQ_DEBUG"):
            raise
        print(f"seq2seq {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    run()
