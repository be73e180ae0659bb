"""PerceptModel: the PerceptCLIP network on open_clip's vision tower, and the converter from the release.

The release (HF model repos ``PerceptCLIP/PerceptCLIP_*``) is a transformers ``CLIPVisionTransformer``
wrapped by peft (LoRA r=16, alpha=8 on q_proj/k_proj/v_proj), the frozen ``visual_projection`` and a
3-layer MLP head. Here the same network is built on open_clip's ``VisionTransformer``, whose attention
packs q, k and v into one ``in_proj_weight``. peft cannot put three independent adapters on one fused
weight (``target_parameters`` would train a single rank-16 delta for all three), so the adapters live in
``LoRAQKVAttention``, a drop-in replacement for the blocks' ``nn.MultiheadAttention`` that keeps its
state-dict keys and adds ``lora_A`` (3, r, d) and ``lora_B`` (3, d, r): slice 0/1/2 = q/k/v.

Facts and their sources: ../shared/reference/perceptclip.md.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from perceptscore.architecture import Architecture
from perceptscore.errors import CheckpointError


class LoRAQKVAttention(nn.Module):
    """Self-attention with a fused q/k/v projection plus three independent LoRA adapters.

    For each of q, k, v: ``y = x W^T + b + (alpha / r) * B A dropout(x)``, as peft's ``lora.Linear``
    computes it (dropout on the adapter's input branch only). Attention runs through
    ``F.scaled_dot_product_attention`` so the fused kernels are used where the device has them.
    """

    def __init__(self, width: int, heads: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.width, self.heads = width, heads
        self.scaling = alpha / rank
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.lora_A: nn.Parameter | None = nn.Parameter(torch.empty(3, rank, width))
        self.lora_B: nn.Parameter | None = nn.Parameter(torch.zeros(3, width, rank))
        self.lora_dropout = nn.Dropout(dropout)
        self.record: list[torch.Tensor] | None = None  # set by PerceptModel.recording_attention()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        if self.lora_A is not None and self.lora_B is not None:
            # peft's default: A Kaiming-uniform(a=sqrt(5)), B zero, so training starts from the base model.
            for a in self.lora_A:
                nn.init.kaiming_uniform_(a, a=5**0.5)
            nn.init.zeros_(self.lora_B)

    @property
    def merged(self) -> bool:
        return self.lora_A is None

    def lora_delta(self) -> torch.Tensor:
        """The (3*width, width) update the adapters add to ``in_proj_weight``."""
        assert self.lora_A is not None and self.lora_B is not None
        return self.scaling * torch.bmm(self.lora_B, self.lora_A).reshape(3 * self.width, self.width)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapters into ``in_proj_weight`` (exact in eval mode) and drop them."""
        if self.merged:
            return
        # Out of place: the weight may be a private map of a checkpoint file, where writing in place costs
        # a copy-on-write fault per page (5x slower than reading it into fresh memory).
        merged = self.in_proj_weight + self.lora_delta().to(self.in_proj_weight.dtype)
        self.in_proj_weight = nn.Parameter(merged, requires_grad=False)
        self.lora_A = self.lora_B = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        # Called by open_clip's ResidualAttentionBlock as attn(x, x, x, need_weights=False, attn_mask=m).
        x = query
        batch, tokens, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if self.lora_A is not None and self.lora_B is not None:
            low = torch.einsum("bnd,prd->bnpr", self.lora_dropout(x), self.lora_A)
            delta = torch.einsum("bnpr,pdr->bnpd", low, self.lora_B)
            qkv = qkv + self.scaling * delta.reshape(batch, tokens, 3 * self.width)
        q, k, v = qkv.view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.record is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:  # the same attention, computed step by step to keep its probabilities (explain)
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            probs = (scores if attn_mask is None else scores + attn_mask).softmax(dim=-1)
            # Not detached: relevance maps need the output's gradient with respect to these probabilities
            # (under no_grad there is no graph to keep anyway).
            self.record.append(probs)
            out = probs @ v
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, self.width)), None


