"""Methods as objects that own their settings (fw_jax.pipeline.methods): the registry, records,
refusals of options a method does not take, SparseFW's checks, and a method added from outside."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from fw_jax import SolverOptions
from fw_jax.pipeline import (METHODS, RIA, Magnitude, PruneSettings, SparseFW, SparseFWPublished, SparseGPT, Wanda,
                             method_from_options, prune_layer)
from fw_jax.pipeline.methods import Layer, Method, Pruned, register


def test_the_registry_holds_every_method_in_the_cli_s_order():
    assert list(METHODS) == ["magnitude", "wanda", "ria", "sparsegpt", "sparsefw", "sparsefw-published"]
    assert [METHODS[name] for name in METHODS] == [Magnitude, Wanda, RIA, SparseGPT, SparseFW, SparseFWPublished]
    for name, cls in METHODS.items():
        assert cls.name == name and cls.summary and cls().record()["method"] == name


def test_a_method_records_its_own_settings_and_settings_record_them_flat():
    method = SparseFW(alpha=0.5, options=SolverOptions(max_iter=7))
    assert method.record() == {"method": "sparsefw", "warm_start": "wanda", "alpha": 0.5, "tol": 1e-4,
                               "options": dataclasses.asdict(SolverOptions(max_iter=7)), "certify_iter": 0}
    record = PruneSettings(method=method, sparsity=0.6).record()
    assert record["alpha"] == 0.5 and record["options"]["max_iter"] == 7 and record["sparsity"] == 0.6
    assert record["shrinkage"] == 0.5  # sparsefw's default, resolved
    assert PruneSettings(method="wanda").record() == {"method": "wanda", "sparsity": 0.5, "pattern": None,
                                                      "reconstruct": False, "recover": None, "allocation": None,
                                                      "shrinkage": 0.0}
    assert PruneSettings(method="sparsefw").method == SparseFW()  # a name is its method with the defaults


@pytest.mark.parametrize("name, options, message", [
    ("wanda", {"alpha": 0.5}, "method wanda does not use alpha \\(it would be ignored\\); those are sparsefw's"),
    ("sparsegpt", {"options": SolverOptions()}, "method sparsegpt does not use options .*those are sparsefw's"),
    ("sparsefw-published", {"alpha": 0.9},
     "method sparsefw-published does not use alpha .*it is the published recipe, α = 0.9 from a Wanda warm start"),
    ("sparsefw", {"damp": 0.1}, "method sparsefw does not use damp .*no method takes them"),
    ("lasso", {}, "method must be one of magnitude, wanda, ria, sparsegpt, sparsefw, sparsefw-published; got 'lasso'"),
])
def test_an_option_a_method_does_not_take_is_refused_naming_who_takes_it(name, options, message):
    with pytest.raises(ValueError, match=message):
        method_from_options(name, options)


@pytest.mark.parametrize("options, message", [
    (dict(alpha=1.5), r"alpha must be in \[0, 1\]"),
    (dict(alpha=True), r"alpha must be in \[0, 1\]"),
    (dict(tol=float("nan")), "tol must be a finite number ≥ 0"),
    (dict(warm_start="sparsegpt"), "warm_start must be one of wanda, ria, magnitude"),
    (dict(certify_iter=-1), "certify_iter must be an int ≥ 0"),
    (dict(certify_iter=2.0), "certify_iter must be an int ≥ 0"),
    (dict(options={"max_iter": 3}), "options must be a fw_jax.SolverOptions"),
])
def test_sparsefw_checks_its_settings(options, message):
    with pytest.raises(ValueError, match=message):
        SparseFW(**options)


def test_settings_refuse_what_is_not_a_method_and_split_flat_options():
    with pytest.raises(ValueError, match="method must be a method name .* or a method object"):
        PruneSettings(method=3)
    settings = PruneSettings.from_options("sparsefw", alpha=0.0, sparsity=0.6, reconstruct=True)
    assert settings.method == SparseFW(alpha=0.0) and settings.sparsity == 0.6 and settings.reconstruct
    with pytest.raises(ValueError, match="method ria does not use tol"):
        PruneSettings.from_options("ria", tol=0.1)


def test_a_method_added_in_one_file_prunes_through_the_pipeline():
    @register
    @dataclasses.dataclass(frozen=True)
    class Smallest(Method):  # keeps the smallest weights: a method no one would use, so nothing else gives its mask
        name = "test-smallest"
        summary = "keep the smallest |W|"
        scale: float = 1.0

        def prune(self, layer: Layer) -> Pruned:
            k = layer.budget.k
            order = jnp.argsort(jnp.abs(layer.weight) * self.scale, axis=1)
            mask = jnp.zeros(layer.weight.shape, bool).at[jnp.arange(layer.weight.shape[0])[:, None],
                                                          order[:, :k]].set(True)
            return Pruned(mask)

    try:
        rng = np.random.default_rng(0)
        weight = rng.normal(size=(6, 8)).astype(np.float32)
        x = rng.normal(size=(32, 8)).astype(np.float32)
        settings = PruneSettings(method=method_from_options("test-smallest", {"scale": 2.0}), sparsity=0.5)
        new, record = prune_layer(weight, x.T @ x, settings)
        kept = np.asarray(new) != 0
        assert (kept.sum(1) == 4).all()
        smallest = np.argsort(np.abs(weight), axis=1)[:, :4]
        assert all(set(np.flatnonzero(kept[r])) == set(smallest[r]) for r in range(6))
        assert record["error"] > record["wanda_error"]  # the worst mask is worse than Wanda's
        assert settings.record()["scale"] == 2.0 and settings.record()["method"] == "test-smallest"
        with pytest.raises(ValueError, match="a method needs a new name"):
            register(Smallest)
    finally:
        METHODS.pop("test-smallest", None)
