"""What makes two prune runs the same run (fw_jax.pipeline.identity): every setting is pinned per
record version, every setting changes the run's digest, and a run of an earlier version is refused
with a message that says so."""

import dataclasses
import inspect
import json
import types

import numpy as np
import pytest

from fw_jax import SolverOptions
from fw_jax.pipeline import METHODS, Allocation, PruneSettings, RecoverSettings, identity, prune_model, prune_to_folder
from fw_jax.pipeline.checkpoints import finished_blocks
from fw_jax.pipeline import SparseFW

#: The fields each record version holds. A setting added, removed or renamed changes every run
#: record: bump identity.RUN_VERSION (earlier checkpoints are then refused) and pin it here.
PINNED = {
    5: {
        "PruneSettings": ("method", "sparsity", "pattern", "reconstruct", "recover", "allocation", "shrinkage"),
        "Magnitude": (), "Wanda": (), "RIA": (), "SparseGPT": (), "SparseFWPublished": (),
        "SparseFW": ("warm_start", "alpha", "tol", "options", "certify_iter"),
        "SolverOptions": ("max_iter", "step_rule", "swaps", "max_swaps", "lmo_method", "refresh_every", "precision",
                          "history", "row_chunk"),
        "RecoverSettings": ("steps", "learning_rate", "weight_decay", "batch_size", "holdout", "eval_every",
                            "patience", "seed", "loss", "proximal", "dense_pull"),
        "Allocation": ("method", "lam", "outlier"),
        "run": ("version", "source", "calibration", "tokens_sha256", "settings", "dtype"),
        "request": ("version", "model", "settings", "calib", "text_sha256", "nsamples", "seqlen", "seed", "dtype",
                    "format", "hidden_dtype"),
    },
}

TOKENS = np.arange(6, dtype=np.int32).reshape(3, 2)
CALIBRATION = {"source": "calib.txt", "seed": 0}

#: A value other than the default for every pinned field.
OTHER = {
    "PruneSettings.method": "wanda", "PruneSettings.sparsity": 0.6, "PruneSettings.pattern": (2, 4),
    "PruneSettings.reconstruct": True,
    "PruneSettings.recover": None, "PruneSettings.allocation": Allocation(), "PruneSettings.shrinkage": 0.2,
    "SparseFW.warm_start": "ria", "SparseFW.alpha": 0.5, "SparseFW.tol": 1e-3,
    "SparseFW.options": SolverOptions(max_iter=7), "SparseFW.certify_iter": 5,
    "SolverOptions.max_iter": 7, "SolverOptions.step_rule": "open_loop", "SolverOptions.swaps": False,
    "SolverOptions.max_swaps": 9, "SolverOptions.lmo_method": "bisect", "SolverOptions.refresh_every": 3,
    "SolverOptions.precision": "highest", "SolverOptions.history": True, "SolverOptions.row_chunk": 64,
    "RecoverSettings.steps": 7, "RecoverSettings.learning_rate": 1e-3, "RecoverSettings.weight_decay": 0.1,
    "RecoverSettings.batch_size": 3, "RecoverSettings.holdout": 0.25, "RecoverSettings.eval_every": 3,
    "RecoverSettings.patience": 5, "RecoverSettings.seed": 1, "RecoverSettings.loss": "token",
    "RecoverSettings.proximal": 0.5, "RecoverSettings.dense_pull": 0.5,
    "Allocation.method": "error", "Allocation.lam": 0.05, "Allocation.outlier": 3.0,
    "run.version": 6, "run.source": "/elsewhere/model", "run.calibration": {"source": "other.txt", "seed": 0},
    "run.tokens_sha256": TOKENS[::-1], "run.settings": PruneSettings(sparsity=0.6),
    "run.dtype": "bfloat16",
    "request.version": 6, "request.model": "/elsewhere/model", "request.settings": PruneSettings(sparsity=0.6),
    "request.calib": "other.txt", "request.text_sha256": ["other text"], "request.nsamples": 64,
    "request.seqlen": 512, "request.seed": 1, "request.dtype": "bfloat16", "request.format": "flax",
    "request.hidden_dtype": "bfloat16",
}

