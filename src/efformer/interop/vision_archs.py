"""Declarative mappings of Hugging Face vision classifiers onto efformer's ImageClassifier.

Same scheme as ``archs.py`` (a config function and weight ``Rule``s), but the rules depend on the
checkpoint's stage layout (depths per stage), so each architecture gives a function of the HF config
that returns them with every stage and block index filled in. Architectures: ViT, DeiT (with its
distillation head), Swin, Swin V2, PVT, PVT v2, CvT and PoolFormer. A config setting that efformer's model does not
reproduce is refused with the setting's name, never approximated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from efformer.errors import CheckpointError
from efformer.interop.archs import Rule, _ffn, r, wb, wbs


@dataclass(frozen=True)
class VisionArch:
    """A Hugging Face vision architecture: config mapping, rules from the config, accepted classes."""

    config: Callable[[dict], dict]
    rules: Callable[[dict], list[Rule]]
    classes: tuple[str, ...]  # the ``architectures`` entries it imports (their heads)
    ignore: tuple[str, ...] = ("relative_position_index", "relative_coords_table", "position_ids")


def wb2(ef: str, saved: str, live: str, how="same") -> list[Rule]:
    """``wb`` for a module HF names two ways: as ``save_pretrained`` writes it (the layout of earlier
    transformers versions) and as the loaded model names it; either is accepted."""
    return [r(f"{ef}.{k}", f"{saved}.{k}|{live}.{k}", how) for k in ("weight", "bias")]


def cat2(ef: str, pairs: list[tuple[str, str]]) -> list[Rule]:
    """Fused ``ef`` weight and bias from several modules, each named two ways (see ``wb2``)."""
    return [r(f"{ef}.{k}", tuple(f"{s}.{k}|{v}.{k}" for s, v in pairs), "cat") for k in ("weight", "bias")]


# ---- transforms (import only) -------------------------------------------------------------------
def _reshape(hf: list[Tensor], shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """One tensor reshaped: (1, 1, d) tokens -> (1, d), 1x1 conv (o, i, 1, 1) -> linear (o, i), ..."""
    return [hf[0].reshape(shapes[0]) if hf[0].numel() == torch.Size(shapes[0]).numel() else hf[0]]


def _tokens(hf: list[Tensor], shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """Class / distillation tokens (1, 1, d) each -> one (n, d) table."""
    return [torch.cat([t.reshape(-1, t.shape[-1]) for t in hf])]


def _row_split(hf: list[Tensor], shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """A position table (1, extra + N, d) -> the extra tokens' rows (extra, d) and the grid's (N, d)."""
    table = hf[0].reshape(-1, hf[0].shape[-1])
    return list(table.split([s[0] for s in shapes])) if table.shape[0] == sum(s[0] for s in shapes) else [table, table]


def _conv_as_patch_linear(hf: list[Tensor], shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """PVT's reduction conv (d, d, r, r) -> efformer's W^S (d, r*r*d), rows ordered (dy, dx, channel)."""
    w = hf[0]
    return [w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)]


def _qkv_bias_no_key(hf: list[Tensor], shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """Swin V2's query and value biases (its key has none) -> the fused q|k|v bias with a zero key part."""
    q, v = hf
    return [torch.cat([q, torch.zeros_like(q), v])]


# ---- config helpers ----------------------------------------------------------------------------
def _classes(c: dict) -> int:
    labels = c.get("id2label")
    n = len(labels) if isinstance(labels, dict) and labels else int(c.get("num_labels", 2))
    if n < 2:
        raise CheckpointError(f"config.json: {n} label(s); efformer imports classifiers of 2 or more classes "
                              "(a 1-label head is regression)")
    return n


def _side(c: dict, key: str = "image_size") -> int:
    v = c[key]
    if isinstance(v, list | tuple):
        if len(set(v)) != 1:
            raise CheckpointError(f"config.json: {key}={v} is not square; efformer's image models take one side")
        v = v[0]
    return int(v)


