"""The model properties: claims about LoRA models, each judged module by module or bit for bit.

The bound of ``model_merge_equivalence`` (see the README, "Whole models"): a merged model is correct
when every adapted module, fed the input it received in the unmerged forward, is within the layer
half's forward bound of the exact answer for that input (and of the unmerged module's output, within
twice that), its merged weights are within the layer half's merge bound, and every parameter no
adapter targets is bit-identical to the base. Final logits are not compared with a tolerance: the
error a correct merge makes in one module is carried through norms, attention and later modules by
amounts no first-principles bound here can state honestly, so the claim is made where it can be.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from hypothesis import strategies as st

from properties import oracle as layer_oracle
from properties.catalogue import Context, OutOfRange, PropertyFailure, assert_identical, bits, prop
from properties.models import architectures as archs
from properties.models.oracle import adapter_numel, layer_spec, weighted_cat_spec
from properties.models.protocol import MODEL_OPTIONS, model_target_for
from properties.models.spec import ARCHITECTURES, TIED_ARCHITECTURES, ModelExample, ModelSpec
from properties.models.strategies import ModelDraw, layout, model_draw, model_examples
from properties.precision import Expected, forward_expected, roundtrip_expected, weights_expected
from properties.spec import LayerSpec, dtype_name
from properties.targets.protocol import Unsupported


def _draw(**kw) -> Callable:
    def make(caps, arch, dtype) -> ModelDraw:
        return model_draw(caps, arch, dtype, caps.options & MODEL_OPTIONS, **kw)

    return make


def model_prop(
    id: str, statement: str, *, requires=(), layers=ARCHITECTURES, cost=1.0, needs_data=False, **draw
):
    """Register a model property: its cells are property x architecture x dtype."""
    return prop(
        id,
        statement,
        requires=requires,
        draw=_draw(**draw),
        layers=layers,
        needs_data=needs_data,
        cost=cost,
        examples=model_examples,
        bind=model_target_for,
    )


# -- helpers ----------------------------------------------------------------------------------------


def _check(ctx: Context, ls: LayerSpec, actual: torch.Tensor, expected: Expected, quantity: str) -> None:
    """The layer half's comparison, for one module of the model (its own inner dimension and rank)."""
    ctx.check(actual, expected, quantity, layer=ls)


