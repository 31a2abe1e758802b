"""What stage 1 trains (`stage1.finetune`), and the small modules the lightweight modes add.

LFM fine-tunes the whole image tower in stage 1; LIFT (Shi et al., ICML 2024) shows that
lightweight fine-tuning keeps more of CLIP's tail-class knowledge. The modes:

- full: every weight of the image tower (LFM's stage 1).
- classifier: the tower frozen; the class weights w_k of z_k = s·cos(W_I F_I(x), w_k),
  initialised from the text features f_T[k] (LIFT's default head), train.
- bitfit: only the tower's biases (every parameter whose name ends in "bias").
- lora: low-rank updates ΔW = (1/r)·(A B)ᵀ of the attention's query and value projections
  in every block, A (d×r) uniform in ±1/√r, B (r×d) zero.
- adaptformer: beside each block's MLP a bottleneck s·up(ReLU(down(LN(h)))) of the block's
  residual stream h after attention, added to the MLP's output; up is zero at the start,
  the scale s is learned from 1.
- vpt: shallow visual prompt tuning: `vpt_length` learned tokens appended to the token
  sequence after the ViT's ln_pre (no position embedding), uniform in ±√(6 / (3·p² + d)) for
  patch side p and width d; they are dropped again before pooling.
- ssf: scale and shift of features (Lian et al. 2022, as LIFT and LIFT+ place it): the
  outputs of each block's four linear layers (the attention's in- and out-projections, the
  MLP's two layers) become y·γ + β, one γ and β per output feature, γ from 1 and β from 0.

The last four need an open_clip ViT image tower and change it in place: their modules live
inside the tower, so its state dict, DDP and torch.compile carry them. LoRA, AdaptFormer and
SSF start as the identity (B and up are zero; γ = 1, β = 0), so before training the model
computes what the plain model computes; VPT's prompts take part in the attention from the
first step.

In every mode but classifier the class weights are the frozen text features, as in LFM; in
every mode stage 2 trains W_I alone on the frozen tower (adapters and class weights
included). The MMS margins, LFM's sampling matrix and ConCutMix's class centres keep
reading the frozen text features: they are the classes' semantics, not the trained head.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lfm_ray.config import FINETUNE_MODES, STAGE2_FINETUNE
from lfm_ray.errors import LfmError
from lfm_ray.model import register_configs, trainable_names

VIT_MODES = ("lora", "adaptformer", "vpt", "ssf")
DEFAULT_VPT_LENGTH = 10  # LIFT's


def lift_width(num_classes: int, blocks: int) -> int:
    """LIFT's default LoRA rank and adapter width: 2^max(0, floor(log2(C / (2 · blocks))))."""
    return 2 ** max(0, math.floor(math.log2(num_classes / (2 * blocks))))


class TuningModule(nn.Module):
    """A module a lightweight mode adds to the tower: its parameters are what stage 1 trains
    (lfm_ray.model.trainable_names finds them by `tuning_module`)."""

    tuning_module = True


# ---- the added modules -----------------------------------------------------------------------
class LowRankUpdate(TuningModule):
    """ΔW = scale · (A B)ᵀ of a d_out × d_in weight, A (d_in × r), B (r × d_out), scale 1/r.

    x Wᵀ + x ΔWᵀ = x Wᵀ + scale · x A B: the LoRA update of one projection."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.rank = rank
        self.scale = 1.0 / rank
        # A as nn.Linear initialises a layer with r inputs (kaiming-uniform with a = √5: the
        # bound is 1/√r), B zero: ΔW starts at zero.
        bound = 1.0 / math.sqrt(rank)
        self.down = nn.Parameter(torch.empty(d_in, rank).uniform_(-bound, bound))
        self.up = nn.Parameter(torch.zeros(rank, d_out))

    def delta(self) -> torch.Tensor:
        """ΔW, (d_out, d_in)."""
        return self.scale * (self.down @ self.up).t()


class ParallelAdapter(TuningModule):
    """AdaptFormer's bottleneck: scale · up(ReLU(down(LN(h)))), added beside the MLP."""

    def __init__(self, width: int, bottleneck: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.norm = norm(width)
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.scale = nn.Parameter(torch.ones(1))
        # down: kaiming-normal with a = √5 (std 1/√(3·width)); up and both biases zero, so
        # the adapter adds nothing before training.
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(torch.relu(self.down(self.norm(h))))


class VisualPrompts(TuningModule):
    """VPT's learned input tokens, (length, width)."""

    def __init__(self, length: int, width: int, patch_area: int):
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch_area + width))  # Xavier-uniform over a patch's pixels
        self.tokens = nn.Parameter(torch.empty(length, width).uniform_(-bound, bound))


