"""The models configs name: a char-level decoder-only transformer, an MLP classifier and a
small CNN for square one-channel images given flat (digits: 8 x 8).

Every model maps inputs to logits over `num_classes` (the vocabulary for the LM); the
loss is cross-entropy over the last dimension, so one training step fits all.
Transformer blocks are `model.blocks` (strategies that fragment a model use it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from raylane.validation import check, one_of

MODELS = ("char_transformer", "mlp", "cnn", "gcn", "sage", "gcnii")  # the last three: gnn_models.py
_GNN = ("n_layer", "d_model", "dropout")
USES = {"char_transformer": ("n_layer", "d_model", "n_head", "dropout"), "mlp": ("hidden",), "cnn": ("channels",),
        "gcn": (*_GNN, "gnn_residual"), "sage": (*_GNN, "gnn_residual"), "gcnii": (*_GNN, "gnn_alpha", "gnn_theta")}


@dataclass
class ModelConfig:
    name: str = "char_transformer"
    n_layer: int = 2             # transformer blocks
    d_model: int = 128
    n_head: int = 4
    dropout: float = 0.0
    hidden: list[int] = field(default_factory=lambda: [128, 128])   # mlp hidden widths
    channels: list[int] = field(default_factory=lambda: [16, 32])   # cnn: conv channels (each conv halves the side)
    gnn_alpha: float = 0.1       # gcnii: initial-residual weight (n_layer = depth, d_model = width)
    gnn_theta: float = 0.5       # gcnii: identity-mapping strength (beta_l = log(theta / l + 1))
    gnn_residual: bool = True    # gcn, sage: h + ReLU(conv(h)) per layer (deep stacks train)

    def validate(self, prefix: str) -> None:
        one_of(f"{prefix}.name", self.name, MODELS)
        check(self.n_layer >= 1, f"{prefix}.n_layer", self.n_layer, "must be >= 1")
        check(self.d_model >= 1, f"{prefix}.d_model", self.d_model, "must be >= 1")
        check(self.n_head >= 1 and self.d_model % self.n_head == 0, f"{prefix}.n_head", self.n_head,
              f"must be >= 1 and divide model.d_model={self.d_model}")
        check(0 <= self.dropout < 1, f"{prefix}.dropout", self.dropout, "must be in [0, 1)")
        check(all(h >= 1 for h in self.hidden), f"{prefix}.hidden", self.hidden, "widths must be >= 1")
        check(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), f"{prefix}.channels", self.channels,
              "must be a non-empty list of channel counts >= 1")
        check(0 <= self.gnn_alpha <= 1, f"{prefix}.gnn_alpha", self.gnn_alpha, "must be in [0, 1]")
        check(self.gnn_theta > 0, f"{prefix}.gnn_theta", self.gnn_theta, "must be > 0")


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """GPT-style: token + learned position embeddings, pre-norm blocks, final norm, head."""

    def __init__(self, vocab_size: int, seq_len: int, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = nn.Embedding(seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.apply(self._init)
        # scaled residual projections, as GPT-2 (through `apply`, which DeepSpeed's zero.Init gathers for)
        scaled, std = {id(m) for b in self.blocks for m in (b.proj, b.mlp[2])}, 0.02 / math.sqrt(2 * cfg.n_layer)
        self.apply(lambda m: nn.init.normal_(m.weight, std=std) if id(m) in scaled else None)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class MLP(nn.Module):
    def __init__(self, input_dim: int, num_classes: int, cfg: ModelConfig):
        super().__init__()
        widths = [input_dim, *cfg.hidden]
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class CNN(nn.Module):
    """Flat inputs of a square one-channel image -> [conv 3x3, ReLU, max-pool 2] per entry of
    `channels` -> linear head. The side must stay >= 1 after the pools."""

    def __init__(self, input_dim: int, num_classes: int, cfg: ModelConfig):
        super().__init__()
        self.side = math.isqrt(input_dim)
        check(self.side * self.side == input_dim and self.side >> len(cfg.channels) >= 1, "model.channels",
              cfg.channels, f"cnn needs square images with side >= 2^len(channels); input_dim={input_dim}")
        widths = [1, *cfg.channels]
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
                                    for a, b in zip(widths, widths[1:]))
        out_side = self.side >> len(cfg.channels)
        self.head = nn.Linear(widths[-1] * out_side * out_side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, self.side, self.side)
        for block in self.blocks:
            x = block(x)
        return self.head(x.flatten(1))


# Model families that build a part of the model (a stage's layers): name -> build(cfg, num_classes,
# input_dim, part). A family registers itself here from its own module.
_FAMILIES: dict[str, Callable[..., nn.Module]] = {}


def register_family(name: str, build: Callable[..., nn.Module]) -> None:
    if name in _FAMILIES:
        raise KeyError(f"model family {name!r} is registered twice")
    _FAMILIES[name] = build


def build_model(cfg: ModelConfig, num_classes: int, input_dim: int, seq_len: int, seed: int,
                part: Any = None) -> nn.Module:
    """The same seed gives the same initial parameters in every process. `part` (from the
    strategy's layout) says which part a rank builds; None: the whole model."""
    torch.manual_seed(seed)
    if cfg.name in _FAMILIES:
        return _FAMILIES[cfg.name](cfg, num_classes, input_dim, part)
    assert part is None, f"model {cfg.name!r} has no parts (got {part!r})"
    if cfg.name == "char_transformer":
        check(input_dim == 0, "model.name", cfg.name, "needs token data (data.name=chars)")
        return CharTransformer(num_classes, seq_len, cfg)
    check(input_dim > 0, "model.name", cfg.name, "needs feature data (data.name=synthetic or digits)")
    if cfg.name == "cnn":
        return CNN(input_dim, num_classes, cfg)
    return MLP(input_dim, num_classes, cfg)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _register_gnn() -> None:
    from raylane.workers.gnn_models import GNN_MODELS, build_gnn

    for name in GNN_MODELS:
        register_family(name, build_gnn)


_register_gnn()