#: Arguments of the two entry points that are not part of a run's identity, and why.
NOT_THE_RUN = {
    "out_dir": "where the result goes, not what it is",
    "work_dir": "where the checkpoints go",
    "overwrite": "what may be replaced",
    "history_layer": "which layer's Frank-Wolfe history is plotted; the weights do not depend on it",
    "progress": "what is shown", "after_block": "a callback (tests stop runs with it)",
    "devices": "where layers are solved; the result does not depend on it (tests/test_sharding.py)",
}


def _model(source="/models/tiny", dtype=None):
    """What a run record reads of a model: its source and the dtype it is written in."""
    return types.SimpleNamespace(source=source, dtype=dtype)


def _run_digest(settings=PruneSettings(), model=None, calibration=CALIBRATION, tokens=TOKENS):
    return identity.run_fingerprint(model or _model(), settings, calibration, tokens)


REQUEST = dict(model="/models/tiny", settings=PruneSettings(), calib="calib.txt", documents=["some text"],
               nsamples=8, seqlen=32, seed=0, dtype="auto", format="hf", hidden_dtype="float32")


def test_the_run_record_version_pins_every_setting():
    pinned = PINNED.get(identity.RUN_VERSION)
    found = identity.schema(PruneSettings)
    assert pinned is not None and {k: set(v) for k, v in found.items()} == {k: set(v) for k, v in pinned.items()}, (
        "a setting was added, removed or renamed: bump RUN_VERSION in fw_jax/pipeline/identity.py (earlier "
        f"checkpoints are then refused with a message) and pin the new fields here; found {found}")
    # Every field is in the records, at its default too (none left out to keep old digests); the
    # record is flat, so no method field may be named like a shared one.
    record = PruneSettings(recover=RecoverSettings(), allocation=Allocation()).record()
    assert set(record) == set(pinned["PruneSettings"]) | set(pinned["SparseFW"])
    for field, name in (("options", "SolverOptions"), ("recover", "RecoverSettings"), ("allocation", "Allocation")):
        assert set(record[field]) == set(pinned[name]), field
    for name, method in METHODS.items():
        assert set(PruneSettings(method=name).record()) == set(pinned["PruneSettings"]) | set(pinned[method.__name__])
        assert not set(pinned[method.__name__]) & set(pinned["PruneSettings"]), name
    assert json.loads(json.dumps(record)) == record  # JSON-ready as it is
    assert set(identity.run_record(_model(), PruneSettings(), CALIBRATION, TOKENS)) == set(pinned["run"])


#: The settings each class's fields are changed in (its object present, every other setting at its default).
BASES = {"PruneSettings": PruneSettings(recover=RecoverSettings()), "SolverOptions": PruneSettings(),
         "SparseFW": PruneSettings(),
         "RecoverSettings": PruneSettings(recover=RecoverSettings()), "Allocation": PruneSettings(allocation=Allocation())}


def _changed(key: str, value) -> str:
    """The digest of the run (or request) record with the one field ``key`` set to ``value``."""
    owner, field = key.split(".")
    if owner == "run":
        args = dict(settings=PruneSettings(), model=_model(), calibration=CALIBRATION, tokens=TOKENS)
        if field == "version":
            return _with_version(value, lambda: _run_digest(**args))
        if field in ("source", "dtype"):
            args["model"] = _model(**{field: value})
        else:
            args[{"tokens_sha256": "tokens"}.get(field, field)] = value
        return _run_digest(**args)
    if owner == "request":
        args = dict(REQUEST, **{{"text_sha256": "documents"}.get(field, field): value})
        if field == "version":
            return _with_version(value, lambda: identity.digest(identity.request_record(**REQUEST)))
        return identity.digest(identity.request_record(**args))
    base = BASES[owner]
    if owner == "PruneSettings":
        return _run_digest(dataclasses.replace(base, **{field: value}))
    if owner == "SparseFW":
        return _run_digest(dataclasses.replace(base, method=dataclasses.replace(base.method, **{field: value})))
    if owner == "SolverOptions":
        options = dataclasses.replace(base.method.options, **{field: value})
        return _run_digest(dataclasses.replace(base, method=dataclasses.replace(base.method, options=options)))
    holder = {"RecoverSettings": "recover", "Allocation": "allocation"}[owner]
    inner = dataclasses.replace(getattr(base, holder), **{field: value})
    return _run_digest(dataclasses.replace(base, **{holder: inner}))


