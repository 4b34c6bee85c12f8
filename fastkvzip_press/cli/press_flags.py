"""The flags that build a press and read gates, defined once for ``generate``, ``compress`` and ``eval``.

Every press flag parses to ``None`` when it is not given (its help says the default), so a command can tell a flag
given on purpose from its default: ``generate --cache`` refuses press flags, which only ``compress`` uses.
"""

from __future__ import annotations

import argparse

from fastkvzip_press.cli.arguments import fraction, integer, window

# Defaults of the press flags (FastKVzipPress's own, except the seed of random gates).
PRESS_DEFAULTS = {
    "ratio": 0.5,
    "threshold": None,
    "gates": "default",
    "seed": 0,
    "n_sink": 4,
    "window_size": 0.02,
    "compaction": "ragged",
    "chunk_size": None,
}
GATES_HELP = "'default' (the trained gates shipped for the model, else the released ones), 'random' (untrained, "
GATES_HELP += "seeded by --seed) or a gate file or folder"


def add_gates_argument(command: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--gates``; ``default=None`` leaves it ``None`` when not given (read as 'default')."""
    command.add_argument("--gates", default=default, metavar="GATES", help=f"{GATES_HELP} (default: default)")


def add_press_arguments(command: argparse.ArgumentParser) -> None:
    """The press's flags, shared by ``generate`` and ``compress``."""
    command.add_argument(
        "--ratio",
        type=fraction(0, 1, high_open=True),
        metavar="R",
        help="compression ratio: the fraction of the context's KV pairs removed, in [0, 1) (default: 0.5)",
    )
    command.add_argument(
        "--threshold",
        type=fraction(0, 1),
        metavar="T",
        help="adaptive budget instead of --ratio: evict pairs whose gate score is below T, in [0, 1]",
    )
    add_gates_argument(command)
    command.add_argument(
        "--seed", type=integer(0), metavar="N", help="seed of --gates random, an integer >= 0 (default: 0)"
    )
    command.add_argument(
        "--n-sink", type=integer(0), metavar="N", help="leading tokens never evicted, an integer >= 0 (default: 4)"
    )
    command.add_argument(
        "--window-size",
        type=window,
        metavar="W",
        help="recent tokens never evicted: a token count >= 0, or a fraction of the context in (0, 1) (default: 0.02)",
    )
    command.add_argument(
        "--compaction",
        choices=["ragged", "masked"],
        help="'ragged' frees the evicted pairs' memory; 'masked' (kvpress's reference) only masks them "
        "(default: ragged)",
    )
    command.add_argument(
        "--chunk-size",
        type=integer(1),
        metavar="N",
        help="prefill in chunks of N >= 1 tokens, evicting after each (default: the whole context at once)",
    )


def check_press_flags(args: argparse.Namespace) -> str | None:
    if args.ratio is not None and args.threshold is not None:
        return (
            f"--ratio {args.ratio} and --threshold {args.threshold} are two budgets: give --ratio (a fraction "
            "removed) or --threshold (a gate score), not both"
        )
    if args.chunk_size is not None and args.compaction == "masked":
        return "--chunk-size needs --compaction ragged (a masked prefill is decided at once)"
    return None


def given_press_flags(args: argparse.Namespace) -> list[str]:
    """The press flags given on the command line, as flags (``--ratio``, ...)."""
    return [f"--{name.replace('_', '-')}" for name in PRESS_DEFAULTS if getattr(args, name, None) is not None]


def setting(args: argparse.Namespace, name: str):
    """A press flag's value, or its default when it was not given."""
    value = getattr(args, name, None)
    return PRESS_DEFAULTS[name] if value is None else value


def gate_bank_for(args: argparse.Namespace, model):
    """The gates ``--gates`` names, checked against ``model``: 'default' (shipped, else released), 'random'
    (untrained, seeded by ``--seed``) or a gate file or folder."""
    from fastkvzip_press.gates import GateBank, load_gates
    from fastkvzip_press.layout import ModelLayout

    gates = setting(args, "gates")
    if gates == "random":
        return GateBank.random(ModelLayout.from_model(model), seed=setting(args, "seed"))
    source = None if gates == "default" else gates
    return load_gates(source, model, allow_other_model=args.allow_other_model)


def gate_label(args: argparse.Namespace, gates, model_id: str) -> str:
    """How ``generate`` names the gates it ran with on model ``model_id``."""
    name = setting(args, "gates")
    if name == "random":
        return f"RANDOM untrained gates (seed {setting(args, 'seed')}): eviction is arbitrary, expect worse answers"
    if name == "default":
        training = gates.metadata.training
        corpus = training.get("config", {}).get("corpus", "?")
        return (
            f"shipped trained gates for {model_id} "
            f"({training.get('train_tokens', '?')} training tokens, corpus {corpus})"
        )
    return f"gates from {name}"


def press_from_arguments(args: argparse.Namespace, gates):
    """The FastKVzipPress that the press flags (:func:`add_press_arguments`) describe."""
    from fastkvzip_press.presses import FastKVzipPress

    threshold = setting(args, "threshold")
    return FastKVzipPress(
        compression_ratio=0.0 if threshold is not None else setting(args, "ratio"),
        threshold=threshold,
        gates=gates,
        n_sink=setting(args, "n_sink"),
        window_size=setting(args, "window_size"),
        compaction=setting(args, "compaction"),
        chunk_size=setting(args, "chunk_size"),
    )