class PerceptHead(nn.Module):
    """fc1 -> ReLU -> Dropout -> fc2 -> ReLU -> (the same) Dropout -> fc3, no output activation."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], outputs: int, dropout: float) -> None:
        super().__init__()
        h1, h2 = hidden
        self.fc1 = nn.Linear(in_dim, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, outputs)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.relu(self.fc1(x)))
        x = self.dropout(F.relu(self.fc2(x)))
        return self.fc3(x)


class PerceptModel(nn.Module):
    """CLIP vision tower (frozen) + q/k/v LoRA (trainable) + projection (frozen) + MLP head (trainable).

    ``forward(x)`` takes CLIP-normalised (B, 3, H, W) images and returns the raw head outputs (B, outputs),
    as the release's ``clip_lora_model.forward`` does.
    """

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        self.visual = VisionTransformer(
            image_size=arch.image_size,
            patch_size=arch.patch_size,
            width=arch.width,
            layers=arch.layers,
            heads=arch.heads,
            mlp_ratio=arch.mlp_ratio,
            output_dim=arch.embed_dim,
            act_layer=QuickGELU,
            final_ln_after_pool=True,  # LayerNorm only the pooled CLS token: same values, less work
        )
        for block in self.visual.transformer.resblocks:
            block.attn = LoRAQKVAttention(
                arch.width, arch.heads, arch.lora_rank, arch.lora_alpha, arch.lora_dropout
            )
        self.head = PerceptHead(arch.embed_dim, arch.head_dims, arch.outputs, arch.head_dropout)
        for name, param in self.named_parameters():
            param.requires_grad = name.startswith("head.") or ".lora_" in name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images (B, 3, H, W) -> the projected image embedding (B, embed_dim)."""
        return self.visual(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Image embeddings (B, embed_dim) -> raw outputs (B, outputs)."""
        return self.head(features)

    @contextlib.contextmanager
    def recording_attention(self) -> Iterator[list[torch.Tensor]]:
        """Within the block, every forward appends each layer's attention probabilities (B, heads, T, T),
        first layer first, to the list it yields (token 0 is the class token, then the patches row by row).
        Outside it, attention takes the fused SDPA path and keeps nothing."""
        maps: list[torch.Tensor] = []
        layers = [m for m in self.modules() if isinstance(m, LoRAQKVAttention)]
        for layer in layers:
            layer.record = maps
        try:
            yield maps
        finally:
            for layer in layers:
                layer.record = None

    @contextlib.contextmanager
    def adapters_off(self) -> Iterator[None]:
        """Within the block the model is its base CLIP tower: every LoRA adapter is left out (the head stays).
        Needs the unmerged model (``load_model(..., merge=False)``): merged weights hold no base to return to.
        """
        layers = [m for m in self.modules() if isinstance(m, LoRAQKVAttention)]
        if any(layer.merged for layer in layers):
            raise ValueError("adapters_off() needs the unmerged model: load it with merge=False")
        saved = [(layer.lora_A, layer.lora_B) for layer in layers]
        for layer in layers:
            layer.lora_A = layer.lora_B = None
        try:
            yield
        finally:
            for layer, (a, b) in zip(layers, saved, strict=True):
                layer.lora_A, layer.lora_B = a, b

    @property
    def merged(self) -> bool:
        return all(m.merged for m in self.modules() if isinstance(m, LoRAQKVAttention))

    def merge(self) -> PerceptModel:
        """Fold every LoRA adapter into its attention weights; inference only from then on."""
        for module in self.modules():
            if isinstance(module, LoRAQKVAttention):
                module.merge()
        return self

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], arch: Architecture) -> PerceptModel:
        """Build from our own (unmerged) keys, e.g. a converted safetensors file, checking every key."""
        with torch.device("meta"):
            model = cls(arch)
        problems = key_problems(shapes(state_dict), shapes(model.state_dict()))
        if problems:
            raise CheckpointError("keys do not fit the model: " + problems)
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
        return model

    @classmethod
    def from_release(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        base: Architecture | None = None,
        heads: int | None = None,
    ) -> PerceptModel:
        """Build the model from a state dict in the release's key layout (see ``release_key_shapes``).

        Sizes are read from the tensors, so any width/depth works; the number of heads cannot be read
        from shapes and comes from ``heads``, else ``base`` when the width matches it, else width // 64.
        Raises ``CheckpointError`` naming every missing, unexpected or mis-shaped key.
        """
        arch = infer_release_architecture(state_dict, base or Architecture(), heads)
        check_release_keys(state_dict, arch)
        with torch.device("meta"):
            model = cls(arch)
        model.load_state_dict(convert_release_state_dict(state_dict, arch), strict=True, assign=True)
        return model


# ---- the release's key layout ------------------------------------------------------------------

RELEASE_PREFIX = "model.base_model.model."
_LAYER_KEY = re.compile(re.escape(RELEASE_PREFIX) + r"encoder\.layers\.(\d+)\.")


def release_key_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every key of a release checkpoint for ``arch`` and its tensor shape (542 keys for ViT-L/14)."""
    d, r, p = arch.width, arch.lora_rank, arch.patch_size
    mlp = int(d * arch.mlp_ratio)
    tokens = (arch.image_size // p) ** 2 + 1
    h1, h2 = arch.head_dims
    shapes: dict[str, tuple[int, ...]] = {
        "mlp.fc1.weight": (h1, arch.embed_dim), "mlp.fc1.bias": (h1,),
        "mlp.fc2.weight": (h2, h1), "mlp.fc2.bias": (h2,),
        "mlp.fc3.weight": (arch.outputs, h2), "mlp.fc3.bias": (arch.outputs,),
        "proj.weight": (arch.embed_dim, d),
    }  # fmt: skip
    vis = {
        "embeddings.class_embedding": (d,),
        "embeddings.patch_embedding.weight": (d, 3, p, p),
        "embeddings.position_embedding.weight": (tokens, d),
        "pre_layrnorm.weight": (d,), "pre_layrnorm.bias": (d,),
        "post_layernorm.weight": (d,), "post_layernorm.bias": (d,),
    }  # fmt: skip
    for i in range(arch.layers):
        layer = f"encoder.layers.{i}."
        for qkv in "qkv":
            proj = f"{layer}self_attn.{qkv}_proj."
            vis |= {
                f"{proj}base_layer.weight": (d, d), f"{proj}base_layer.bias": (d,),
                f"{proj}lora_A.default.weight": (r, d), f"{proj}lora_B.default.weight": (d, r),
            }  # fmt: skip
        vis |= {
            f"{layer}self_attn.out_proj.weight": (d, d), f"{layer}self_attn.out_proj.bias": (d,),
            f"{layer}layer_norm1.weight": (d,), f"{layer}layer_norm1.bias": (d,),
            f"{layer}layer_norm2.weight": (d,), f"{layer}layer_norm2.bias": (d,),
            f"{layer}mlp.fc1.weight": (mlp, d), f"{layer}mlp.fc1.bias": (mlp,),
            f"{layer}mlp.fc2.weight": (d, mlp), f"{layer}mlp.fc2.bias": (d,),
        }  # fmt: skip
    return shapes | {RELEASE_PREFIX + k: v for k, v in vis.items()}


def infer_release_architecture(
    sd: Mapping[str, torch.Tensor], base: Architecture, heads: int | None = None
) -> Architecture:
    """Read width, depth, patch, image size, MLP ratio, LoRA rank and outputs from the tensors' shapes.

    A key needed here that is absent leaves ``base``'s value; ``check_release_keys`` then names it.
    """

    def shape(key: str) -> tuple[int, ...] | None:
        t = sd.get(key)
        return tuple(t.shape) if t is not None else None

    v = RELEASE_PREFIX
    found: dict[str, float | int] = {}
    if (s := shape(v + "embeddings.patch_embedding.weight")) and len(s) == 4:
        found |= {"width": s[0], "patch_size": s[-1]}
    width = int(found.get("width", base.width))
    patch = int(found.get("patch_size", base.patch_size))
    if (s := shape(v + "embeddings.position_embedding.weight")) and len(s) == 2:
        grid = round((s[0] - 1) ** 0.5)
        if grid * grid == s[0] - 1:
            found["image_size"] = grid * patch
    layer_ids = {int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))}
    if layer_ids:
        found["layers"] = max(layer_ids) + 1
    if (s := shape(v + "encoder.layers.0.mlp.fc1.weight")) and len(s) == 2:
        found["mlp_ratio"] = s[0] / width
    if (s := shape(v + "encoder.layers.0.self_attn.q_proj.lora_A.default.weight")) and len(s) == 2:
        found["lora_rank"] = s[0]
    if (s := shape("proj.weight")) and len(s) == 2:
        found["embed_dim"] = s[0]
    if (s := shape("mlp.fc3.weight")) and len(s) == 2:
        found["outputs"] = s[0]
    if heads is None:
        heads = base.heads if width == base.width else max(1, width // 64)
    return replace(base, **found, heads=heads)


def _listing(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def key_problems(got: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """One line naming missing, unexpected and mis-shaped keys (``None`` when they match exactly)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    misshaped = [
        f"{k} {got[k]} expected {shape}" for k, shape in expected.items() if k in got and got[k] != shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped: {_listing(misshaped)}")
    return "; ".join(problems) or None


def shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def check_release_keys(sd: Mapping[str, torch.Tensor], arch: Architecture) -> None:
    """Raise one ``CheckpointError`` line naming missing, unexpected and mis-shaped keys, if any."""
    problems = key_problems(shapes(sd), release_key_shapes(arch))
    if problems:
        raise CheckpointError("not a PerceptCLIP release state dict: " + problems)


def convert_release_state_dict(sd: Mapping[str, torch.Tensor], arch: Architecture) -> dict[str, torch.Tensor]:
    """Map the release's keys onto ``PerceptModel``'s (the mapping table is in perceptclip.md)."""
    v = RELEASE_PREFIX
    out: dict[str, torch.Tensor] = {
        "visual.class_embedding": sd[v + "embeddings.class_embedding"],
        "visual.conv1.weight": sd[v + "embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd[v + "embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd[v + "pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd[v + "pre_layrnorm.bias"],
        "visual.ln_post.weight": sd[v + "post_layernorm.weight"],
        "visual.ln_post.bias": sd[v + "post_layernorm.bias"],
        "visual.proj": sd["proj.weight"].t().contiguous(),
    }
    for n in (1, 2, 3):
        out[f"head.fc{n}.weight"] = sd[f"mlp.fc{n}.weight"]
        out[f"head.fc{n}.bias"] = sd[f"mlp.fc{n}.bias"]
    renames = {
        "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }  # fmt: skip
    for i in range(arch.layers):
        src, dst = f"{v}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{new}.{kind}"] = sd[f"{src}{old}.{kind}"]

        def qkv(suffix: str, *, src: str = src) -> list[torch.Tensor]:
            return [sd[f"{src}self_attn.{p}_proj.{suffix}"] for p in "qkv"]

        out[f"{dst}attn.in_proj_weight"] = torch.cat(qkv("base_layer.weight"))
        out[f"{dst}attn.in_proj_bias"] = torch.cat(qkv("base_layer.bias"))
        out[f"{dst}attn.lora_A"] = torch.stack(qkv("lora_A.default.weight"))
        out[f"{dst}attn.lora_B"] = torch.stack(qkv("lora_B.default.weight"))
    return out
