"""Pruning across processes (hosts): every process runs the same command.

After :func:`initialize`:

* the calibration samples are shared out in chunks of :data:`SAMPLE_CHUNK` consecutive samples
  (process ``p`` of ``P`` takes chunks ``p, p + P, ...``). A chunk is the batch that
  ``models.run_block`` and ``models.block_grams`` compute at a time, so every chunk goes through
  the same compiled steps with the same inputs as in one process, and gives the same bits;
* :func:`block_grams` adds the chunks' Gram matrices in float64 with compensated (two-sum)
  additions, then the processes' parts in process order, and rounds once to float32. The exact
  sum does not depend on the order, so every process, and a run of any number of processes,
  holds the very matrices one process computes (up to a rounding of the float64 compensation,
  about 2⁻¹⁰⁶ relative, that would have to land on a float32 rounding boundary);
* the layers of a block are shared out (layer ``i`` to process ``i mod P``); each solves its
  own, and the pruned weights and records are exchanged (:func:`share_results`), so every
  process continues with the same pruned block;
* only process 0 writes (:func:`is_writer`): checkpoints, the output folder, the report.

The processes talk over TCP: process 0 listens at the coordinator's ``HOST:PORT``, every other
process connects to it, and each exchange goes through process 0. Every connection carries a
heartbeat. When a process is lost (it ended, or nothing came from it for
:data:`LOST_AFTER_SECONDS`), the others raise :class:`PeerLost`, naming it, at their next
exchange (the end of the current block's calibration or solves at the latest); the blocks
process 0 saved stay in ``OUT.partial``, and running the same command again in every process
resumes. A process that stops on an error tells the others why (:func:`leave`), and they say
it. JAX's own runtime (``jax.distributed``) is not used for this: when one process dies,
its coordination client ends every other process with a native abort (SIGABRT and a C++ stack
dump) that Python cannot catch, within a second if process 0 died.

``--coordinator auto`` takes the coordinator's address, the process count and this process's
index from the cluster (SLURM, Open MPI, TPU pods), as ``jax.distributed.initialize()`` would.
"""

from __future__ import annotations

import io
import json
import queue
import socket
import struct
import threading
import time
from typing import Callable, NamedTuple, Optional

import numpy as np

__all__ = ["PeerLost", "SAMPLE_CHUNK", "barrier", "block_grams", "check_sample_count", "initialize", "is_writer",
           "leave", "local_samples", "owner", "process_count", "process_index", "sample_rows", "share_results",
           "sum_over_processes"]

SAMPLE_CHUNK = 4  #: samples per chunk: the batch of ``models.run_block`` and ``models.block_grams``
HEARTBEAT_SECONDS = 2.0  #: how often every connection says it is alive
LOST_AFTER_SECONDS = 120.0  #: a process from which nothing came for this long is lost
JOIN_SECONDS = 300.0  #: how long process 0 waits for the others to connect (and they for it)

_MAGIC = b"FWJX"
_HEADER = struct.Struct("!4sBQ")  # magic, kind, payload length
_HELLO, _WELCOME, _REFUSED, _DATA, _PING, _LOST = range(1, 7)
_CLOSED = "its connection closed (the process ended, was killed, or its host went away)"


class PeerLost(RuntimeError):
    """Another process of the run ended or can no longer be reached, so this one cannot go on.

    Attributes:
      process: the lost process's index (``None`` if it cannot be known).
      processes: how many processes the run has.
      why: what was seen (its connection closed, it fell silent, it stopped with an error).
    """

    def __init__(self, process: Optional[int], processes: int, why: str):
        self.process, self.processes, self.why = process, processes, why
        who = f"process {process} of {processes}" if process is not None else f"one of the {processes} processes"
        super().__init__(f"{who} was lost: {why}")


class _Gone(NamedTuple):
    """What a link's reader leaves in its inbox when the connection ends or falls silent."""

    why: str


def _read_exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("connection closed")
        got += n
    return buffer


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    magic, kind, size = _HEADER.unpack(_read_exactly(sock, _HEADER.size))
    if magic != _MAGIC:
        raise EOFError("not an fw-jax process")
    return kind, _read_exactly(sock, size) if size else b""


def _send_frame(sock: socket.socket, kind: int, payload: bytes = b"") -> None:
    sock.sendall(_HEADER.pack(_MAGIC, kind, len(payload)))
    if payload:
        sock.sendall(payload)