def _with_version(version, compute):
    saved = identity.RUN_VERSION
    identity.RUN_VERSION = version
    try:
        return compute()
    finally:
        identity.RUN_VERSION = saved


def _unchanged(key: str) -> str:
    owner = key.split(".")[0]
    if owner == "request":
        return identity.digest(identity.request_record(**REQUEST))
    return _run_digest() if owner == "run" else _run_digest(BASES[owner])


def test_every_setting_changes_the_run_digest():
    pinned = {f"{owner}.{field}" for owner, fields in PINNED[identity.RUN_VERSION].items() for field in fields}
    # The other methods have no settings; a setting given to one would have to be pinned and given a value here.
    assert set(OTHER) == pinned, f"give OTHER a value for {sorted(pinned - set(OTHER))}"
    same = [key for key, value in OTHER.items() if _changed(key, value) == _unchanged(key)]
    assert not same, f"these fields do not change the run's identity: {same}"


def test_the_hidden_dtype_is_recorded_once_and_only_when_not_the_default():
    assert identity.calibration_record(CALIBRATION, TOKENS.shape, "float32") == dict(CALIBRATION, nsamples=3, seqlen=2)
    half = identity.calibration_record(CALIBRATION, TOKENS.shape, "bfloat16")
    assert half["hidden_dtype"] == "bfloat16"
    assert _run_digest(calibration=half) != _run_digest(
        calibration=identity.calibration_record(CALIBRATION, TOKENS.shape, "float32"))


def test_every_argument_of_a_run_is_in_its_identity_or_said_not_to_be():
    """A new argument of prune_to_folder or prune_model must either enter the request or run record
    (bump RUN_VERSION) or be listed in NOT_THE_RUN with the reason it cannot change the result."""
    in_request = set(PINNED[identity.RUN_VERSION]["request"]) | {"model"}
    in_run = {"model", "samples", "settings", "calibration", "hidden_dtype"}  # hidden_dtype: calibration_record
    for function, recorded in ((prune_to_folder, in_request), (prune_model, in_run)):
        unaccounted = set(inspect.signature(function).parameters) - recorded - set(NOT_THE_RUN)
        assert not unaccounted, f"{function.__name__}: {sorted(unaccounted)} neither recorded nor in NOT_THE_RUN"


def _state(run: dict, fingerprint: str = "0" * 16) -> dict:
    return {"fingerprint": fingerprint, "describe": "wanda 50%", "blocks": 2, "run": run}


def test_a_run_of_an_earlier_version_is_refused_and_says_so(tmp_path):
    record = identity.run_record(_model(), PruneSettings(), CALIBRATION, TOKENS)
    older = {k: v for k, v in record.items() if k != "version"} | {"checkpoint_format": 2}
    (tmp_path / "state.json").write_text(json.dumps(_state(older)))
    with pytest.raises(identity.ResumeMismatch) as refused:
        finished_blocks(str(tmp_path), record)
    message = str(refused.value)
    assert "earlier fw_jax" in message and "version 2" in message and f"writes version {identity.RUN_VERSION}" in message
    assert "--overwrite" in message and str(tmp_path) in message
    with pytest.raises(identity.ResumeMismatch, match="a later fw_jax [(]run record version 9"):
        identity.check_same_run(_state(dict(record, version=9)), record, str(tmp_path))


def test_a_run_of_this_version_resumes_only_with_the_same_record_and_says_what_differs(tmp_path):
    record = identity.run_record(_model(), PruneSettings(), CALIBRATION, TOKENS)
    identity.check_same_run(_state(record, identity.digest(record)), record, str(tmp_path))  # the same run
    now = identity.run_record(_model(), PruneSettings(method=SparseFW(alpha=0.5)), CALIBRATION, TOKENS)
    with pytest.raises(identity.ResumeMismatch, match=r"settings\.alpha: 0\.9 there, 0\.5 now"):
        identity.check_same_run(_state(record, identity.digest(record)), now, str(tmp_path))