class ScaleShift(TuningModule):
    """SSF's scale and shift of one linear layer's outputs: y·γ + β, γ and β (n,) for n
    output features. γ starts at 1 and β at 0 (the identity; LIFT draws γ ~ N(1, 0.02²) and
    β ~ N(0, 0.02²))."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))
        self.shift = nn.Parameter(torch.zeros(width))

    def folded(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer (W, b) followed by the scale and shift, as one layer: (γ ⊙ W, γ ⊙ b + β),
        since (x Wᵀ + b)·γ + β = x (γ ⊙ W)ᵀ + γ ⊙ b + β."""
        return self.scale[:, None] * weight, self.scale * bias + self.shift


# ---- the tower's blocks and the tower, with the modules in place --------------------------------
def _rebadged(module: nn.Module, cls: type) -> nn.Module:
    """A `cls` object holding `module`'s parameters, buffers and submodules (not copies):
    the same module with `cls`'s forward."""
    out = cls.__new__(cls)
    out.__dict__.update(module.__dict__)
    out._parameters = OrderedDict(module._parameters)
    out._buffers = OrderedDict(module._buffers)
    out._modules = OrderedDict(module._modules)
    return out


def _no_cross_attention(k_x: Any, v_x: Any) -> None:
    if k_x is not None or v_x is not None:
        raise ValueError("an image tower's block attends to itself; it takes no k_x or v_x")