class _Link:
    """The connection to one other process. A reader thread puts every frame but heartbeats in
    ``inbox``, and a :class:`_Gone` when the connection ends or nothing came for ``lost_after``
    seconds; :meth:`send` writes whole frames (one at a time)."""

    def __init__(self, sock: socket.socket, peer: int, lost_after: float):
        self.sock, self.peer, self.lost_after = sock, peer, lost_after
        self.inbox: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        sock.settimeout(lost_after)
        threading.Thread(target=self._read, name=f"fw-jax: from process {peer}", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                kind, payload = _read_frame(self.sock)
                if kind != _PING:
                    self.inbox.put((kind, payload))
        except socket.timeout:
            self.inbox.put(_Gone(f"nothing came from it for {self.lost_after:.0f} s (hung, or its host unreachable)"))
        except (OSError, EOFError, struct.error):
            self.inbox.put(_Gone(_CLOSED))

    def send(self, kind: int, payload: bytes = b"") -> None:
        with self.lock:
            _send_frame(self.sock, kind, payload)

    def ping(self) -> None:
        if self.lock.acquire(blocking=False):  # a long send in progress says enough
            try:
                _send_frame(self.sock, _PING)
            except OSError:
                pass  # the reader sees the connection end
            finally:
                self.lock.release()


class _Run:
    """This process's place in the run: its index, the process count, its links (process 0:
    one per other process; the others: one, to process 0) and the exchanges done so far."""

    def __init__(self, index: int, count: int, links: dict[int, _Link]):
        self.index, self.count, self.links = index, count, links
        self.steps = 0
        self.lost: Optional[PeerLost] = None
        if links:
            threading.Thread(target=self._heartbeat, name="fw-jax: heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_SECONDS)
            for link in list(self.links.values()):
                link.ping()

    def _tell_others(self, kind: int, payload: bytes, but: Optional[int] = None) -> None:
        for peer, link in self.links.items():
            if peer != but:
                try:
                    link.send(kind, payload)
                except OSError:
                    pass

    def _lose(self, process: Optional[int], why: str) -> PeerLost:
        """Record the loss (process 0 tells every other process) and return it to be raised."""
        if self.lost is None:
            self.lost = PeerLost(process, self.count, why)
            if self.index == 0:
                self._tell_others(_LOST, json.dumps({"process": process, "why": why}).encode(), but=process)
        return self.lost

    def _next(self, peer: int) -> bytes:
        """The next data frame from ``peer``; raises :class:`PeerLost` if it (or, as process 0
        says, another process) was lost instead."""
        item = self.links[peer].inbox.get()
        if isinstance(item, _Gone):
            raise self._lose(peer, item.why)
        kind, payload = item
        if kind == _LOST:
            lost = json.loads(payload)
            raise self._lose(lost["process"], lost["why"])
        if kind != _DATA:
            raise self._lose(peer, f"it sent an unexpected message (kind {kind})")
        return payload

    def _send(self, peer: int, payload: bytes) -> None:
        try:
            self.links[peer].send(_DATA, payload)
        except OSError:
            raise self._lose(peer, _CLOSED) from None

    def exchange(self, name: str, payload: bytes, combine: Callable[[list[bytes]], bytes]) -> bytes:
        """Every process gives ``payload``; process 0 calls ``combine`` on them (in process
        order) and every process returns its result. The exchange's number and ``name`` must
        agree across processes (they do when all run the same command)."""
        if self.lost is not None:
            raise self.lost
        self.steps += 1
        tag = f"{self.steps}:{name}".encode()
        if self.index != 0:
            self._send(0, len(tag).to_bytes(4, "big") + tag + payload)
            return self._next(0)
        parts = [payload]
        for peer in range(1, self.count):
            data = self._next(peer)
            size = int.from_bytes(data[:4], "big")
            if data[4:4 + size] != tag:
                raise self._lose(peer, f"it is at exchange {data[4:4 + size].decode()!r}, process 0 at "
                                       f"{tag.decode()!r}: the processes do not run the same command")
            parts.append(data[4 + size:])
        result = combine(parts)
        for peer in range(1, self.count):
            self._send(peer, result)
        return result

    def leave(self, why: str) -> None:
        """Tell the others this process stops, and why (best effort)."""
        if self.lost is None:
            self.lost = PeerLost(self.index, self.count, why)  # no later exchange from here
            self._tell_others(_LOST, json.dumps({"process": self.index, "why": why}).encode())


_run: Optional[_Run] = None


def _address(coordinator: str) -> tuple[str, int]:
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator must be HOST:PORT (e.g. node001:4321) or auto; got {coordinator!r}")
    return host.strip("[]"), int(port)


def _detect_cluster(num_processes: Optional[int], process_id: Optional[int]) -> tuple[str, int, int]:
    """The coordinator, process count and index from the cluster's environment, as
    ``jax.distributed.initialize()`` finds them (SLURM, Open MPI, TPU pods)."""
    from jax._src import clusters  # the detection jax.distributed uses; it reads the environment

    try:
        address, count, index, devices = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, num_processes, process_id, None, None, int(JOIN_SECONDS))
    except Exception as e:  # noqa: BLE001 (each cluster type fails in its own way)
        raise ValueError(f"--coordinator auto could not read the cluster's settings ({e}); give "
                         "--coordinator HOST:PORT, --num-processes and --process-id") from None
    if address is None or count is None or index is None:
        raise ValueError("--coordinator auto found no cluster (SLURM, Open MPI, TPU pod) in the environment; give "
                         "--coordinator HOST:PORT, --num-processes and --process-id")
    if devices:  # one process per accelerator, as jax.distributed would set it
        import jax

        visible = ",".join(str(d) for d in devices)
        jax.config.update("jax_cuda_visible_devices", visible)
        jax.config.update("jax_rocm_visible_devices", visible)
    return address, int(count), int(index)


def _serve(port: int, count: int, run_id: str, join_seconds: float) -> dict[int, socket.socket]:
    """Process 0: accept the other ``count - 1`` processes, check their hellos, welcome them."""
    try:
        if socket.has_dualstack_ipv6():
            server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            server = socket.create_server(("", port))
    except OSError as e:
        raise ValueError(f"process 0 cannot listen on port {port} ({e.strerror or e}): choose another port in "
                         "--coordinator HOST:PORT") from None
    joined: dict[int, socket.socket] = {}
    deadline = time.monotonic() + join_seconds

    def refuse(problem: str, *also: socket.socket) -> ValueError:
        for sock in [*also, *joined.values()]:  # every process that came says the same, and stops
            try:
                _send_frame(sock, _REFUSED, problem.encode())
            except OSError:
                pass
        return ValueError(problem)

    try:
        with server:
            while len(joined) < count - 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(1, count)) - set(joined))
                    raise refuse(
                        f"process 0 waited {join_seconds:.0f} s for the other processes; process"
                        f"{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))} did not join. Start "
                        f"every process with the same command, --num-processes {count} and its own --process-id, "
                        "--coordinator naming process 0's host and port")
                server.settimeout(left)
                try:
                    sock, _ = server.accept()
                except socket.timeout:
                    continue
                try:
                    sock.settimeout(min(left, 30.0))
                    kind, payload = _read_frame(sock)
                    hello = json.loads(payload) if kind == _HELLO else None
                    peer, theirs = int(hello["process"]), int(hello["processes"])
                except (OSError, EOFError, struct.error, ValueError, TypeError, KeyError):
                    sock.close()  # not one of ours (a port scan, another program): ignore it
                    continue
                problem = None
                if theirs != count:
                    problem = f"process {peer} was started with --num-processes {theirs}, process 0 with {count}"
                elif not 1 <= peer < count:
                    problem = f"a process was started with --process-id {peer}; the others are 1 to {count - 1}"
                elif peer in joined:
                    problem = f"two processes were started with --process-id {peer}"
                elif hello.get("run") != run_id:
                    problem = (f"process {peer} runs another command than process 0: every process must run the "
                               "same command, but for --process-id")
                if problem is not None:
                    error = refuse(problem, sock)
                    sock.close()
                    raise error
                joined[peer] = sock
            for sock in joined.values():
                _send_frame(sock, _WELCOME)
    except BaseException:
        for sock in joined.values():
            sock.close()
        raise
    return joined