def _same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Bit-identical tensors under the same names."""
    if set(actual) != set(expected):
        diff = sorted(set(actual) ^ set(expected))
        raise PropertyFailure(f"{what}: names differ: {diff[:6]}{' ...' if len(diff) > 6 else ''}")
    for k, e in expected.items():
        a = actual[k]
        if a.dtype != e.dtype or a.shape != e.shape or not torch.equal(bits(a), bits(e)):
            diff = (a.double() - e.double()).abs().max().item() if a.shape == e.shape else "shape"
            raise PropertyFailure(f"{what}: {k} is not bit-identical (max difference {diff})")


def _base_value(spec: ModelSpec, name: str) -> torch.Tensor:
    """The exact base value of a parameter name (a tied twin's name maps to the shared tensor)."""
    if name in spec.base:
        return spec.base[name]
    module, _, leaf = name.rpartition(".")
    twin = spec.twin(module)
    if twin is not None and f"{twin}.{leaf}" in spec.base:
        return spec.base[f"{twin}.{leaf}"]
    raise PropertyFailure(f"the model has a parameter {name!r} the base model does not have")


def _active_paths(spec: ModelSpec) -> list[str]:
    return [p for p in spec.targeted if any(p in spec.adapter(n).modules for n in spec.active_adapters)]


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def _untargeted_identical(ctx: Context, h, spec: ModelSpec, what: str, unloaded: bool = False) -> None:
    """Every parameter of a module no active adapter targets is bit-identical to the base; after
    merge-and-unload, a module an active adapter saves whole (``modules_to_save``) is bit-identical to
    that adapter's trained copy instead (the fine-tuned model keeps it)."""
    targeted = set(_active_paths(spec))
    params = h.base_parameters()
    for name, value in params.items():
        module, _, leaf = name.rpartition(".")
        if module in targeted:
            continue
        trained = spec.saved_module(module) if unloaded else None
        expected = trained[leaf] if trained is not None else _base_value(spec, name)
        if trained is not None and not _bit_equal(value, expected):
            was = (
                "the original"
                if _bit_equal(value, _base_value(spec, name))
                else "neither it nor the original"
            )
            raise PropertyFailure(
                f"{what}: {name} is not the trained copy of modules_to_save {module!r} ({was})"
            )
        if value.dtype != expected.dtype or not torch.equal(bits(value), bits(expected)):
            twin = spec.twin(name.rpartition(".")[0])
            note = f" (it is tied to {twin}, which an adapter targets)" if twin in targeted else ""
            raise PropertyFailure(f"{what}: untargeted parameter {name} changed{note}")


def _judge_merged(ctx: Context, h, spec: ModelSpec, before: dict, what: str, unloaded: bool) -> None:
    """Each adapted module, fed its unmerged-forward input, is within the layer bound (a LoRA bias
    included: the layer half's bound and merged bias ``b + s·b_lora``); merged weights within the merge
    bound; everything untargeted bit-identical, or the trained copy of a module to save once unloaded.

    A module whose captured input is not finite (a value earlier in the forward left a half-precision
    range) has no exact output. The modules are taken in the spec's order, not the forward's, so every
    module fed finite values is judged first (the one whose output left the range is out of
    range by its own bound, a wrong one fails), then the example is out of range, as in the layer half."""
    fed_non_finite = []
    for path in _active_paths(spec):
        if path not in before:
            continue  # a module the forward never reached (BERT's pooler on some outputs): nothing to feed
        ls = layer_spec(spec, path)
        x, y_unmerged = before[path]
        module = h.module(path)
        if x.is_floating_point() and not torch.isfinite(x).all():
            fed_non_finite.append(path)  # no exact output to compare with; its weights are still judged
        else:
            exp = forward_expected(ls, x, ctx.arith)
            _check(ctx, ls, y_unmerged, exp, f"{path}: unmerged output")
            with torch.no_grad():
                y = module(x)
            _check(ctx, ls, y, exp, f"{path}: {what} output")
            both = exp.versus(y_unmerged.detach().to("cpu", torch.float64), 2 * exp.bound)
            _check(ctx, ls, y, both, f"{path}: {what} vs unmerged output")
        weights = weights_expected(ls, ls.adapter_names, ctx.arith)
        base = getattr(module, "base_layer", module)
        stored = {"weight": archs.canonical_weight(base)}
        if "bias" in weights:
            stored["bias"] = base.bias.detach()
        for key, e in weights.items():
            _check(ctx, ls, stored[key], e, f"{path}: {what} {key}")
    _untargeted_identical(ctx, h, spec, what, unloaded)
    if fed_non_finite:
        raise OutOfRange(
            f"a module's input in the unmerged forward is not finite ({fed_non_finite[0]}): an earlier value "
            f"left the {dtype_name(spec.dtype)} range, so its output has no exact answer"
        )


def _ex(ctx: Context) -> ModelExample:
    return ctx.example  # type: ignore[return-value]


def _tmp() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="lora-conformance-")


# -- properties -------------------------------------------------------------------------------------


@model_prop(
    "model_merge_equivalence",
    "merge_and_unload: every adapted module, fed its unmerged input, is within the layer bound; "
    "merged weights within the merge bound; every untargeted parameter bit-identical.",
    requires={"merge_and_unload"},
)
def model_merge_equivalence(ctx: Context) -> None:
    ex, spec = _ex(ctx), ctx.spec
    h = ctx.build()
    before = h.capture(ex.batch, _active_paths(spec))
    h.merge_and_unload()
    _judge_merged(ctx, h, spec, before, "merged", unloaded=True)


@model_prop(
    "model_unload_restores_base",
    "Disabling adapters and unload() give the base model back: outputs, parameters and module types "
    "bit-identical to the model before wrapping.",
    requires={"unload", "disable"},
)
def model_unload_restores_base(ctx: Context) -> None:
    ex, spec = _ex(ctx), ctx.spec
    base = ctx.target.build_base(spec)
    ref_out, ref_params, ref_modules = base.outputs(ex.batch), base.base_parameters(), base.modules()
    h = ctx.build()
    enabled = h.outputs(ex.batch)
    with h.disabled():
        _same(h.outputs(ex.batch), ref_out, "output with adapters disabled vs base model")
    _same(h.outputs(ex.batch), enabled, "output after re-enabling vs before disabling")
    h.unload()
    _same(h.base_parameters(), ref_params, "parameters after unload()")
    _same(h.outputs(ex.batch), ref_out, "output after unload()")
    if h.modules() != ref_modules:
        raise PropertyFailure(f"module types after unload() differ: {_module_diff(h.modules(), ref_modules)}")