def _require(c: dict, **wanted) -> None:
    for key, ok in wanted.items():
        if key in c and c[key] != ok and not (isinstance(ok, tuple) and c[key] in ok):
            raise CheckpointError(f"config.json: {key}={c[key]!r} is not supported (efformer's model needs "
                                  f"{key}={ok!r}); use a checkpoint without it")


def _ln_default(c: dict, key: str = "layer_norm_eps") -> None:
    """Swin's patch and merge norms use torch's default eps whatever the config says; so must the blocks."""
    if c.get(key, 1e-5) != 1e-5:
        raise CheckpointError(f"config.json: {key}={c[key]} differs from the 1e-5 Swin's patch norms use; "
                              "efformer gives every norm of a model one eps, so this checkpoint cannot be matched")


# ---- ViT and DeiT ------------------------------------------------------------------------------
def _vit_config(c: dict, distillation: bool = False) -> dict:
    d = c["hidden_size"]
    return dict(image_size=_side(c), in_channels=c.get("num_channels", 3), patch_size=_side(c, "patch_size"),
                stages=[dict(depth=c["num_hidden_layers"], d_model=d, n_heads=c["num_attention_heads"],
                             mixer="softmax", mixer_options={"qkv_bias": bool(c.get("qkv_bias", True)),
                                                             "out_bias": True})],
                positional="learned", pooling="cls", distillation=distillation, n_classes=_classes(c),
                norm="layernorm", norm_eps=c.get("layer_norm_eps", 1e-12), ffn=_ffn(c.get("hidden_act", "gelu"), False),
                ffn_mult=c["intermediate_size"] / d)


def _vit_blocks(p: str, n: int) -> list[Rule]:
    out = []
    for i in range(n):
        e, h, old = f"stages.0.{i}", f"{p}.layers.{i}", f"{p}.encoder.layer.{i}"
        a = f"{old}.attention.attention"
        out += [*wb2(f"{e}.norm1", f"{old}.layernorm_before", f"{h}.layernorm_before"),
                *wb2(f"{e}.mixer.q_proj", f"{a}.query", f"{h}.attention.q_proj"),
                *cat2(f"{e}.mixer.kv_proj", [(f"{a}.key", f"{h}.attention.k_proj"),
                                             (f"{a}.value", f"{h}.attention.v_proj")]),
                *wb2(f"{e}.mixer.out_proj", f"{old}.attention.output.dense", f"{h}.attention.o_proj"),
                *wb2(f"{e}.norm2", f"{old}.layernorm_after", f"{h}.layernorm_after"),
                *wb2(f"{e}.ffn.up", f"{old}.intermediate.dense", f"{h}.mlp.fc1"),
                *wb2(f"{e}.ffn.down", f"{old}.output.dense", f"{h}.mlp.fc2")]
    return out


def _vit_rules(c: dict, p: str = "vit") -> list[Rule]:
    emb = f"{p}.embeddings"
    tokens = (f"{emb}.cls_token", f"{emb}.distillation_token") if p == "deit" else (f"{emb}.cls_token",)
    heads = ([*wb("head", "cls_classifier"), *wb("head_dist", "distillation_classifier")] if p == "deit"
             else wb("head", "classifier"))
    return [*wb("patch.proj", f"{emb}.patch_embeddings.projection"), r("extra", tokens, _tokens),
            r(("pos_extra", "pos_table"), f"{emb}.position_embeddings", _row_split),
            *_vit_blocks(p, c["num_hidden_layers"]), *wb("final_norm", f"{p}.layernorm"), *heads]