def _join(host: str, port: int, index: int, count: int, run_id: str, join_seconds: float) -> socket.socket:
    """Any process but 0: connect to process 0 (it may start later), say who this is, wait to be welcomed."""
    deadline = time.monotonic() + join_seconds
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=10)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                raise ValueError(f"process {index} could not reach process 0 at {host}:{port} within "
                                 f"{join_seconds:.0f} s ({e.strerror or e}): start it (--process-id 0) with the "
                                 "same command, and check the address") from None
            time.sleep(0.5)
    try:  # process 0 was listening, so its own wait for the others ends before this one's
        sock.settimeout(join_seconds + 10.0)
        _send_frame(sock, _HELLO, json.dumps({"process": index, "processes": count, "run": run_id}).encode())
        kind, payload = _read_frame(sock)
    except (OSError, EOFError, struct.error):
        sock.close()
        raise ValueError(f"process 0 at {host}:{port} did not welcome process {index} (it stopped; its own message "
                         "says why)") from None
    if kind == _REFUSED:
        sock.close()
        raise ValueError(f"process 0 refused the run: {payload.decode(errors='replace')}")
    if kind != _WELCOME:
        sock.close()
        raise ValueError(f"{host}:{port} is not an fw-jax process 0")
    return sock


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, run_id: str = "", join_seconds: float = JOIN_SECONDS,
               lost_after: float = LOST_AFTER_SECONDS) -> None:
    """Join the run: ``coordinator`` is ``"HOST:PORT"`` (process 0 listens on that port), or
    ``"auto"`` / ``None`` to read it, the process count and this process's index from the cluster.

    ``run_id``: any string that must be the same in every process (the CLI passes a digest of
    its arguments but ``--process-id``); a process whose differs is refused, and so is the run.
    Returns when every process has joined; raises ``ValueError`` naming the problem otherwise
    (after ``join_seconds``: a process missing)."""
    global _run
    if _run is not None:
        raise RuntimeError("fw_jax.pipeline.distributed.initialize was already called in this process")
    if coordinator in (None, "auto"):
        coordinator, num_processes, process_id = _detect_cluster(num_processes, process_id)
    elif num_processes is None or process_id is None:
        raise ValueError("--coordinator HOST:PORT needs --num-processes and --process-id")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"--num-processes must be a whole number ≥ 1, got {num_processes!r}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    host, port = _address(coordinator)
    if num_processes == 1:
        _run = _Run(0, 1, {})
        return
    if process_id == 0:
        sockets = _serve(port, num_processes, run_id, join_seconds)
    else:
        sockets = {0: _join(host, port, process_id, num_processes, run_id, join_seconds)}
    _run = _Run(process_id, num_processes, {peer: _Link(s, peer, lost_after) for peer, s in sockets.items()})


