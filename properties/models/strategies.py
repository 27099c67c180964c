"""Hypothesis strategies for whole models: the structure is drawn, the values are seeded.

Drawn per example: the architecture's config (1-3 layers, hidden sizes down to the smallest the
architecture allows, heads and GQA key/value heads, vocabulary, MLP width), which modules are targeted
(any subset of the linear / Conv1D / embedding / ``lm_head`` modules, tied ones included), per-module
ranks (up to and past the smallest dimension) and alphas, rsLoRA and DoRA per adapter, a LoRA bias
(on modules with a base bias), ``modules_to_save`` (1-2 untargeted, untied modules with parameters, on
the first adapter), 1-2 adapters, and the inputs (batch, sequence length, left/right padding with an
attention mask). Every tensor is then filled from a ``torch.Generator`` seeded by a drawn integer and
rounded to the dtype, as in the layer half (``properties.strategies``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from hypothesis import strategies as st

from properties.models import architectures as archs
from properties.models.spec import Hostile, ModelAdapter, ModelExample, ModelSpec
from properties.spec import AdapterSpec, ConvOptions, Example
from properties.strategies import Hostile as LayerHostile
from properties.strategies import _alpha, _choice, _ints, _unwrapped
from properties.strategies import plant as plant_layer

_BOOL = _unwrapped(st.booleans())
ADAPTER_NAMES = ("default", "other")
EXTRA_NAME = "extra"


@dataclass(frozen=True)
class ModelDraw:
    """What a model property lets the strategy draw for one cell."""

    architecture: str
    dtype: torch.dtype
    options: frozenset[str]
    min_adapters: int = 1
    max_adapters: int = 2
    tied_target: bool = False  # exactly one module of a tied pair is targeted, its twin is not
    extra: bool = False  # draw a further adapter to add later
    hostile: bool = False
    deep_target: bool = False  # >= 2 layers and a target in the last one (mismatched-key loads)
    device: str = "cpu"
    # What the target can adapt (``ModelCapabilities``): None = every module, any subset, any rank.
    targetable: Callable[[str, tuple[str, ...]], tuple[str, ...]] | None = None
    closure: Callable[[str, list[str]], list[str]] | None = None
    uniform_rank: bool = False
    group_of: Callable[[str, str], str | None] | None = None  # one switch adapts a whole group
    alpha_is_rank: bool = False  # the target fixes alpha = r


def model_draw(caps, arch: str, dtype: torch.dtype, options: frozenset[str] | None = None, **kw) -> ModelDraw:
    """The draw for a target with ``caps`` on ``arch``: its options (``caps.options`` unless given) and
    the rules on what one adapter can target, the target's own and the architecture library's
    (:func:`properties.models.architectures.drawable`), which reach the strategies only this way."""
    caps = archs.drawable(caps, arch)
    rules = {k: getattr(caps, k, None) for k in ("targetable", "closure", "group_of")}
    return ModelDraw(
        architecture=arch,
        dtype=dtype,
        options=caps.options if options is None else options,
        uniform_rank=bool(getattr(caps, "uniform_rank", False)),
        alpha_is_rank=bool(getattr(caps, "alpha_is_rank", False)),
        **rules,
        **kw,
    )


def _config(draw: st.DrawFn, arch: str, min_layers: int) -> dict[str, object]:
    fam = archs.family(arch)
    if fam is not None:
        return fam.draw_config(draw, min_layers)
    layers = draw(_ints(min_layers, 3), label="layers")
    vocab = draw(_ints(4, 24), label="vocab")
    inter = draw(_ints(1, 8), label="mlp width")
    if arch in ("llama", "llama_tied"):
        kv = draw(_ints(1, 2), label="kv heads")
        heads = kv * draw(_ints(1, 2), label="GQA group")
        head_dim = 2 * draw(_ints(1, 2))  # RoPE rotates pairs: the smallest head is 2 wide
        return dict(
            vocab_size=vocab,
            hidden_size=heads * head_dim,
            head_dim=head_dim,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            tie_word_embeddings=arch == "llama_tied",
            max_position_embeddings=16,
            pad_token_id=None,
        )
    heads, head_dim = draw(_ints(1, 2), label="heads"), draw(_ints(1, 3), label="head dim")
    if arch == "gpt2":
        return dict(
            vocab_size=vocab,
            n_embd=heads * head_dim,
            n_head=heads,
            n_layer=layers,
            n_inner=inter,
            n_positions=8,
            tie_word_embeddings=True,
        )
    return dict(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        intermediate_size=inter,
        num_hidden_layers=layers,
        max_position_embeddings=8,
        type_vocab_size=2,
        pad_token_id=0,
    )


@functools.lru_cache(maxsize=256)
def _layout(arch: str, frozen_config: tuple) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...], dict]:
    """Parameter shapes, targetable paths and per-module facts of an architecture (built on meta, or
    given by the family where its model is not a torch module tree: ``layout(config)``)."""
    own = getattr(archs.family(arch), "layout", None)
    if own is not None:
        return own(dict(frozen_config))
    with torch.device("meta"):
        model = archs.construct(arch, dict(frozen_config), torch.float32)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    paths = tuple(archs.targetable(model))
    facts = {}
    for p in paths:
        m = model.get_submodule(p)
        w = archs.canonical_weight(m)
        facts[p] = dict(
            kind=archs.layer_kind(m),
            fan_in_fan_out=archs.is_conv1d(m),
            out_in=tuple(w.shape[:2]),  # conv: (out, in/groups); the kernel is in ``conv``
            bias=getattr(m, "bias", None) is not None,
            padding_idx=getattr(m, "padding_idx", None),
            conv=_conv_options(m),
        )
    return shapes, paths, facts


def _conv_options(m: torch.nn.Module) -> ConvOptions | None:
    """The geometry of a conv module (what its LoRA ``A`` conv copies), or None for other kinds."""
    if not isinstance(m, torch.nn.modules.conv._ConvNd):
        return None
    padding = m.padding if isinstance(m.padding, str) else tuple(m.padding)
    return ConvOptions(
        tuple(m.kernel_size), tuple(m.stride), padding, tuple(m.dilation), m.groups, m.padding_mode
    )


def fan_in(fact: dict) -> int:
    """Inputs summed per output: ``in`` for linear, ``in/groups * prod(kernel)`` for conv."""
    _, in_f = fact["out_in"]
    conv = fact.get("conv")
    return in_f * math.prod(conv.kernel_size) if conv is not None else in_f


@functools.lru_cache(maxsize=256)
def _saveable(arch: str, frozen_config: tuple) -> dict[str, dict[str, tuple[int, ...]]]:
    """Modules ``modules_to_save`` may name: every module holding parameters of its own (linear, Conv1D,
    embedding, norm), with its parameters' shapes, leaving out both modules of a tied pair."""
    own = getattr(archs.family(arch), "saveable", None)
    if own is not None:  # a family whose model is not a torch module tree says which modules it can swap
        return own(dict(frozen_config))
    with torch.device("meta"):
        model = archs.construct(arch, dict(frozen_config), torch.float32)
    tied = {p for pair in archs.TIES[arch] for p in pair}
    return {
        name: {k: tuple(p.shape) for k, p in m.named_parameters(recurse=False)}
        for name, m in model.named_modules()
        if name and name not in tied and any(True for _ in m.parameters(recurse=False))
    }