# ---- Swin and Swin V2 --------------------------------------------------------------------------
def _swin_config(c: dict, v2: bool = False) -> dict:
    _require(c, use_absolute_embeddings=False, qkv_bias=True)
    if v2 and any(c.get("pretrained_window_sizes") or []):
        raise CheckpointError(f"config.json: pretrained_window_sizes={c['pretrained_window_sizes']} rescale V2's "
                              "position bias; efformer maps only checkpoints trained at their window (zeros)")
    _ln_default(c)
    win, d0, side = c["window_size"], c["embed_dim"], _side(c) // _side(c, "patch_size")
    stages = []
    for i, (depth, heads) in enumerate(zip(c["depths"], c["num_heads"], strict=True)):
        g = -(-side // 2**i)
        # HF: a stage no wider than the window has one window and no shift (V2 also shrinks the window,
        # which changes its continuous bias; V1 keeps its table and clamps only at run time)
        w = min(win, g) if v2 else win
        shift = win // 2 if g > win else 0
        opts = [{"window": w, "shift": (j % 2) * shift, "mask_padding": False,
                 "position_bias": "continuous" if v2 else "table", "cosine": v2} for j in range(depth)]
        stages.append(dict(depth=depth, d_model=d0 * 2**i, n_heads=heads, mixer="swin", mixer_options=opts))
    return dict(image_size=_side(c), in_channels=c.get("num_channels", 3), patch_size=_side(c, "patch_size"),
                patch_norm=True, stages=stages, merge="patch_merge_v2" if v2 else "patch_merge", positional="none",
                pooling="mean", n_classes=_classes(c), norm="layernorm", norm_placement="res_post" if v2 else "pre",
                ffn=_ffn(c.get("hidden_act", "gelu"), False), ffn_mult=float(c.get("mlp_ratio", 4.0)))


def _swin_rules(c: dict, v2: bool = False) -> list[Rule]:
    p = "swinv2" if v2 else "swin"
    out = [*wb("patch.proj", f"{p}.embeddings.patch_embeddings.projection"), *wb("patch.norm", f"{p}.embeddings.norm")]
    for s, depth in enumerate(c["depths"]):
        for j in range(depth):
            e, h = f"stages.{s}.{j}", f"{p}.encoder.layers.{s}.blocks.{j}"
            out += [*wb(f"{e}.norm1", f"{h}.layernorm_before"), *wb(f"{e}.norm2", f"{h}.layernorm_after")]
            if v2:
                a = f"{h}.attention.self"
                out += [r(f"{e}.mixer.qkv.weight", tuple(f"{a}.{n}.weight" for n in ("query", "key", "value")), "cat"),
                        r(f"{e}.mixer.qkv.bias", (f"{a}.query.bias", f"{a}.value.bias"), _qkv_bias_no_key),
                        *wb(f"{e}.mixer.out_proj", f"{h}.attention.output.dense"),
                        r(f"{e}.mixer.logit_scale", f"{a}.logit_scale"),
                        *wb(f"{e}.mixer.cpb.0", f"{a}.continuous_position_bias_mlp.0"),
                        r(f"{e}.mixer.cpb.2.weight", f"{a}.continuous_position_bias_mlp.2.weight"),
                        *wb(f"{e}.ffn.up", f"{h}.intermediate.dense"), *wb(f"{e}.ffn.down", f"{h}.output.dense")]
            else:
                a, old = f"{h}.attention", f"{h}.attention.self"
                out += [*cat2(f"{e}.mixer.qkv", [(f"{old}.{o}", f"{a}.{n}_proj") for o, n in
                                                 (("query", "q"), ("key", "k"), ("value", "v"))]),
                        *wb2(f"{e}.mixer.out_proj", f"{a}.output.dense", f"{a}.o_proj"),
                        r(f"{e}.mixer.bias_table", f"{old}.relative_position_bias_table|"
                                                   f"{a}.relative_position_bias.relative_position_bias_table"),
                        *wb2(f"{e}.ffn.up", f"{h}.intermediate.dense", f"{h}.mlp.fc1"),
                        *wb2(f"{e}.ffn.down", f"{h}.output.dense", f"{h}.mlp.fc2")]
        if s < len(c["depths"]) - 1:
            down = f"{p}.encoder.layers.{s}.downsample"
            out += [r(f"merges.{s}.proj.weight", f"{down}.reduction.weight"), *wb(f"merges.{s}.norm", f"{down}.norm")]
    return [*out, *wb("final_norm", f"{p}.layernorm"), *wb("head", "classifier")]


# ---- PVT ---------------------------------------------------------------------------------------
def _pvt_config(c: dict) -> dict:
    n, eps = c["num_encoder_blocks"], c.get("layer_norm_eps", 1e-6)
    ratios, sizes, strides = c["sequence_reduction_ratios"], c["patch_sizes"], c["strides"]
    if list(sizes) != list(strides) or any(s != 2 for s in strides[1:]):
        raise CheckpointError(f"config.json: patch_sizes={sizes}, strides={strides}; efformer's PVT merges halve the "
                              "grid with non-overlapping 2x2 convolutions (patch_sizes == strides, later ones 2)")
    if ratios[-1] != 1:
        raise CheckpointError(f"config.json: sequence_reduction_ratios[-1]={ratios[-1]}; the last stage holds the "
                              "class token, which spatial reduction has no place for (PVT's checkpoints use 1)")
    _require(c, qkv_bias=True)
    act = _ffn(c.get("hidden_act", "gelu"), False)
    stages = []
    for i in range(n):
        mixer, opts = ("sra", {"ratio": ratios[i], "norm_eps": eps}) if ratios[i] > 1 else ("softmax", {
            "qkv_bias": True})
        stages.append(dict(depth=c["depths"][i], d_model=c["hidden_sizes"][i], n_heads=c["num_attention_heads"][i],
                           mixer=mixer, mixer_options=opts, ffn_mult=float(c["mlp_ratios"][i])))
    return dict(image_size=_side(c), in_channels=c.get("num_channels", 3), patch_size=strides[0], patch_norm=True,
                stages=stages, merge="conv", merge_kernel=2, positional="learned_stages", pooling="cls",
                class_token_stage="last", n_classes=_classes(c), norm="layernorm", norm_eps=eps, ffn=act)


def _pvt_rules(c: dict) -> list[Rule]:
    n, emb = c["num_encoder_blocks"], "pvt.encoder.patch_embeddings"
    out = [*wb("patch.proj", f"{emb}.0.projection"), *wb("patch.norm", f"{emb}.0.layer_norm")]
    for s in range(n):
        if s:
            out += [*wb(f"merges.{s - 1}.proj", f"{emb}.{s}.projection"),
                    *wb(f"merges.{s - 1}.norm", f"{emb}.{s}.layer_norm")]
        if s == n - 1:
            out += [r("extra", f"{emb}.{s}.cls_token", _tokens),
                    r(("pos_extra", f"stage_pos.{s}"), f"{emb}.{s}.position_embeddings", _row_split)]
        else:
            out.append(r(f"stage_pos.{s}", f"{emb}.{s}.position_embeddings", _reshape))
        for j in range(c["depths"][s]):
            e, h = f"stages.{s}.{j}", f"pvt.encoder.block.{s}.{j}"
            a = f"{h}.attention.self"
            out += [*wb(f"{e}.norm1", f"{h}.layer_norm_1"), *wb(f"{e}.mixer.q_proj", f"{a}.query"),
                    *wbs((f"{e}.mixer.kv_proj",), (f"{a}.key", f"{a}.value"), "cat"),
                    *wb(f"{e}.mixer.out_proj", f"{h}.attention.output.dense"),
                    r(f"{e}.mixer.reduce.weight", f"{a}.sequence_reduction.weight", _conv_as_patch_linear),
                    r(f"{e}.mixer.reduce.bias", f"{a}.sequence_reduction.bias"),
                    *wb(f"{e}.mixer.norm", f"{a}.layer_norm"),
                    *wb(f"{e}.norm2", f"{h}.layer_norm_2"), *wb(f"{e}.ffn.up", f"{h}.mlp.dense1"),
                    *wb(f"{e}.ffn.down", f"{h}.mlp.dense2")]
    return [*out, *wb("final_norm", "pvt.encoder.layer_norm"), *wb("head", "classifier")]


# ---- PVT v2 -------------------------------------------------------------------------------------
def _pvt_v2_config(c: dict) -> dict:
    n, eps, linear = c["num_encoder_blocks"], c.get("layer_norm_eps", 1e-6), bool(c.get("linear_attention", False))
    sizes, strides, ratios = c["patch_sizes"], c["strides"], c["sr_ratios"]
    if any(s != 2 for s in strides[1:]) or len(set(sizes[1:])) > 1 or any(k % 2 == 0 for k in sizes[1:]):
        raise CheckpointError(f"config.json: patch_sizes={sizes}, strides={strides}; efformer's merges are one odd "
                              "kernel of stride 2 for every stage after the first")
    _require(c, qkv_bias=True)
    stages = []
    for i in range(n):
        if linear:
            mixer, opts = "linear_sra", {"pool": 7, "norm_eps": eps}
        else:
            mixer, opts = ("sra", {"ratio": ratios[i], "norm_eps": eps}) if ratios[i] > 1 else ("softmax", {
                "qkv_bias": True})
        stages.append(dict(depth=c["depths"][i], d_model=c["hidden_sizes"][i], n_heads=c["num_attention_heads"][i],
                           mixer=mixer, mixer_options=opts, ffn_mult=float(c["mlp_ratios"][i])))
    if c.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"config.json: hidden_act={c['hidden_act']!r}; efformer's Mix-FFN uses gelu")
    return dict(image_size=_side(c), in_channels=c.get("num_channels", 3), patch_size=strides[0],
                patch_kernel=sizes[0], patch_padding=sizes[0] // 2, patch_norm=True, stages=stages, merge="conv",
                merge_kernel=sizes[1] if n > 1 else 3, merge_pre_norm=True, positional="none", pooling="mean",
                n_classes=_classes(c), norm="layernorm", norm_eps=eps, ffn="mixffn", ffn_options={"relu": linear})