def process_count() -> int:
    """How many processes the run has (1 without :func:`initialize`)."""
    return 1 if _run is None else _run.count


def process_index() -> int:
    """This process's index, 0 to ``process_count() - 1``."""
    return 0 if _run is None else _run.index


def is_writer() -> bool:
    """Whether this process writes files (process 0)."""
    return process_index() == 0


def leave(why: str) -> None:
    """Tell the other processes that this one stops, and why (they raise :class:`PeerLost`
    with it). A no-op in one process."""
    if _run is not None and _run.count > 1:
        _run.leave(why)


def check_sample_count(nsamples: int, processes: Optional[int] = None) -> None:
    """Raise ``ValueError`` unless every one of ``processes`` gets at least one chunk of samples."""
    processes = process_count() if processes is None else processes
    if processes > 1 and nsamples <= SAMPLE_CHUNK * (processes - 1):
        raise ValueError(f"{processes} processes need more than {SAMPLE_CHUNK * (processes - 1)} calibration samples "
                         f"(--nsamples {nsamples}): they are shared out {SAMPLE_CHUNK} at a time and every process "
                         f"needs some; use --nsamples {SAMPLE_CHUNK * (processes - 1) + 1} or more, or fewer processes")


def sample_rows(nsamples: int, process: int, processes: int) -> list[int]:
    """The samples of ``process``: chunks ``process, process + processes, ...`` of
    :data:`SAMPLE_CHUNK` consecutive samples (the last chunk may be shorter)."""
    return [i for start in range(process * SAMPLE_CHUNK, nsamples, processes * SAMPLE_CHUNK)
            for i in range(start, min(start + SAMPLE_CHUNK, nsamples))]