def layout(spec: ModelSpec) -> tuple[dict, tuple[str, ...], dict]:
    return _layout(spec.architecture, tuple(sorted(spec.config.items())))


def _closed(d: ModelDraw, arch: str, chosen: list[str], paths: tuple[str, ...]) -> list[str]:
    """``chosen`` grown to a set one adapter of the target can hold, in model order: the target's
    ``closure`` and the ``group_of`` rule (a chosen path brings its group), applied until stable."""
    if d.closure is None and d.group_of is None:
        return [p for p in paths if p in set(chosen)]
    out = set(chosen)
    while True:
        grown = set(out)
        if d.closure is not None:
            grown |= set(d.closure(arch, [p for p in paths if p in grown]))
        if d.group_of is not None:
            groups = {d.group_of(arch, p) for p in grown}
            grown |= {p for p in paths if d.group_of(arch, p) in groups}
        if grown == out:
            return [p for p in paths if p in out]
        out = grown


def _distinct(d: ModelDraw, arch: str, candidates: list[str], paths: tuple[str, ...]) -> list[str]:
    """One candidate per distinct closure (the first): choosing among them is choosing among what one
    adapter can target (with groups, one path per group), not among paths that mean the same."""
    if d.closure is None and d.group_of is None:
        return list(candidates)
    seen: set[frozenset[str]] = set()
    out = []
    for p in candidates:
        c = frozenset(_closed(d, arch, [p], paths))
        if c not in seen:
            seen.add(c)
            out.append(p)
    return out