def _attention_with(block: nn.Module, q_x: torch.Tensor, attn_mask: torch.Tensor | None,
                    weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The block's own attention module on q_x, run with `weights` (names as in the module:
    in_proj_weight, out_proj.bias, ...) in place of its own."""
    attn_mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
    out = torch.func.functional_call(block.attn, weights, (q_x, q_x, q_x),
                                     {"need_weights": False, "attn_mask": attn_mask})
    return out[0]


def _block_base() -> type:
    from open_clip.transformer import ResidualAttentionBlock

    return ResidualAttentionBlock


class LoRABlock(_block_base()):
    """open_clip's ViT block whose attention runs with in-projection W + [ΔW_q; 0; ΔW_v]."""

    lora_q: LowRankUpdate
    lora_v: LowRankUpdate

    def attention(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None,
                  v_x: torch.Tensor | None = None,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        _no_cross_attention(k_x, v_x)
        weight_q, weight_k, weight_v = self.attn.in_proj_weight.chunk(3)
        merged = torch.cat([weight_q + self.lora_q.delta(), weight_k,
                            weight_v + self.lora_v.delta()])
        return _attention_with(self, q_x, attn_mask, {"in_proj_weight": merged})


class AdaptFormerBlock(_block_base()):
    """open_clip's ViT block with a parallel adapter: x = h + MLP(LN₂(h)) + adapter(h), h the
    residual stream after attention."""

    adapter: ParallelAdapter

    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None,
                v_x: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        _no_cross_attention(k_x, v_x)
        h = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
        return h + self.ls_2(self.mlp(self.ln_2(h))) + self.adapter(h)


class SSFBlock(_block_base()):
    """open_clip's ViT block with SSF on the outputs of its attention's in-projection (q, k and
    v: 3d features) and out-projection, and of its MLP's two layers. Each scale and shift is
    folded into its layer's weight and bias, the same function as scaling the layer's output
    (SSF's own re-parameterisation), so the attention stays PyTorch's."""

    ssf_attn_in: ScaleShift
    ssf_attn_out: ScaleShift
    ssf_mlp_in: ScaleShift
    ssf_mlp_out: ScaleShift

    def attention(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None,
                  v_x: torch.Tensor | None = None,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        _no_cross_attention(k_x, v_x)
        attn = self.attn
        w_in, b_in = self.ssf_attn_in.folded(attn.in_proj_weight, attn.in_proj_bias)
        w_out, b_out = self.ssf_attn_out.folded(attn.out_proj.weight, attn.out_proj.bias)
        return _attention_with(self, q_x, attn_mask, {
            "in_proj_weight": w_in, "in_proj_bias": b_in, "out_proj.weight": w_out,
            "out_proj.bias": b_out})

    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None,
                v_x: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        _no_cross_attention(k_x, v_x)
        x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
        fc, proj = self.mlp.c_fc, self.mlp.c_proj
        h = F.linear(self.ln_2(x), *self.ssf_mlp_in.folded(fc.weight, fc.bias))
        h = F.linear(self.mlp.gelu(h), *self.ssf_mlp_out.folded(proj.weight, proj.bias))
        return x + self.ls_2(h)


def _vit_base() -> type:
    from open_clip.transformer import VisionTransformer

    return VisionTransformer


class PromptedVisionTransformer(_vit_base()):
    """open_clip's ViT with VPT's prompts appended to the token sequence after ln_pre; the
    transformer sees them, pooling does not."""

    prompts: VisualPrompts

    def forward(self, x: torch.Tensor):
        x = self._embeds(x)  # patches, class token, positions, ln_pre
        prompts = self.prompts.tokens.to(x.dtype).expand(x.shape[0], -1, -1)
        x = self.transformer(torch.cat([x, prompts], dim=1))
        pooled, tokens = self._pool(x[:, :-prompts.shape[1]])
        if self.proj is not None:
            pooled = pooled @ self.proj
        if self.output_tokens:
            return pooled, tokens
        return pooled


# ---- which towers take the ViT modes -----------------------------------------------------------
def _not_a_vit(mode: str, what: str, model_name: str | None) -> LfmError:
    model = f"model {model_name}'s" if model_name else "this model's"
    return LfmError(
        f"stage1.finetune={mode} adds modules to the blocks of an open_clip ViT image tower "
        f"(ViT-B-32, ViT-B-16, ViT-L-14, tiny, ...); {model} image tower is {what}. Use "
        f"full, classifier or bitfit with it, or a ViT model")


def check_architecture(model_name: str, mode: str) -> None:
    """LfmError where `mode` needs a ViT and open_clip's config of `model_name` says its image
    tower is not one (ResNets, timm towers); before anything is built. Models whose config
    is not in open_clip's registry (hf-hub:, local-dir:) are checked when they are built."""
    if mode not in VIT_MODES:
        return
    import open_clip

    register_configs()
    cfg = open_clip.get_model_config(model_name.replace("/", "-")) or {}
    vision = cfg.get("vision_cfg")
    if not vision:
        return
    if vision.get("timm_model_name"):
        raise _not_a_vit(mode, f"the timm model {vision['timm_model_name']}", model_name)
    if not isinstance(vision.get("layers"), int):
        raise _not_a_vit(mode, "a ResNet", model_name)


def _vit_blocks(visual: nn.Module, mode: str, model_name: str | None) -> nn.ModuleList:
    """The tower's blocks, where it is an open_clip ViT of plain self-attention blocks."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if type(visual) is not VisionTransformer or blocks is None:
        raise _not_a_vit(mode, type(visual).__name__, model_name)
    for block in blocks:
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv") \
                or not isinstance(block.attn, nn.MultiheadAttention) \
                or block.attn.in_proj_weight is None:
            raise _not_a_vit(mode, f"a ViT of {type(block).__name__} blocks (not open_clip's "
                             "plain self-attention ResidualAttentionBlock)", model_name)
    return blocks


# ---- the modes ---------------------------------------------------------------------------------
def _nothing(model: nn.Module, sizes: dict[str, int], model_name: str | None) -> None:
    """full and bitfit add nothing: they choose among the tower's own parameters."""


def _classifier(model: nn.Module, sizes: dict[str, int], model_name: str | None) -> None:
    model.class_weights = nn.Parameter(model.text_features.detach().clone())


def _lora(model: nn.Module, sizes: dict[str, int], model_name: str | None) -> None:
    blocks = _vit_blocks(model.visual, "lora", model_name)
    for i, block in enumerate(blocks):
        d = block.attn.embed_dim
        new = _rebadged(block, LoRABlock)
        new.lora_q = LowRankUpdate(d, d, sizes["lora_rank"])
        new.lora_v = LowRankUpdate(d, d, sizes["lora_rank"])
        blocks[i] = new


def _adaptformer(model: nn.Module, sizes: dict[str, int], model_name: str | None) -> None:
    blocks = _vit_blocks(model.visual, "adaptformer", model_name)
    for i, block in enumerate(blocks):
        width = block.ln_2.normalized_shape[0]
        new = _rebadged(block, AdaptFormerBlock)
        # The adapter normalises h with the block's own kind of LayerNorm.
        new.adapter = ParallelAdapter(width, sizes["adapter_dim"], type(block.ln_2))
        blocks[i] = new


def _vpt(model: nn.Module, sizes: dict[str, int], model_name: str | None) -> None:
    _vit_blocks(model.visual, "vpt", model_name)
    visual = _rebadged(model.visual, PromptedVisionTransformer)
    width = visual.class_embedding.shape[-1]
    patch_h, patch_w = visual.patch_size
    visual.prompts = VisualPrompts(sizes["vpt_length"], width, patch_h * patch_w)
    model.visual = visual


def _ssf(model: nn.Module, sizes: dict[str, int], model_name: str | None) -> None:
    blocks = _vit_blocks(model.visual, "ssf", model_name)
    for i, block in enumerate(blocks):
        new = _rebadged(block, SSFBlock)
        new.ssf_attn_in = ScaleShift(block.attn.in_proj_weight.shape[0])
        new.ssf_attn_out = ScaleShift(block.attn.out_proj.weight.shape[0])
        new.ssf_mlp_in = ScaleShift(block.mlp.c_fc.weight.shape[0])
        new.ssf_mlp_out = ScaleShift(block.mlp.c_proj.weight.shape[0])
        blocks[i] = new


MODES: dict[str, Callable[[nn.Module, dict[str, int], str | None], None]] = {
    "full": _nothing,
    "classifier": _classifier,
    "bitfit": _nothing,
    "lora": _lora,
    "adaptformer": _adaptformer,
    "vpt": _vpt,
    "ssf": _ssf,
}
assert tuple(MODES) == FINETUNE_MODES  # config.py lists the names for --help


def _block_count(visual: nn.Module) -> int:
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    return len(blocks) if blocks is not None else 1


def resolved_sizes(stage_cfg: Any, num_classes: int, blocks: int) -> dict[str, int]:
    """The lightweight modes' sizes: the stage's fields, LIFT's defaults where None."""
    width = lift_width(num_classes, blocks)
    return {"lora_rank": stage_cfg.lora_rank or width,
            "adapter_dim": stage_cfg.adapter_dim or width,
            "vpt_length": stage_cfg.vpt_length or DEFAULT_VPT_LENGTH}


def prepare(model: nn.Module, stage_cfg: Any, num_classes: int,
            model_name: str | None = None) -> dict[str, int]:
    """Give an LFMClassifier what stage 1's mode (`stage_cfg.finetune`) trains, in place:
    the ViT modes' modules inside its tower, classifier's trainable class weights. Call it
    once, before checkpoints are loaded, DDP wraps the model or the tower is compiled.
    Returns the sizes used (lora_rank, adapter_dim, vpt_length)."""
    mode = stage_cfg.finetune
    if mode not in MODES:
        raise LfmError(f"stage1.finetune={mode!r} is not valid; expected one of "
                       f"{', '.join(MODES)}")
    if hasattr(model, "trainable_names"):  # a model that says itself what it trains (timm)
        if mode != "full":
            raise LfmError(f"stage1.finetune={mode!r} is for open_clip ViTs")
        return {}
    if getattr(model, "finetune", "full") != "full":
        raise ValueError(f"the model is already prepared for {model.finetune}")
    sizes = resolved_sizes(stage_cfg, num_classes, _block_count(model.visual))
    MODES[mode](model, sizes, model_name)
    model.finetune = mode
    return sizes


def trained_params(model: nn.Module) -> dict[str, int]:
    """How many numbers each stage trains: {"trained_params_stage1": n1, "..._stage2": n2}."""
    sizes = dict(model.named_parameters())
    return {f"trained_params_stage{s}": sum(sizes[n].numel() for n in trainable_names(model, s))
            for s in (1, 2)}


__all__ = [
    "FINETUNE_MODES", "MODES", "STAGE2_FINETUNE", "VIT_MODES", "AdaptFormerBlock", "LoRABlock",
    "PromptedVisionTransformer", "SSFBlock", "check_architecture", "prepare", "trainable_names",
    "trained_params",
]