def _pvt_v2_rules(c: dict) -> list[Rule]:
    n, lay, linear = c["num_encoder_blocks"], "pvt_v2.encoder.layers", bool(c.get("linear_attention", False))
    out = [*wb("patch.proj", f"{lay}.0.patch_embedding.proj"), *wb("patch.norm", f"{lay}.0.patch_embedding.layer_norm")]
    for s in range(n):
        if s:
            out += [*wb(f"merges.{s - 1}.pre_norm", f"{lay}.{s - 1}.layer_norm"),
                    *wb(f"merges.{s - 1}.proj", f"{lay}.{s}.patch_embedding.proj"),
                    *wb(f"merges.{s - 1}.norm", f"{lay}.{s}.patch_embedding.layer_norm")]
        for j in range(c["depths"][s]):
            e, h = f"stages.{s}.{j}", f"{lay}.{s}.blocks.{j}"
            a = f"{h}.attention"
            reduce = ([*wb(f"{e}.mixer.proj", f"{a}.spatial_reduction", _reshape)] if linear else
                      [r(f"{e}.mixer.reduce.weight", f"{a}.spatial_reduction.weight", _conv_as_patch_linear),
                       r(f"{e}.mixer.reduce.bias", f"{a}.spatial_reduction.bias")])
            out += [*wb(f"{e}.norm1", f"{h}.layer_norm_1"), *wb(f"{e}.mixer.q_proj", f"{a}.query"),
                    *wbs((f"{e}.mixer.kv_proj",), (f"{a}.key", f"{a}.value"), "cat"),
                    *wb(f"{e}.mixer.out_proj", f"{a}.proj"), *reduce, *wb(f"{e}.mixer.norm", f"{a}.layer_norm"),
                    *wb(f"{e}.norm2", f"{h}.layer_norm_2"), *wb(f"{e}.ffn.up", f"{h}.mlp.dense1"),
                    *wb(f"{e}.ffn.dwconv", f"{h}.mlp.dwconv.dwconv"), *wb(f"{e}.ffn.down", f"{h}.mlp.dense2")]
    return [*out, *wb("final_norm", f"{lay}.{n - 1}.layer_norm"), *wb("head", "classifier")]