def _named_diff(got: dict, want: dict, show=str, **labels: str) -> str:
    """Which names are missing or extra, and which hold another value (a few of each). ``labels``
    renames the groups ``changed``, ``missing`` and ``extra``."""
    common = sorted(set(got) & set(want))
    groups = {
        "changed": [f"{k}: {show(got[k])} instead of {show(want[k])}" for k in common if got[k] != want[k]],
        "missing": sorted(set(want) - set(got)),
        "extra": sorted(set(got) - set(want)),
    }
    return "; ".join(
        f"{labels.get(g, g)}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
        for g, items in groups.items()
        if items
    )


def _shape_diff(got: dict[str, tuple], want: dict[str, tuple]) -> str:
    """Which parameter names are missing or extra, and which have another shape."""
    return _named_diff(got, want, changed="shapes", missing="missing parameters", extra="extra parameters")


def _module_diff(actual: dict[str, type], expected: dict[str, type]) -> str:
    """Which modules have another type, are missing, or were left behind."""
    return _named_diff(actual, expected, lambda t: t.__name__, changed="types", extra="left behind")


def _fewer_layers(spec: ModelSpec) -> ModelSpec:
    """The same architecture with its last layer removed: an adapter on that layer does not fit it."""
    fam = archs.family(spec.architecture)
    if fam is not None:  # the smaller model's parameters are a subset of the larger one's, same shapes
        small = replace(spec, config=fam.fewer_layers(spec.config), adapters=())
        shapes, _, _ = layout(small)
        return replace(small, base={k: spec.base[k] for k in shapes})
    key = "n_layer" if "n_layer" in spec.config else "num_hidden_layers"
    last = int(spec.config[key]) - 1
    marker = {"gpt2": "transformer.h.", "bert": "encoder.layer."}.get(spec.architecture, "model.layers.")
    base = {k: v for k, v in spec.base.items() if not k.startswith(f"{marker}{last}.")}
    return replace(spec, config={**spec.config, key: last}, base=base, adapters=())


@model_prop(
    "model_adapter_save_load",
    "An adapter saved with the library's API holds its tensors and nothing of the base, and loads into a "
    "fresh base bit-identically; loading it twice or into a model its keys do not fit raises or is reported.",
    requires={"save_adapter"},
    cost=1.5,  # four models built, three loads from disk per example
    max_adapters=1,
    deep_target=True,
)
def model_adapter_save_load(ctx: Context) -> None:
    ex, spec = _ex(ctx), ctx.spec
    name = spec.adapter_names[0]
    h = ctx.build()
    out = h.outputs(ex.batch)
    with _tmp() as tmp:
        d = Path(tmp) / "adapter"
        h.save_adapter(d, name)
        _saved_is_adapter(spec, name, h.saved_tensors(d))
        loaded, control = ctx.target.load_adapter(spec, d, name)
        _same(loaded.adapter_tensors(name), h.adapter_tensors(name), "adapter tensors after loading")
        _same(loaded.outputs(ex.batch), out, "output of the loaded adapter vs the saved one")
        with contextlib.suppress(ValueError, KeyError, RuntimeError):  # refusing a double load is fine
            loaded.load_adapter(d, name)
        _same(loaded.outputs(ex.batch), out, "output after loading the same adapter a second time")
        small = _fewer_layers(spec)
        try:
            _, reports = ctx.target.load_adapter(small, d, name)
        except (ValueError, KeyError, RuntimeError):
            return
        new = [r for r in reports if r not in control]
        if not new:
            layer = next(
                (
                    small.config[k]
                    for k in ("n_layer", "num_hidden_layers", "num_layers")
                    if k in small.config
                ),
                None,
            )
            raise PropertyFailure(
                f"an adapter with keys for layer {layer} loaded into a model without that layer: "
                "no error, nothing reported"
            )


def _saved_is_adapter(spec: ModelSpec, name: str, saved: dict[str, torch.Tensor]) -> None:
    """The saved tensors are exactly the adapter's (as a multiset of bit patterns): no base tensor."""
    want = adapter_numel(spec, [name])
    have = sum(t.numel() for t in saved.values())
    if have != want:
        raise PropertyFailure(
            f"the saved adapter holds {have} numbers; the adapter has {want}: {sorted(saved)[:6]}"
        )
    pool = [bits(t).flatten() for t in spec.adapter(name).tensors().values()]
    for key, t in saved.items():
        flat = bits(t.to(spec.dtype)).flatten() if t.dtype != spec.dtype else bits(t).flatten()
        for i, p in enumerate(pool):
            if p.numel() == flat.numel() and (torch.equal(p, flat) or torch.equal(_t_bits(p, t), flat)):
                pool.pop(i)
                break
        else:
            raise PropertyFailure(f"the saved adapter's tensor {key} is not one of the adapter's tensors")


