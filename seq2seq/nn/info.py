"""`seq2seq info`: the module tree and where the parameters are, by component and layer.

In the spirit of the classic BERT-base breakdown (embeddings + 12 x layer = 110M):
embeddings + N x encoder layer + N x decoder layer (+ final LayerNorms, untied output).
"""

from __future__ import annotations

from seq2seq.config import ModelConfig
from seq2seq.nn.transformer import Transformer

COMPONENTS = (
    "embeddings",
    "self_attention",
    "cross_attention",
    "feed_forward",
    "layer_norm",
    "output",
)


def component_of(name: str) -> str:
    """Which component a parameter (by its qualified name) belongs to."""
    if "embed" in name:
        return "embeddings"
    if name.startswith("output_"):
        return "output"
    for part, component in (
        ("self_attn.", "self_attention"),
        ("cross_attn.", "cross_attention"),
        ("ffn.", "feed_forward"),
        ("norm", "layer_norm"),
    ):
        if part in name:
            return component
    raise ValueError(f"parameter {name!r} belongs to no known component")


def parameter_breakdown(model: Transformer) -> dict:
    """Counts by component, per encoder/decoder layer, and in total (shared weights once)."""
    totals = dict.fromkeys(COMPONENTS, 0)
    layers: dict[str, dict[str, int]] = {"encoder": {}, "decoder": {}}
    for name, p in model.named_parameters():  # each shared tensor appears once
        component = component_of(name)
        totals[component] += p.numel()
        stack = "encoder" if name.startswith("encoder_layers.0.") else "decoder"
        if name.startswith(("encoder_layers.0.", "decoder_layers.0.")):
            layers[stack][component] = layers[stack].get(component, 0) + p.numel()
    total = sum(totals.values())
    cfg = model.cfg
    per_layer = {
        stack: {**counts, "total": sum(counts.values())} for stack, counts in layers.items()
    }
    return {
        "total_parameters": total,
        "components": totals,
        "shares_percent": {c: round(100 * n / total, 2) for c, n in totals.items()},
        "per_layer": per_layer,
        "stacks": {
            "embeddings": totals["embeddings"],
            "encoder": cfg.n_encoder_layers * per_layer["encoder"].get("total", 0),
            "decoder": cfg.n_decoder_layers * per_layer["decoder"].get("total", 0),
            "final_layer_norms": total
            - totals["embeddings"]
            - totals["output"]
            - cfg.n_encoder_layers * per_layer["encoder"].get("total", 0)
            - cfg.n_decoder_layers * per_layer["decoder"].get("total", 0),
            "output": totals["output"],
        },
        "config": {
            "d_model": cfg.d_model,
            "n_heads": cfg.n_heads,
            "d_ff": cfg.d_ff,
            "n_encoder_layers": cfg.n_encoder_layers,
            "n_decoder_layers": cfg.n_decoder_layers,
            "src_vocab_size": cfg.src_vocab_size,
            "tgt_vocab_size": cfg.tgt_vocab_size,
            "joint_vocab": cfg.joint_vocab,
            "pre_norm": cfg.pre_norm,
        },
    }


def format_breakdown(info: dict) -> str:
    """A human table: the stacks as 'embeddings + N x layer', then the components."""
    total, cfg, per = info["total_parameters"], info["config"], info["per_layer"]

    def row(label: str, n: int) -> str:
        return f"  {label:<44}{n:>14,}  {100 * n / total:6.2f}%"

    def layer_detail(stack: str) -> str:
        parts = [f"{c.replace('_', '-')} {per[stack][c]:,}" for c in COMPONENTS if c in per[stack]]
        return "      per layer: " + ", ".join(parts)

    joint = "shared source/target/output" if cfg["joint_vocab"] else "source + target"
    lines = [
        f"Parameters (d_model {cfg['d_model']}, {cfg['n_heads']} heads, d_ff {cfg['d_ff']}, "
        f"vocab {cfg['src_vocab_size']}/{cfg['tgt_vocab_size']})",
        row(f"embeddings ({joint})", info["stacks"]["embeddings"]),
        row(
            f"encoder: {cfg['n_encoder_layers']} x {per['encoder'].get('total', 0):,}",
            info["stacks"]["encoder"],
        ),
        layer_detail("encoder"),
        row(
            f"decoder: {cfg['n_decoder_layers']} x {per['decoder'].get('total', 0):,}",
            info["stacks"]["decoder"],
        ),
        layer_detail("decoder"),
    ]
    if info["stacks"]["final_layer_norms"]:
        lines.append(row("final LayerNorms (pre-norm)", info["stacks"]["final_layer_norms"]))
    if info["stacks"]["output"]:
        lines.append(row("output projection (untied) / bias", info["stacks"]["output"]))
    lines += [f"  {'total':<44}{total:>14,}", "By component:"]
    lines += [row(c.replace("_", "-"), n) for c, n in info["components"].items() if n]
    return "\n".join(lines)


def describe(cfg: ModelConfig) -> tuple[str, dict]:
    """The module tree as PyTorch prints it, and the breakdown."""
    model = Transformer(cfg)
    return str(model), parameter_breakdown(model)