# ---- CvT ----------------------------------------------------------------------------------------
def _cvt_config(c: dict) -> dict:
    n, cls = len(c["depth"]), list(c["cls_token"])
    if any(cls[:-1]) or not cls[-1]:  # (transformers' own CvtForImageClassification fails without the last one)
        raise CheckpointError(f"config.json: cls_token={cls}; efformer maps CvT with a class token in the last stage "
                              "only, as the released CvT models have")
    for key, ok in (("qkv_projection_method", "dw_bn"), ("qkv_bias", True), ("stride_q", 1)):
        if any(v != ok for v in c.get(key, [ok] * n)):
            raise CheckpointError(f"config.json: {key}={c[key]} is not supported (efformer's cvt mixer: {ok!r})")
    for key in ("padding_q", "padding_kv"):
        if [int(p) for p in c[key]] != [k // 2 for k in c["kernel_qkv"]]:
            raise CheckpointError(f"config.json: {key}={c[key]}; efformer's cvt mixer pads by kernel_qkv // 2")
    strides, sizes, pads = c["patch_stride"], c["patch_sizes"], c["patch_padding"]
    if any(s != 2 for s in strides[1:]) or len(set(sizes[1:])) > 1 or any(p != (k - 1) // 2 for k, p in
                                                                         zip(sizes[1:], pads[1:], strict=True)):
        raise CheckpointError(f"config.json: patch_sizes={sizes}, patch_stride={strides}, patch_padding={pads}; "
                              "efformer's merges after the first stage are one kernel, stride 2, (kernel - 1) // 2")
    stages = [dict(depth=c["depth"][i], d_model=c["embed_dim"][i], n_heads=c["num_heads"][i], mixer="cvt",
                   mixer_options={"kernel": c["kernel_qkv"][i], "kv_stride": c["stride_kv"][i], "scale": "width",
                                  "leading_tokens": int(cls[i])}, ffn_mult=float(c["mlp_ratio"][i])) for i in range(n)]
    return dict(image_size=strides[0] * 56, in_channels=c.get("num_channels", 3), patch_size=strides[0],
                patch_kernel=sizes[0], patch_padding=pads[0], patch_norm=True, stages=stages, merge="conv",
                merge_kernel=sizes[1] if n > 1 else 3, positional="none", pooling="cls",
                class_token_stage="last", n_classes=_classes(c), norm="layernorm", ffn="gelu")


def _cvt_rules(c: dict) -> list[Rule]:
    out = []
    for s, depth in enumerate(c["depth"]):
        st = f"cvt.encoder.stages.{s}"
        emb, into = f"{st}.embedding.convolution_embeddings", ("patch" if s == 0 else f"merges.{s - 1}")
        out += [*wb(f"{into}.proj", f"{emb}.projection"), *wb(f"{into}.norm", f"{emb}.normalization")]
        if c["cls_token"][s]:
            out.append(r("extra", f"{st}.cls_token", _tokens))
        for j in range(depth):
            e, h = f"stages.{s}.{j}", f"{st}.layers.{j}"
            a = f"{h}.attention.attention"
            for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
                conv = f"{a}.convolution_projection_{theirs}.convolution_projection"
                out += [r(f"{e}.mixer.{ours}_conv.conv.weight", f"{conv}.convolution.weight"),
                        *[r(f"{e}.mixer.{ours}_conv.norm.{b}", f"{conv}.normalization.{b}")
                          for b in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")],
                        *wb(f"{e}.mixer.{ours}_conv.proj", f"{a}.projection_{theirs}")]
            out += [*wb(f"{e}.norm1", f"{h}.layernorm_before"),
                    *wb(f"{e}.mixer.out_proj", f"{h}.attention.output.dense"),
                    *wb(f"{e}.norm2", f"{h}.layernorm_after"), *wb(f"{e}.ffn.up", f"{h}.intermediate.dense"),
                    *wb(f"{e}.ffn.down", f"{h}.output.dense")]
    return [*out, *wb("final_norm", "layernorm"), *wb("head", "classifier")]


# ---- PoolFormer --------------------------------------------------------------------------------
def _poolformer_config(c: dict) -> dict:
    sizes, strides, pads, n = c["patch_sizes"], c["strides"], c["padding"], c["num_encoder_blocks"]
    for i in range(1, n):
        if strides[i] != 2 or pads[i] != (sizes[i] - 1) // 2:
            raise CheckpointError(f"config.json: stage {i} downsamples with kernel {sizes[i]}, stride {strides[i]}, "
                                  f"padding {pads[i]}; efformer's merges use stride 2 and padding (kernel - 1) // 2")
    scale = c.get("layer_scale_init_value", 1e-5) if c.get("use_layer_scale", True) else None
    stages = [dict(depth=c["depths"][i], d_model=c["hidden_sizes"][i], n_heads=1, mixer="pool",
                   mixer_options={"pool_size": c.get("pool_size", 3)}) for i in range(n)]
    # PoolFormer has no positions, so image_size only has to be a multiple of the patch stride
    return dict(image_size=strides[0] * 56, in_channels=c.get("num_channels", 3), patch_size=strides[0],
                patch_kernel=sizes[0], patch_padding=pads[0], stages=stages, merge="conv",
                merge_kernel=sizes[1] if n > 1 else 3, merge_norm=False, positional="none", pooling="mean",
                n_classes=_classes(c), norm="groupnorm", layer_scale=scale,
                ffn=_ffn(c.get("hidden_act", "gelu"), False), ffn_mult=float(c.get("mlp_ratio", 4.0)))


def _poolformer_rules(c: dict) -> list[Rule]:
    emb, out = "poolformer.encoder.patch_embeddings", []
    for s in range(c["num_encoder_blocks"]):
        out += wb("patch.proj" if s == 0 else f"merges.{s - 1}.proj", f"{emb}.{s}.projection")
        for j in range(c["depths"][s]):
            e, h = f"stages.{s}.{j}", f"poolformer.encoder.block.{s}.{j}"
            out += [*wb(f"{e}.norm1", f"{h}.before_norm"), *wb(f"{e}.norm2", f"{h}.after_norm"),
                    r(f"{e}.scale1", f"{h}.layer_scale_1"), r(f"{e}.scale2", f"{h}.layer_scale_2"),
                    *wb(f"{e}.ffn.up", f"{h}.output.conv1", _reshape),
                    *wb(f"{e}.ffn.down", f"{h}.output.conv2", _reshape)]
    return [*out, *wb("final_norm", "norm"), *wb("head", "classifier")]


VISION_ARCHS: dict[str, VisionArch] = {
    "vit": VisionArch(_vit_config, _vit_rules, ("ViTForImageClassification",)),
    "deit": VisionArch(lambda c: _vit_config(c, distillation=True), lambda c: _vit_rules(c, "deit"),
                       ("DeiTForImageClassificationWithTeacher",)),
    "swin": VisionArch(_swin_config, _swin_rules, ("SwinForImageClassification",)),
    "swinv2": VisionArch(lambda c: _swin_config(c, v2=True), lambda c: _swin_rules(c, v2=True),
                         ("Swinv2ForImageClassification",)),
    "pvt": VisionArch(_pvt_config, _pvt_rules, ("PvtForImageClassification",)),
    "pvt_v2": VisionArch(_pvt_v2_config, _pvt_v2_rules, ("PvtV2ForImageClassification",)),
    "cvt": VisionArch(_cvt_config, _cvt_rules, ("CvtForImageClassification",)),
    "poolformer": VisionArch(_poolformer_config, _poolformer_rules, ("PoolFormerForImageClassification",)),
}