def local_samples(tokens: np.ndarray) -> np.ndarray:
    """This process's share of the calibration samples (:func:`sample_rows`)."""
    if process_count() == 1:
        return tokens
    check_sample_count(len(tokens))
    return tokens[sample_rows(len(tokens), process_index(), process_count())]


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op in one process)."""
    if process_count() > 1:
        _run.exchange(f"barrier {name}", b"", lambda parts: b"")


def _pack_arrays(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{str(k): np.asarray(v) for k, v in arrays.items()})
    return buffer.getvalue()


def _unpack_arrays(payload: bytes) -> dict:
    with np.load(io.BytesIO(payload), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a + b`` as ``(s, e)``: ``s`` the float64 sum, ``e`` its rounding error, exactly
    (Knuth's two-sum)."""
    s = a + b
    b_part = s - a
    return s, (a - (s - b_part)) + (b - b_part)


class _ExactSum:
    """Float64 sums with their rounding errors carried along (compensated, two-sum), so that
    adding the same numbers in another grouping gives the same result once rounded.

    Additions work through the arrays a slice at a time (:data:`_SLICE` elements), in place, so
    that besides the sums and errors only a slice's temporaries are ever allocated: for a 7B
    model's 11008 × 11008 Gram matrix, about 2 GB in all instead of three times that."""

    def __init__(self):
        self.sums: dict = {}
        self.errors: dict = {}

    def add(self, key: str, value: np.ndarray, error: Optional[np.ndarray] = None) -> None:
        value = np.asarray(value)
        if key not in self.sums:
            self.sums[key] = np.array(value, np.float64)
            self.errors[key] = (np.zeros(value.shape, np.float64) if error is None
                                else np.array(error, np.float64))
            return
        sums, errors = self.sums[key].reshape(-1), self.errors[key].reshape(-1)
        value = value.reshape(-1)
        error = None if error is None else np.asarray(error).reshape(-1)
        for start in range(0, sums.size, _SLICE):
            part = slice(start, start + _SLICE)
            sums[part], e = _two_sum(sums[part], value[part].astype(np.float64))
            errors[part] += e if error is None else e + error[part]

    def result(self, key: str, dtype=np.float64) -> np.ndarray:
        """The sum, ``sums + errors`` rounded once to ``dtype``."""
        sums, errors = self.sums[key], self.errors[key]
        out = np.empty(sums.shape, dtype)
        flat = out.reshape(-1)
        for start in range(0, flat.size, _SLICE):
            part = slice(start, start + _SLICE)
            flat[part] = (sums.reshape(-1)[part] + errors.reshape(-1)[part]).astype(dtype)
        return out


_SLICE = 1 << 20  #: elements per slice of an :class:`_ExactSum` addition (8 MB of float64)


def _sum_parts(parts: list[bytes], dtypes: dict) -> bytes:
    """Process 0: every process's ``{key: sum}`` and ``{key@error: its rounding errors}`` added in
    process order, rounded once to each key's dtype."""
    total, integers = _ExactSum(), {}
    for part in parts:
        arrays = _unpack_arrays(part)
        for key, dtype in dtypes.items():
            if np.issubdtype(np.dtype(dtype), np.integer) or np.dtype(dtype) == np.bool_:
                integers[key] = integers.get(key, 0) + arrays[key].astype(np.int64)
            else:
                total.add(key, arrays[key], arrays[key + "@error"])
    return _pack_arrays({key: (integers[key].astype(dtype) if key in integers else total.result(key, dtype))
                         for key, dtype in dtypes.items()})


def _sum_exchange(local: dict, dtypes: dict) -> dict:
    """The sum over processes of ``local`` (``{key: (sum, error)}`` in float64, or an integer
    array), rounded to ``dtypes``; the same bits on every process."""
    payload = {}
    for key, value in local.items():
        if isinstance(value, tuple):
            payload[key], payload[key + "@error"] = value
        else:
            payload[key] = value
    keys = list(dtypes)
    result = _run.exchange("sum " + ",".join(keys), _pack_arrays(payload),
                           lambda parts: _sum_parts(parts, {k: np.dtype(dtypes[k]).str for k in keys}))
    return _unpack_arrays(result)


def sum_over_processes(arrays: dict) -> dict:
    """``{key: Σ_p array_p}``: floats added exactly (compensated float64) in process order and
    rounded once to their dtype, integers exactly; the same bits on every process. In one
    process, ``arrays`` itself."""
    if process_count() == 1:
        return arrays
    import jax.numpy as jnp

    local = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        local[key] = value if not np.issubdtype(value.dtype, np.floating) else (
            value.astype(np.float64), np.zeros(value.shape, np.float64))
    summed = _sum_exchange(local, {key: np.asarray(value).dtype for key, value in arrays.items()})
    return {key: jnp.asarray(summed[key]) for key in arrays}