def _targets(
    draw: st.DrawFn, d: ModelDraw, arch: str, forced: list[str], optional: list[str], paths, label="target"
) -> list[str]:
    """``forced`` plus a drawn subset of ``optional``, closed. A path is drawn only while it still
    decides something: not when the closure already holds it, nor when choosing it would bring back
    a path already declined (with groups, one draw per group; without a closure, one per path)."""
    chosen, declined = list(forced), set()
    rules = d.closure is not None or d.group_of is not None
    for p in optional:
        if rules and (
            p in _closed(d, arch, chosen, paths) or declined & set(_closed(d, arch, [*chosen, p], paths))
        ):
            continue
        if draw(_BOOL, label=f"{label} {p}"):
            chosen.append(p)
        else:
            declined.add(p)
    if not chosen:
        pick = _distinct(d, arch, optional, paths)
        chosen = [pick[draw(_ints(0, len(pick) - 1), label=label)]]
    return _closed(d, arch, chosen, paths)


def _modules_plan(
    draw, targets: list[str], facts: dict, uniform: bool = False
) -> dict[str, tuple[int, float]]:
    if uniform:  # one r and alpha for the adapter, up to one past its smallest module's dimension
        r = draw(_ints(1, min(min(facts[p]["out_in"]) for p in targets) + 1), label="r")
        alpha = _alpha(draw, r)
        return {p: (r, alpha) for p in targets}
    plan = {}
    for p in targets:
        out_f, in_f = facts[p]["out_in"]
        r = draw(_ints(1, min(out_f, in_f) + 1), label=f"r {p}")
        plan[p] = (r, _alpha(draw, r))
    return plan


