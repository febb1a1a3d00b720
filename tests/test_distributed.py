"""Pruning across processes on localhost: two processes give the model one process gives, bit for
bit; when one process of a run is killed the other names it, says what is kept and stops with the
failed-run code (no native abort), and running every process again resumes to the same model.
The exchanges themselves (sums, results, barriers, refusals, losses) are checked with a few
processes that load no model."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fw_jax import models
from fw_jax.pipeline import distributed
from models_fixtures import folder_tensors, random_torch_model, tiny_config
from test_pipeline_data import char_tokenizer
from test_pipeline_prune import LINEARS, TEXT

NSAMPLES = 10  # chunks of 4, 4 and 2 samples: process 0 of 2 adds chunks 0 and 2, process 1 chunk 1
NATIVE_DUMP = re.compile(r"^[FEW]\d{4} |Check failure|^\s*@\s+0x|terminate called|Fatal Python error", re.M)
FAILED = 1  # fw_jax.cli.FAILED, spelled out: the code a user's script sees


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def three_blocks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama_3_blocks")
    config = tiny_config("llama", intermediate_size=64, max_position_embeddings=128, num_hidden_layers=3)
    random_torch_model(config, seed=5).save_pretrained(folder, safe_serialization=True)
    char_tokenizer().save_pretrained(folder)
    (folder / "calib.txt").write_text(TEXT, encoding="utf-8")
    return str(folder)


def _prune(folder, out, *extra) -> list[str]:
    return ["prune", folder, "--out", str(out), "--calib", os.path.join(folder, "calib.txt"), "--nsamples",
            str(NSAMPLES), "--seqlen", "32", "--method", "sparsefw", "--max-iter", "20", "-q", *extra]


# Runs the CLI; with FW_TEST_PAUSE_AFTER=b it stops after block b (saved, by process 0) and sleeps
# until it is killed, having touched FW_TEST_MARKER.
PAUSING_CLI = textwrap.dedent("""
    import os, sys, time
    from fw_jax import models
    if "FW_TEST_PAUSE_AFTER" in os.environ:
        pause_after, unload = int(os.environ["FW_TEST_PAUSE_AFTER"]), models.unload_block
        def unload_then_pause(loaded, b):
            unload(loaded, b)
            if b == pause_after:
                open(os.environ["FW_TEST_MARKER"], "w").close()
                time.sleep(3600)
        models.unload_block = unload_then_pause
    from fw_jax.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _launch(tmp_path, folder, out, processes=2, pause=None):
    """Every process of a run; ``pause``: ``(process, block)`` to stop after that block."""
    script = tmp_path / "pausing_cli.py"
    script.write_text(PAUSING_CLI)
    port = _free_port()
    runs = []
    for i in range(processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        if pause is not None and pause[0] == i:
            env.update(FW_TEST_PAUSE_AFTER=str(pause[1]), FW_TEST_MARKER=str(tmp_path / "paused"))
        command = [sys.executable, str(script), *_prune(folder, out, "--coordinator", f"localhost:{port}",
                                                        "--num-processes", str(processes), "--process-id", str(i))]
        runs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return runs


@pytest.fixture(scope="module")
def one_process(three_blocks, tmp_path_factory):
    """The model one process prunes (and its report), for the runs of several to equal."""
    out = tmp_path_factory.mktemp("one") / "pruned"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "fw_jax.cli", *_prune(three_blocks, out)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def _assert_same_model(one, many):
    a, b = folder_tensors(str(one)), folder_tensors(str(many))
    assert a.keys() == b.keys()
    pruned = [name for name in a if name.endswith(tuple(f"{layer}.weight" for layer in LINEARS))]
    assert len(pruned) == 3 * len(LINEARS)
    for name in a:  # every tensor, pruned or not, bit for bit: the same Gram matrices, the same masks
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    first, second = (json.loads((out / "prune_report.json").read_text()) for out in (one, many))
    assert [r["error"] for r in first["layers"]] == [r["error"] for r in second["layers"]]
    return second


def test_two_processes_prune_the_model_one_process_prunes(three_blocks, one_process, tmp_path):
    runs = _launch(tmp_path, three_blocks, tmp_path / "many")
    outputs = [r.communicate(timeout=900) for r in runs]
    for r, (_, err) in zip(runs, outputs):
        assert r.returncode == 0, err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many", "pausing_cli.py"]  # process 0 wrote, nobody else
    report = _assert_same_model(one_process, tmp_path / "many")
    assert report["processes"] == 2 and report["calibration"]["nsamples"] == NSAMPLES


def _wait_for_pause(runs, tmp_path, work_dir, block):
    """Until the pausing process has stopped after ``block`` and process 0 has saved it."""
    saved = [os.path.join(work_dir, f"block_{block:04d}.{ext}") for ext in ("safetensors", "json")]
    deadline = time.monotonic() + 900
    while not ((tmp_path / "paused").exists() and all(os.path.exists(p) for p in saved)):
        for r in runs:
            if r.poll() is not None:
                pytest.fail(f"a process ended before block {block} was saved: {r.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "block not saved in time"
        time.sleep(0.2)
    (tmp_path / "paused").unlink()


def _kill_and_check_survivor(runs, victim, work_dir, saved):
    os.kill(runs[victim].pid, signal.SIGKILL)
    runs[victim].wait()
    survivor = runs[1 - victim]
    _, err = survivor.communicate(timeout=600)  # a bound, not a timing: without the fix it never ends cleanly
    assert survivor.returncode == FAILED, err[-3000:]
    assert f"process {victim} of 2 was lost: its connection closed" in err, err[-3000:]
    assert f"The {saved} block{'s' if saved > 1 else ''} saved so far {'are' if saved > 1 else 'is'} kept in " \
           f"{work_dir}" in err, err[-3000:]
    assert "Run the same command again in every process to resume" in err
    assert "Traceback" not in err and not NATIVE_DUMP.search(err), err[-3000:]


@pytest.mark.slow  # two runs of two processes each, minutes; the lost-process message is also tested in test_reliability
def test_a_killed_process_is_named_and_every_process_resumes(three_blocks, one_process, tmp_path):
    out = tmp_path / "many"
    work_dir = os.path.realpath(out) + ".partial"
    # Process 1 killed after block 0: process 0 says so and stops.
    runs = _launch(tmp_path, three_blocks, out, pause=(1, 0))
    _wait_for_pause(runs, tmp_path, work_dir, 0)
    _kill_and_check_survivor(runs, 1, work_dir, saved=1)
    # Both again: they resume after block 0; now process 0 (the one the others connect to) is killed
    # after block 1, and process 1 says so and stops.
    runs = _launch(tmp_path, three_blocks, out, pause=(0, 1))
    _wait_for_pause(runs, tmp_path, work_dir, 1)
    _kill_and_check_survivor(runs, 0, work_dir, saved=2)
    # Both again: they resume after block 1 and finish, with the model one uninterrupted process gives.
    runs = _launch(tmp_path, three_blocks, out)
    for r in runs:
        _, err = r.communicate(timeout=900)
        assert r.returncode == 0, err[-3000:]
    report = _assert_same_model(one_process, out)
    assert report["resumed_blocks"] == 2 and report["processes"] == 2


# --- The exchanges, with processes that load no model --------------------------------------------

EXCHANGES = textwrap.dedent("""
    import json, os, signal, sys, time
    import numpy as np
    from fw_jax.pipeline import distributed as d
    index, count, port, victim, run_id = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    d.initialize(f"localhost:{port}", count, index, run_id=run_id, join_seconds=float(os.environ.get("JOIN", 60)))
    rng = np.random.default_rng(index)
    values = (rng.standard_normal(64) * 10.0 ** rng.integers(-8, 8, 64)).astype(np.float32)
    summed = d.sum_over_processes({"values": values, "votes": np.array([index + 1], np.int32)})
    layers = {i: (np.full((2, 3), i, np.float32), {"layer": i, "by": index}) for i in range(5) if d.owner(i) == index}
    shared = d.share_results(layers, [(2, 3)] * 5)
    d.barrier("done")
    print(json.dumps({"values": np.asarray(summed["values"]).tolist(), "dtype": str(summed["values"].dtype),
                      "votes": int(summed["votes"][0]), "by": [r["by"] for _, r in shared],
                      "weights": [float(np.asarray(w)[1, 2]) for w, _ in shared]}), flush=True)
    if index == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    if victim >= 0:
        try:
            time.sleep(0.5)
            d.barrier("after the loss")
            print("no loss seen", flush=True)
        except d.PeerLost as e:
            print(json.dumps({"lost": e.process, "message": str(e)}), flush=True)
""")


def _exchange(tmp_path, count, victim=-1, run_ids=None, ids=None, join="60"):
    script = tmp_path / "exchanges.py"
    script.write_text(EXCHANGES)
    port = str(_free_port())
    ids = list(range(count)) if ids is None else ids
    runs = [subprocess.Popen([sys.executable, str(script), str(i), str(count), port, str(victim),
                              (run_ids or {}).get(i, "same")], env=dict(os.environ, JAX_PLATFORMS="cpu", JOIN=join),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in ids]
    outputs = [r.communicate(timeout=300) for r in runs]
    return [(r.returncode, out, err) for r, (out, err) in zip(runs, outputs)]


def test_sums_results_and_barriers_agree_on_every_process(tmp_path):
    results = _exchange(tmp_path, 3)
    lines = [json.loads(out.splitlines()[0]) for code, out, err in results if code == 0]
    assert len(lines) == 3, [err[-2000:] for _, _, err in results]
    drawn = []  # each process's values, drawn as the script draws them
    for i in range(3):
        rng = np.random.default_rng(i)
        drawn.append((rng.standard_normal(64) * 10.0 ** rng.integers(-8, 8, 64)).astype(np.float32))
    exact = np.array([np.float32(float(sum(map(_fraction, column)))) for column in zip(*drawn)], np.float32)
    for line in lines:
        assert line["dtype"] == "float32" and line["votes"] == 1 + 2 + 3
        np.testing.assert_array_equal(np.array(line["values"], np.float32), exact)  # the exact sum, rounded once
        assert line["by"] == [i % 3 for i in range(5)] and line["weights"] == [float(i) for i in range(5)]


def _fraction(x):
    from fractions import Fraction

    return Fraction(float(x))


@pytest.mark.parametrize("victim", [0, 2])
def test_a_lost_process_is_named_by_every_other(tmp_path, victim):
    results = _exchange(tmp_path, 3, victim=victim)
    for i, (code, out, err) in enumerate(results):
        if i == victim:
            assert code == -signal.SIGKILL
            continue
        lost = json.loads(out.splitlines()[-1])
        assert lost["lost"] == victim, out + err
        assert lost["message"].startswith(f"process {victim} of 3 was lost: its connection closed"), lost
        assert "Traceback" not in err and not NATIVE_DUMP.search(err), err


@pytest.mark.parametrize("case, message", [
    (dict(run_ids={1: "other"}), "process 1 runs another command than process 0"),
    (dict(ids=[0, 1, 1]), "two processes were started with --process-id 1"),
])
def test_a_run_whose_processes_disagree_is_refused_by_all(tmp_path, case, message):
    results = _exchange(tmp_path, 3, join="5", **case)
    for i, (code, out, err) in enumerate(results):
        assert code != 0, out
        # Process 0 tells every process that has joined; one that comes after it gave up finds nobody.
        late = i > 0 and re.search(r"could not reach process 0 at localhost:|did not welcome process \d", err)
        assert message in err or late, err[-2000:]
    assert message in results[0][2]


def test_a_missing_process_is_named_after_the_join_time(tmp_path):
    results = _exchange(tmp_path, 3, ids=[0, 1], join="3")
    code, _, err = results[0]
    assert code != 0 and "process 2 did not join" in err, err[-2000:]
    code, _, err = results[1]  # the process that came is told why the run stops
    assert code != 0 and "process 0 refused the run: process 0 waited 3 s" in err, err[-2000:]


def test_bad_addresses_and_counts_are_refused():
    with pytest.raises(ValueError, match="HOST:PORT"):
        distributed._address("localhost")
    with pytest.raises(ValueError, match="must be in"):
        distributed.initialize("localhost:1", 2, 2)
    with pytest.raises(ValueError, match="need more than 4 calibration samples"):
        distributed.check_sample_count(4, 2)
    distributed.check_sample_count(5, 2)
    assert distributed.process_count() == 1  # none of that joined a run


# --- One process's bits in any number of processes -----------------------------------------------

def test_sample_chunks_cover_every_sample_once():
    for n in (5, 9, 10, 13, 31):
        for processes in (2, 3, 4):
            if n <= distributed.SAMPLE_CHUNK * (processes - 1):
                continue
            rows = [distributed.sample_rows(n, p, processes) for p in range(processes)]
            assert sorted(sum(rows, [])) == list(range(n)) and all(rows)
            for share in rows:  # whole chunks, as one process batches them
                starts = share[::distributed.SAMPLE_CHUNK]
                assert all(s % distributed.SAMPLE_CHUNK == 0 for s in starts)


@pytest.mark.parametrize("processes", [2, 3])
def test_each_share_computes_one_process_bits(three_blocks, processes):
    """The chunks a process holds go through the block as in one process (the same outputs, bit
    for bit), and their Gram matrices added per process, then over processes in process order,
    round to one process's matrices."""
    loaded = models.load_model(three_blocks)
    n = 11
    tokens = np.random.default_rng(0).integers(3, 100, size=(n, 24)).astype(np.int32)
    hidden = models.embed(loaded.model, tokens)
    one = distributed.block_grams(loaded.model, 1, hidden)
    outputs = np.asarray(models.run_block(loaded.model, 1, hidden))
    parts = []
    for p in range(processes):
        rows = distributed.sample_rows(n, p, processes)
        mine = hidden[np.asarray(rows)]
        np.testing.assert_array_equal(np.asarray(models.run_block(loaded.model, 1, mine)), outputs[rows])
        total = distributed._ExactSum()
        for start in range(0, len(rows), distributed.SAMPLE_CHUNK):
            chunk = mine[start:start + distributed.SAMPLE_CHUNK]
            for key, gram in models.block_grams(loaded.model, 1, chunk, batch_size=None).items():
                total.add(key, np.asarray(gram, np.float64))
        parts.append(distributed._pack_arrays({**total.sums, **{k + "@error": v for k, v in total.errors.items()}}))
    many = distributed._unpack_arrays(distributed._sum_parts(parts, {key: "<f4" for key in one}))
    for key in one:
        np.testing.assert_array_equal(many[key], np.asarray(one[key]), err_msg=key)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e6, 1e6, width=32), st.integers(-30, 30)), min_size=2, max_size=40),
       st.randoms(use_true_random=False))
def test_compensated_sums_do_not_depend_on_the_grouping(values, random):
    """Float32 numbers of very different sizes added in float64 with their rounding errors give the
    exact sum rounded once, whichever way they are grouped and ordered."""
    numbers = np.array([np.float32(v * 2.0 ** e) for v, e in values], np.float32)
    numbers = numbers[np.isfinite(numbers)]
    if numbers.size < 2:
        return
    results = []
    for _ in range(3):
        order = list(range(numbers.size))
        random.shuffle(order)
        cut = random.randint(1, numbers.size - 1)
        groups = []
        for chosen in (order[:cut], order[cut:]):
            total = distributed._ExactSum()
            for i in chosen:
                total.add("x", numbers[i:i + 1])
            groups.append(total)
        combined = distributed._ExactSum()
        for total in groups:
            combined.add("x", total.sums["x"], total.errors["x"])
        results.append(combined.result("x").astype(np.float32)[0])
    exact = np.float32(float(sum(map(_fraction, numbers))))
    assert all(r == exact or (np.isnan(r) and np.isnan(exact)) for r in results), (results, exact)