def block_grams(model, b: int, hidden, *, return_inputs: bool = False, return_counts: bool = False):
    """``models.block_grams`` of block ``b`` over every process's samples: the Gram matrix of
    each chunk of :data:`SAMPLE_CHUNK` samples of ``hidden`` (this process's), added exactly
    (compensated float64), then over the processes in process order, rounded once to float32.
    One process gives the same matrices as any number of them.

    ``return_inputs`` (one process only): also the inputs themselves, as ``models.block_grams``.
    ``return_counts``: also ``{input key: tokens}`` over every process (a mixture of experts
    counts the tokens routed to each expert), last in the tuple."""
    import jax.numpy as jnp

    from fw_jax import models
    from fw_jax._progress import check_interrupt

    if return_inputs and process_count() > 1:
        raise ValueError("return_inputs needs every sample in this process (one process)")
    total, inputs, counts, pending = _ExactSum(), [], {}, None

    def take(grams):
        for key, gram in grams.items():
            total.add(key, np.asarray(gram, np.float64))

    for start in range(0, hidden.shape[0], SAMPLE_CHUNK):  # the next chunk is dispatched before the last is read
        out = models.block_grams(model, b, hidden[start:start + SAMPLE_CHUNK], batch_size=None,
                                 return_inputs=return_inputs, return_counts=return_counts)
        out = out if isinstance(out, tuple) else (out,)
        grams = out[0]
        if return_inputs:
            inputs.append(out[1])
        if return_counts:
            for key, count in out[-1].items():
                counts[key] = counts.get(key, 0) + int(count)
        if pending is not None:
            take(pending)
            check_interrupt()  # a deferred Ctrl-C stops here, between chunks
        pending = grams
    if pending is not None:
        take(pending)
    keys = list(total.sums)
    if process_count() > 1:
        local = {key: (total.sums[key], total.errors[key]) for key in keys}
        dtypes = {key: np.float32 for key in keys}
        if return_counts:
            local["@counts"] = np.array([counts[key] for key in keys], np.int64)
            dtypes["@counts"] = np.int64
        summed = _sum_exchange(local, dtypes)
        if return_counts:
            counts = {key: int(n) for key, n in zip(keys, summed.pop("@counts"))}
    else:
        summed = {key: total.result(key, np.float32) for key in keys}
    grams = {key: jnp.asarray(summed[key]) for key in keys}
    out = (grams,)
    if return_inputs:
        out += ({key: jnp.concatenate([part[key] for part in inputs]) for key in inputs[0]},)
    if return_counts:
        out += (counts,)
    return out if len(out) > 1 else grams


def owner(i: int) -> int:
    """The process that solves layer ``i`` of a block."""
    return i % process_count()


def _pack_list(parts: list[bytes]) -> bytes:
    return b"".join(len(p).to_bytes(8, "big") + p for p in parts)


def _unpack_list(payload: bytes) -> list[bytes]:
    parts, at = [], 0
    while at < len(payload):
        size = int.from_bytes(payload[at:at + 8], "big")
        parts.append(payload[at + 8:at + 8 + size])
        at += 8 + size
    return parts


def share_results(results: dict, shapes: list) -> list:
    """Every layer's ``(new_weight, record)`` on every process, from ``results`` (``{i: ...}``,
    this process's layers) and the layers' weight shapes."""
    import jax.numpy as jnp

    if process_count() == 1:
        return [results[i] for i in range(len(shapes))]
    mine = _pack_arrays({str(i): np.asarray(weight, np.float32) for i, (weight, _) in results.items()})
    records_of_mine = json.dumps({str(i): record for i, (_, record) in results.items()}).encode()
    weights, records = {}, {}
    for part in _unpack_list(_run.exchange("layers", _pack_list([mine, records_of_mine]), _pack_list)):
        their_weights, their_records = _unpack_list(part)
        weights.update(_unpack_arrays(their_weights))
        records.update(json.loads(their_records))
    shared = []
    for i, shape in enumerate(shapes):
        weight = weights[str(i)]
        if tuple(weight.shape) != tuple(shape):
            raise RuntimeError(f"layer {i} came back from process {owner(i)} with shape {weight.shape}, not {shape}")
        shared.append((jnp.asarray(weight), records[str(i)]))
    return shared
