"""What makes two prune runs the same run, defined once.

Two records, both with the :data:`RUN_VERSION` they were written under:

* the **run record** (:func:`run_record`, kept in ``OUT.partial/state.json`` with its
  :func:`digest`): model source, every setting, the calibration (:func:`calibration_record`) and
  the SHA-256 of its very tokens, the output dtype. A checkpointed run is resumed only by a
  run whose record is the same; :func:`check_same_run` refuses any other, saying what differs.
* the **request record** (:func:`request_record`, in the marker of ``OUT`` and of
  ``OUT.partial``): what the command asks for, computable before the model is loaded (the
  model path, the settings, the calibration text's digest, the counts). ``OUT`` already holding
  the result of the same request is "nothing to do".

Every field of the settings is recorded, at its default too, so a setting added later changes
every record: bump :data:`RUN_VERSION` then, and earlier checkpoints are refused with a message
that says so (``tests/test_identity.py`` fails until it is bumped and the new field pinned).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from typing import Optional, Sequence

import numpy as np

__all__ = ["RUN_VERSION", "ResumeMismatch", "calibration_record", "check_same_run", "differences", "digest",
           "recorded_classes", "request_record", "run_fingerprint", "run_record", "schema"]

#: The version of the run and request records. 1: blocks checkpointed as float32 ``.npz``; 2: each
#: block's shard of the output in the output dtype (``block_0003.safetensors``), recorded as
#: ``checkpoint_format``; 3: every setting recorded, at its default too, and ``version`` in both
#: records; 4: methods are objects that own their settings, and a run records only its method's
#: (``sparsefw``'s five, none for the others); 5: ``SolverOptions.row_chunk`` (large layers solved in
#: row chunks by default). A run record of another version is never resumed.
RUN_VERSION = 5


class ResumeMismatch(ValueError):
    """A checkpoint folder holds a different run than the one asked for, or one whose record
    cannot be read; nothing was written."""


def digest(record: dict) -> str:
    """A short SHA-256 of a JSON-ready record (keys sorted; other values by ``str``)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def calibration_record(calibration: Optional[dict], shape: Sequence[int], hidden_dtype: str) -> dict:
    """The calibration as a run records it: what the caller says of it (``source``, ``seed``),
    the count and length of the windows (``shape`` of the tokens) and, when it is not the
    default ``float32``, the dtype the hidden states are kept in between blocks."""
    record = dict(calibration or {}, nsamples=int(shape[0]), seqlen=int(shape[1]))
    if hidden_dtype != "float32":
        record["hidden_dtype"] = hidden_dtype
    return record


def run_record(loaded, settings, calibration: dict, tokens: np.ndarray) -> dict:
    """What makes two runs the same run: the version, model, settings, calibration and its very
    tokens, and the dtype the model is written in. ``loaded`` is anything with ``source`` and
    ``dtype`` (a :class:`fw_jax.models.LoadedModel`)."""
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    return {
        "version": RUN_VERSION,
        "source": str(loaded.source),
        "calibration": calibration,
        "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
        "settings": settings.record(),
        "dtype": loaded.dtype,
    }


def run_fingerprint(loaded, settings, calibration: dict, tokens: np.ndarray) -> str:
    """The :func:`digest` of :func:`run_record`: equal iff a checkpointed run can be resumed by this one."""
    return digest(run_record(loaded, settings, calibration, tokens))


def request_record(model: str, settings, calib, documents: Sequence[str], nsamples: int, seqlen: int, seed: int,
                   dtype: str = "auto", format: str = "hf", hidden_dtype: str = "float32") -> dict:
    """What a ``prune_to_folder`` command asks for, before the model is loaded: the model path
    (resolved), every setting, the calibration (its name and its text's digest) and the counts."""
    text = hashlib.sha256()
    for doc in documents:
        text.update(hashlib.sha256(doc.encode("utf-8")).digest())
    model_id = os.path.realpath(model) if os.path.exists(model) else str(model)
    return {"version": RUN_VERSION, "model": model_id, "settings": settings.record(),
            "calib": calib if isinstance(calib, str) else list(calib), "text_sha256": text.hexdigest(),
            "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "dtype": dtype, "format": format,
            "hidden_dtype": hidden_dtype}


def differences(then: dict, now: dict, prefix: str = "") -> list[str]:
    """``key: X there, Y now`` for every leaf that differs between two run records."""
    out = []
    for key in sorted(set(then) | set(now)):
        a, b = then.get(key, "(absent)"), now.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            if key == "tokens_sha256":
                out.append("calibration tokens: different (same source, but its text or tokenizer changed)")
            else:
                out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


def check_same_run(state: dict, record: dict, work_dir: str) -> None:
    """Raise :class:`ResumeMismatch` unless ``state`` (the parsed ``state.json`` of ``work_dir``)
    holds the run ``record`` describes: a run record of another version (an earlier or later
    fw_jax's) is refused as such; one of this version, with every field that differs listed."""
    then = state.get("run") if isinstance(state.get("run"), dict) else {}
    version = then.get("version", then.get("checkpoint_format", 1))
    if version != RUN_VERSION:
        which = "another" if not isinstance(version, int) else "an earlier" if version < RUN_VERSION else "a later"
        raise ResumeMismatch(
            f"{work_dir} holds an unfinished run of {which} fw_jax (run record version {version}; this fw_jax "
            f"writes version {RUN_VERSION}), which this one cannot resume. Run it again with the fw_jax that "
            "started it, or pass --overwrite (overwrite=True) to discard it and start over.")
    if state.get("fingerprint") != digest(record):
        differs = differences(then, json.loads(json.dumps(record, default=str)))
        raise ResumeMismatch(
            f"{work_dir} holds an unfinished run of another model, settings or calibration "
            f"({state.get('describe', '?')}), so it cannot be resumed by this one:\n  - "
            + "\n  - ".join(differs or ["(the run records differ)"])
            + "\nRun the earlier command to resume it, or pass --overwrite (overwrite=True) to discard it and start over."
        )


def recorded_classes(settings_class) -> dict[str, type]:
    """``settings_class`` and every dataclass its fields hold (``Optional`` ones included),
    recursively, by name: the classes whose fields a run record holds. A field typed as a
    method holds any registered method (``methods.METHODS``), so each of those is included."""
    from .methods import METHODS, Method

    found, todo = {}, [settings_class]
    while todo:
        cls = todo.pop()
        if cls.__name__ in found:
            continue
        if cls is Method:
            todo += list(METHODS.values())
            continue
        found[cls.__name__] = cls
        for hint in typing.get_type_hints(cls).values():
            todo += [t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)]
    return found


def schema(settings_class) -> dict[str, tuple[str, ...]]:
    """The fields every record of this :data:`RUN_VERSION` holds: those of each class of
    :func:`recorded_classes`, and the keys of the run and request records (``"run"``,
    ``"request"``). ``tests/test_identity.py`` pins it per version."""
    out = {name: tuple(f.name for f in dataclasses.fields(cls)) for name, cls in recorded_classes(settings_class).items()}
    model = types.SimpleNamespace(source="", dtype=None)
    out["run"] = tuple(run_record(model, settings_class(), {}, np.zeros((1, 1), np.int32)))
    out["request"] = tuple(request_record("", settings_class(), "", [], 1, 1, 0))
    return out