def _t_bits(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``p`` (flat) read as ``t``'s transpose, for libraries that store a factor transposed."""
    if t.dim() != 2:
        return p
    return p.reshape(t.shape[1], t.shape[0]).T.flatten()


@model_prop(
    "model_merged_save_load",
    "A merged model saved with the library's save path and reloaded with its loader has bit-identical "
    "outputs and parameters to the merged model in memory.",
    requires={"merge_and_unload", "save_merged"},
)
def model_merged_save_load(ctx: Context) -> None:
    ex, spec = _ex(ctx), ctx.spec
    h = ctx.build()
    h.merge_and_unload()
    out, params = h.outputs(ex.batch), {k: v.clone() for k, v in h.base_parameters().items()}
    with _tmp() as tmp:
        h.save_merged(Path(tmp))
        loaded = ctx.target.load_merged(spec, Path(tmp))
    _same(loaded.base_parameters(), params, "parameters of the reloaded merged model")
    _same(loaded.outputs(ex.batch), out, "output of the reloaded merged model")


_REFUSALS = (ValueError, RuntimeError, NotImplementedError)


@model_prop(
    "model_merge_unmerge",
    "Merging in place (adapters kept, e.g. merge_adapter): every adapted module, fed its unmerged input, is "
    "within the layer bound and every untargeted parameter bit-identical; unmerging restores every merged "
    "weight within the round-trip bound and leaves the rest bit-identical.",
    requires={"merge", "unmerge"},
)
def model_merge_unmerge(ctx: Context) -> None:
    ex, spec = _ex(ctx), ctx.spec
    h = ctx.build()
    before = h.capture(ex.batch, _active_paths(spec))
    h.merge()
    _judge_merged(ctx, h, spec, before, "merged in place", unloaded=False)
    h.unmerge()
    for path in _active_paths(spec):
        ls = layer_spec(spec, path)
        module = h.module(path)
        base = getattr(module, "base_layer", module)
        stored = {"weight": archs.canonical_weight(base)}
        if getattr(base, "bias", None) is not None:
            stored["bias"] = base.bias.detach()
        for key, e in roundtrip_expected(ls, ls.adapter_names, ctx.arith).items():
            _check(ctx, ls, stored[key], e, f"{path}: {key} after merge and unmerge")
    _untargeted_identical(ctx, h, spec, "after merge and unmerge")


@model_prop(
    "model_tied_weights",
    "A LoRA on one of two tied modules: after merge (and merge_and_unload) the model equals the unmerged "
    "model and the untargeted twin is bit-identical, or the library refuses with a clear error.",
    requires={"merge", "tied_target"},
    layers=TIED_ARCHITECTURES,
    tied_target=True,
)
def model_tied_weights(ctx: Context) -> None:
    ex, spec = _ex(ctx), ctx.spec
    if not any(spec.twin(p) is not None for p in spec.targeted):
        raise Unsupported(f"{ctx.target.name} cannot put a LoRA on either module of a tied pair")
    for op in ("merge", "merge_and_unload"):
        if op == "merge_and_unload" and "merge_and_unload" not in ctx.target.capabilities().operations:
            continue
        h = ctx.build()
        before = h.capture(ex.batch, _active_paths(spec))
        snap = h.snapshot()
        try:
            getattr(h, op)()
        except _REFUSALS as e:
            if "tie" not in str(e).lower():
                raise
            assert_identical(snap, h.snapshot(), f"{op} refused ({e}) but changed the model")
            continue
        _judge_merged(ctx, h, spec, before, f"tied, after {op}:", unloaded=op == "merge_and_unload")


@model_prop(
    "model_adapter_isolation",
    "Adding, deleting or switching one adapter leaves every other adapter's outputs bit-identical; "
    "add_weighted_adapter (cat) merges to the weighted sum of deltas within the merge bound.",
    requires={"set_active", "add_adapter", "delete_adapter", "multi_adapter"},
    cost=2.0,  # three adapters, a dozen forwards and a second model per example
    min_adapters=2,
    extra=True,
    needs_data=True,
)
def model_adapter_isolation(ctx: Context) -> None:
    ex, spec = _ex(ctx), ctx.spec
    if len(spec.adapters) < 2:
        raise PropertyFailure("isolation needs two adapters")  # the strategy always draws two
    names = list(spec.adapter_names)
    h = ctx.build()

    def solo() -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for n in h_names:
            h.set_active([n])
            out[n] = h.outputs(ex.batch)
        return out

    h_names = names
    alone = solo()
    h.add_adapter(ex.extra)
    for n, out in solo().items():
        _same(out, alone[n], f"adapter {n!r} after add_adapter({ex.extra.name!r})")
    h.set_active([ex.extra.name])
    alone[ex.extra.name] = h.outputs(ex.batch)
    gone = ctx.draw(st.sampled_from(names), "deleted")
    h.set_active([n for n in names if n != gone][:1])
    h.delete_adapter(gone)
    h_names = [n for n in [*names, ex.extra.name] if n != gone]
    for n, out in solo().items():
        _same(out, alone[n], f"adapter {n!r} after delete_adapter({gone!r})")
    # A weighted combination of DoRA adapters or of LoRA biases has no agreed meaning: not checked.
    combinable = not any(a.use_dora or a.lora_bias for a in spec.adapters)
    if "weighted_cat" in ctx.target.capabilities().operations and combinable:
        weights = [ctx.draw(st.sampled_from((0.5, 1.0, 2.0, -1.0, 0.25)), f"weight {n}") for n in names]
        _weighted(ctx, spec, names, weights)


def _weighted(ctx: Context, spec: ModelSpec, names: list[str], weights: list[float]) -> None:
    h = ctx.build()
    h.add_weighted_adapter(names, weights, "weighted")
    h.set_active(["weighted"])
    h.merge(adapter_names=["weighted"])
    for path in spec.targeted:
        ls = weighted_cat_spec(spec, path, names, weights)
        # writes=2: the weighted factors are rounded to the dtype once more before the merge's write.
        expected = weights_expected(ls, ["weighted"], ctx.arith, writes=2)
        module = h.module(path)
        base = getattr(module, "base_layer", module)
        _check(
            ctx, ls, archs.canonical_weight(base), expected["weight"], f"{path}: weighted (cat) merged weight"
        )


def _should_refuse(spec: ModelSpec, path: str) -> bool:
    """Whether merging the planted module makes a non-finite weight (exact, then rounded)."""
    ls = layer_spec(spec, path)
    merged = layer_oracle.merged_weights(ls, ls.adapter_names)
    return any(not torch.isfinite(v.to(spec.dtype)).all() for v in merged.values())


@model_prop(
    "model_safe_merge",
    "merge_and_unload(safe_merge=True) with a NaN, +-Inf or overflowing term in one adapter of the deepest "
    "module raises and leaves the whole model bit-identical; without it, it equals the unsafe merge.",
    requires={"safe_merge", "merge_and_unload"},
    hostile=True,
)
def model_safe_merge(ctx: Context) -> None:
    ex, spec = _ex(ctx), ctx.spec
    h = ctx.build()
    snap = h.snapshot()
    try:
        h.merge_and_unload(safe=True)
    except ValueError:
        assert_identical(snap, h.snapshot(), "safe merge raised but the model changed")
    else:
        if _should_refuse(spec, ex.hostile.path):
            raise PropertyFailure(
                f"safe merge did not raise although merging {ex.hostile.path} makes a non-finite weight"
            )
    safe, unsafe = ctx.build(ex.clean), ctx.build(ex.clean)
    safe.merge_and_unload(safe=True)
    unsafe.merge_and_unload()
    _same(safe.base_parameters(), unsafe.base_parameters(), "safe merge vs unsafe merge (no planted term)")


@model_prop(
    "model_unloaded_is_plain",
    "After merge_and_unload no adapter module or parameter is left: every module has its base type and "
    "the parameters have the base's names and shapes.",
    requires={"merge_and_unload"},
)
def model_unloaded_is_plain(ctx: Context) -> None:
    spec = ctx.spec
    base = ctx.target.build_base(spec)
    h = ctx.build()
    h.merge_and_unload()
    if h.modules() != base.modules():
        raise PropertyFailure(f"after merge_and_unload: {_module_diff(h.modules(), base.modules())}")
    lora = [n for n in h.parameters() if "lora" in n.lower() or "modules_to_save" in n]
    if lora:
        raise PropertyFailure(f"after merge_and_unload, LoRA parameters are left: {lora[:4]}")
    shapes = {k: tuple(v.shape) for k, v in h.base_parameters().items()}
    want = {k: tuple(v.shape) for k, v in base.base_parameters().items()}
    if shapes != want:
        raise PropertyFailure(f"after merge_and_unload: {_shape_diff(shapes, want)}")
