"""`python -m seq2seq` is the `seq2seq` command."""

from seq2seq.cli import run

run()
