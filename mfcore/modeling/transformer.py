"""DETR-style transformer pieces used by MaskFormer: sine positions, post-norm encoder and decoder layers.

Post-norm means each sub-layer is `x = LayerNorm(x + Dropout(SubLayer(x)))`, as in DETR and the released
MaskFormer. The decoder applies one *shared* final LayerNorm to every layer's output, so all 6 outputs can
be read by the same heads for deep supervision. Attention is `nn.MultiheadAttention(batch_first=True)`
(parameters `in_proj_weight` [3d, d], `in_proj_bias` [3d], `out_proj`), dropout `nn.Dropout`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine positions (DETR): 128 channels per axis, temperature 10000, coordinates normalised
    to (0, 2*pi].  PE(pos, 2i) = sin(pos / T^(2i/d)),  PE(pos, 2i+1) = cos(pos / T^(2i/d)).

    x: [B, C, H, W]  ->  pos: [B, 2*num_pos_feats, H, W] (y channels first, then x channels)

    The positions depend only on (H, W): the last map is kept and reused, which spares ~20 small operators
    per forward (on a GPU, each a kernel launch).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self._last: tuple[tuple, Tensor] | None = None  # ((H, W, device, constants), positions [1, C, H, W])

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        if torch.compiler.is_compiling():  # computed in the graph (the compiler folds it)
            return self.positions(h, w, x.device).expand(b, -1, -1, -1).to(x.dtype)
        key = (h, w, x.device, self.num_pos_feats, self.temperature, self.scale)
        if self._last is None or self._last[0] != key:
            with torch.inference_mode(False):  # an ordinary tensor: reusable by a later training forward
                self._last = (key, self.positions(h, w, x.device))
        return self._last[1].expand(b, -1, -1, -1).to(x.dtype)

    def positions(self, h: int, w: int, device: torch.device) -> Tensor:
        """[1, 2*num_pos_feats, h, w] float32."""
        eps = 1e-6
        # cumulative index 1..H (1..W), then normalised so the last row/column sits at `scale`
        y = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + eps) * self.scale
        x_ = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + eps) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_y = y[:, None] / dim_t  # [H, F]
        pos_x = x_[:, None] / dim_t  # [W, F]
        # even channels take sin, odd channels cos, interleaved
        pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
        pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
        pos = torch.cat((pos_y[:, None, :].expand(h, w, -1), pos_x[None, :, :].expand(h, w, -1)), dim=2)
        return pos.permute(2, 0, 1).unsqueeze(0)


def attend(attn: nn.Module, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """softmax(Q K^T / sqrt(d_h)) V per head, heads concatenated and projected: [B, L, d] from query [B, L, d],
    key, value [B, S, d]. The attention weights are not returned (DETR never reads them)."""
    return attn(query, key, value, need_weights=False)[0]


class EncoderLayer(nn.Module):
    """Post-norm self-attention + FFN layer. src, pos: [B, S, d]."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        q = k = src + pos  # positions go to queries and keys, never to values
        src = self.norm1(src + self.dropout1(attend(self.self_attn, q, k, src)))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class DecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: self-attention among queries (optional, Table VIII), cross-attention to
    the image memory, FFN. tgt, query_pos: [B, N, d]; memory, pos: [B, S, d]."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, self_attention: bool = True):
        super().__init__()
        self.self_attention = self_attention
        if self_attention:
            self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
            self.norm1 = nn.LayerNorm(d_model)
            self.dropout1 = nn.Dropout(dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        if self.self_attention:
            q = k = tgt + query_pos
            tgt = self.norm1(tgt + self.dropout1(attend(self.self_attn, q, k, tgt)))
        attn = attend(self.multihead_attn, tgt + query_pos, memory + pos, memory)
        tgt = self.norm2(tgt + self.dropout2(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class TransformerEncoder(nn.Module):
    """Stack of post-norm encoder layers (no final norm, as DETR's post-norm encoder). src, pos: [B, S, d]."""

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers))
        _xavier_init(self)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos)
        return src


class TransformerDecoder(nn.Module):
    """Stack of decoder layers; the target starts at zeros and the N learned query embeddings act as
    positions. Returns every layer's output after the shared LayerNorm: [L, B, N, d] (every_layer=False:
    only the last one's, [1, B, N, d])."""

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 self_attention: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, nhead, dim_feedforward, dropout, self_attention) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        _xavier_init(self)

    def forward(self, memory: Tensor, pos: Tensor, query_pos: Tensor, every_layer: bool = True) -> Tensor:
        tgt = torch.zeros_like(query_pos)
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
            if every_layer:
                outputs.append(self.norm(tgt))
        return torch.stack(outputs) if every_layer else self.norm(tgt)[None]


def _xavier_init(module: nn.Module) -> None:
    # DETR initialises every matrix of the transformer with Xavier-uniform (biases keep their defaults)
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