@st.composite
def model_examples(draw: st.DrawFn, d: ModelDraw) -> ModelExample:
    arch = d.architecture
    fam = archs.family(arch)  # None for the transformers architectures
    config = _config(draw, arch, 2 if d.deep_target else 1)
    shapes, paths, facts = _layout(arch, tuple(sorted(config.items())))
    if d.targetable is not None:
        paths = tuple(p for p in paths if p in set(d.targetable(arch, paths)))
    if d.group_of is not None:  # a module no switch adapts cannot be targeted
        paths = tuple(p for p in paths if d.group_of(arch, p) is not None)
    ties = archs.TIES[arch]
    # a tie neither side of which the target can adapt is not drawn as a tied target
    drawable_ties = tuple(t for t in ties if t[0] in paths or t[1] in paths)
    seed = draw(_ints(0, 2**31 - 1), label="seed")
    log2 = {
        t: draw(_ints(lo, hi), label=f"log2|{t}|") for t, lo, hi in (("W", -1, 1), ("A", -2, 1), ("B", -2, 1))
    }

    pool = list(paths)
    forced: list[str] = []  # paths a property needs targeted (a tied or a deep one)
    if d.tied_target and drawable_ties:
        a, b = (
            drawable_ties[draw(_ints(0, len(drawable_ties) - 1))]
            if len(drawable_ties) > 1
            else drawable_ties[0]
        )
        keep, twin = (a, b) if draw(_BOOL, label="tied: embedding side") else (b, a)
        pool = [p for p in paths if p not in (keep, twin)]
        forced = [keep]
    if d.deep_target:
        if fam is not None:
            deep = [p for p in fam.deep_paths(config, tuple(pool)) if p not in forced]
        else:
            last = config.get("num_hidden_layers", config.get("n_layer"))
            deep = [p for p in pool if f".{int(last) - 1}." in p and p not in forced]
        deep = _distinct(d, arch, deep, paths)
        forced.append(deep[draw(_ints(0, len(deep) - 1), label="deep target")])
    targets = _targets(draw, d, arch, forced, [p for p in pool if p not in forced], paths)

    multi = "multi_adapter" in d.options
    n = draw(_ints(d.min_adapters, d.max_adapters if multi else 1), label="adapters")
    plans = []
    for i in range(n):
        mods = targets if i == 0 else _targets(draw, d, arch, [], targets, paths, f"adapter {i} targets")
        plans.append(_adapter_plan(draw, ADAPTER_NAMES[i], mods, facts, d, n, forced))
    saved: list[str] = []
    if "modules_to_save" in d.options:
        lora = {p for plan in plans for p in plan["modules"]}
        pool_saved = [p for p in _saveable(arch, tuple(sorted(config.items()))) if p not in lora]
        if pool_saved and draw(_BOOL, label="modules_to_save"):
            saved = [pool_saved[draw(_ints(0, len(pool_saved) - 1), label="module to save")]]
            second = pool_saved[draw(_ints(0, len(pool_saved) - 1), label="second module to save")]
            saved += [second] if second not in saved and draw(_BOOL, label="two modules to save") else []
            plans[0]["saved"] = [p for p in pool_saved if p in saved]  # model order
    extra_plan = None
    if d.extra:
        extra_pool = [p for p in paths if p not in saved]
        extra_mods = _targets(draw, d, arch, [], extra_pool, paths, "extra targets")
        extra_plan = _adapter_plan(draw, EXTRA_NAME, extra_mods, facts, d, 2)

    if fam is None:
        batch, seq = draw(_ints(1, 3), label="batch"), draw(_ints(1, 5), label="seq")
        padding = draw(_choice(("none", "left", "right")), label="padding")
        pads = [draw(_ints(0, seq - 1), label="pad") if padding != "none" else 0 for _ in range(batch)]

    gen = torch.Generator().manual_seed(seed)
    base = _base_values(gen, shapes, facts, 2.0 ** log2["W"], d)
    if fam is not None:  # not a token model: its own inputs, no token ids and no mask
        inputs = fam.draw_inputs(draw, gen, config, d.dtype, d.device)
        input_ids = mask = torch.zeros(1, 0, dtype=torch.int64)
    else:
        inputs = None
        input_ids = torch.randint(0, int(config["vocab_size"]), (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        for row, k in enumerate(pads):
            if k:
                mask[row, :k] = 0 if padding == "left" else 1
                if padding == "right":
                    mask[row, seq - k :] = 0
    spec = ModelSpec(
        architecture=arch,
        config=config,
        dtype=d.dtype,
        base=base,
        adapters=(),
        tied=ties,
        device=d.device,
        seed=seed,
    )
    adapters = tuple(_fill_adapter(gen, spec, p, facts, log2) for p in plans)
    spec = replace(spec, adapters=adapters)
    extra = _fill_adapter(gen, spec, extra_plan, facts, log2) if extra_plan else None
    ex = ModelExample(spec, input_ids.to(d.device), mask.to(d.device), extra=extra, inputs=inputs)
    if not d.hostile:
        return ex
    kind = draw(_choice(("nan", "inf", "-inf", "overflow")), label="hostile")
    which = adapters[draw(_ints(0, len(adapters) - 1), label="hostile adapter")]
    path = which.paths[-1]  # the deepest module that adapter targets
    tensor = draw(_choice(("A", "B")), label="hostile tensor")
    h = Hostile(kind, which.name, path, tensor, draw(_ints(0, 2**16), label="hostile position"))
    return replace(ex, spec=plant(spec, h), hostile=h, clean=spec)


def _adapter_plan(draw, name, mods, facts, d: ModelDraw, n_adapters: int, forced=()) -> dict:
    modules = _modules_plan(draw, mods, facts, d.uniform_rank)
    if d.alpha_is_rank:
        modules = {p: (r, float(r)) for p, (r, _) in modules.items()}
    rslora = "rslora" in d.options and draw(_BOOL, label="rslora")
    dora = "dora" in d.options and n_adapters == 1 and draw(_BOOL, label="dora")
    # A LoRA bias needs a base bias to merge into (PEFT refuses it on embeddings and cannot merge it
    # without one), so an adapter with one keeps only its modules that have a base bias: never fewer
    # than the modules a property forces (a tied or a deep target).
    with_bias = [p for p in modules if facts[p]["bias"] and facts[p]["kind"] == "linear"]
    lora_bias = (
        "lora_bias" in d.options
        and not dora
        and bool(with_bias)
        and all(p in with_bias for p in forced if p in modules)
        and draw(_BOOL, label="lora_bias")
    )
    if lora_bias:
        modules = {p: v for p, v in modules.items() if p in with_bias}
    return dict(name=name, modules=modules, rslora=rslora, dora=dora, lora_bias=lora_bias, saved=[])


def _rounded(gen, shape, scale, d) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(d.device, d.dtype)


def _base_values(gen, shapes, facts, scale, d: ModelDraw) -> dict[str, torch.Tensor]:
    """Weights ~ N(0, scale^2 / fan_in), embeddings ~ N(0, scale^2), norm weights ~ 1 + N(0, 1/64)."""
    out = {}
    for name, shape in shapes.items():
        module = name.rpartition(".")[0]
        if "norm" in name.lower() and name.endswith("weight"):
            t = 1 + torch.randn(shape, generator=gen, dtype=torch.float64) / 8
            out[name] = t.to(d.device, d.dtype)
        elif module in facts and facts[module]["kind"] != "embedding" and name.endswith("weight"):
            out[name] = _rounded(gen, shape, scale / math.sqrt(fan_in(facts[module])), d)
        elif name.endswith("bias"):
            out[name] = _rounded(gen, shape, scale / 4, d)
        else:
            out[name] = _rounded(gen, shape, scale, d)
    return out


def module_weight(spec: ModelSpec, path: str, base: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The canonical ``(out, in)`` base weight of the module at ``path`` (a tied twin's if shared)."""
    base = spec.base if base is None else base
    key = f"{path}.weight"
    if key not in base:
        key = f"{spec.twin(path)}.weight"
    _, _, facts = layout(spec)
    w = base[key]
    return w.T if facts[path]["fan_in_fan_out"] else w


def _fill_adapter(gen, spec: ModelSpec, plan: dict, facts: dict, log2: dict) -> ModelAdapter:
    d = ModelDraw(spec.architecture, spec.dtype, frozenset(), device=spec.device)
    structure = getattr(archs.family(spec.architecture), "lora_structure", None)
    modules = {}
    for path, (r, alpha) in plan["modules"].items():
        f = facts[path]
        out_f, in_f = f["out_in"]
        mask = None
        if structure is not None:  # a library whose LoRA on this module has a fixed zero pattern (litgpt qkv)
            r, alpha, mask = structure(path, spec.config, r, alpha, out_f)
        if f["kind"] == "embedding":  # canonical (num, dim): A (r, num), B (dim, r)
            a_shape, b_shape, k = (r, out_f), (in_f, r), 1
        elif f.get("conv") is not None:  # A (r, in/g, *k): a conv like the base; B (out, r, *1): 1x1
            ones = (1,) * len(f["conv"].kernel_size)
            a_shape, b_shape, k = (r, in_f, *f["conv"].kernel_size), (out_f, r, *ones), fan_in(f)
        else:
            a_shape, b_shape, k = (r, in_f), (out_f, r), in_f
        A = _rounded(gen, a_shape, 2.0 ** log2["A"] / math.sqrt(k), d)
        B = _rounded(gen, b_shape, 2.0 ** log2["B"] / math.sqrt(r), d)
        if mask is not None:  # +0.0 off the pattern (a product with 0 would leave -0.0 bits)
            B = torch.where(mask.to(B.device).bool(), B, torch.zeros_like(B))
        fill = getattr(archs.family(spec.architecture), "lora_fill", None)
        if fill is not None:  # a library whose LoRA repeats one block of B (Keras's per-head LoRA)
            B = fill(path, spec.config, B)
        mag = None
        if plan["dora"]:
            w = module_weight(spec, path).to(torch.float64)
            norms = w.norm(dim=0) if f["kind"] == "embedding" else w.flatten(1).norm(dim=1)
            rand = torch.rand(norms.shape, generator=gen, dtype=torch.float64)
            mag = ((rand + 0.5) * norms + 2.0**-8).to(d.device, d.dtype)
        bias = _rounded(gen, (b_shape[0],), 2.0 ** log2["B"] / 4, d) if plan.get("lora_bias") else None
        modules[path] = AdapterSpec(
            name=plan["name"],
            r=r,
            alpha=alpha,
            A=A,
            B=B,
            use_rslora=plan["rslora"],
            use_dora=plan["dora"],
            bias=bias,
            magnitude=mag,
        )
    saved = {path: _trained_copy(gen, spec, path, d) for path in plan.get("saved", ())}
    return ModelAdapter(
        plan["name"],
        modules,
        use_rslora=plan["rslora"],
        use_dora=plan["dora"],
        lora_bias=bool(plan.get("lora_bias")),
        modules_to_save=saved,
    )


def _trained_copy(gen, spec: ModelSpec, path: str, d: ModelDraw) -> dict[str, torch.Tensor]:
    """A module to save after "training": each parameter moved by about a quarter of its mean size."""
    out = {}
    for key in _saveable(spec.architecture, tuple(sorted(spec.config.items())))[path]:
        b = spec.base[f"{path}.{key}"].to("cpu", torch.float64)
        noise = torch.randn(b.shape, generator=gen, dtype=torch.float64)
        out[key] = (b + noise * (b.abs().mean() + 2.0**-4) / 4).to(d.device, d.dtype)
    return out


def plant(spec: ModelSpec, h: Hostile) -> ModelSpec:
    """``spec`` with the hostile entry written into a copy of one module's adapter factor (the layer
    half's planting, so NaN, +-Inf and a rank-1 overflow mean the same thing at both levels)."""
    from properties.models.oracle import layer_spec

    a = spec.adapter(h.adapter)
    ls = layer_spec(spec, h.path, [h.adapter])
    planted = plant_layer(Example(ls, torch.zeros(0)), LayerHostile(h.kind, 0, h.tensor, h.position))
    modules = dict(a.modules)
    modules[h.path] = planted.spec.adapters[0]
    new = replace(a, modules=modules)
    return replace(spec, adapters=tuple(new if b.name == a.name else b for b in spec.adapters))
