"""SQLite persistence (WAL) of deployments and their placement versions under --state-dir.

Tables: deployments(deployment_id, topology json, created_unix_ms) and placements(deployment_id, version,
phy2log blob, created_unix_ms, trigger, stats json, transfers blob, gpu_ids json; the last two NULL
where there are none, and added to a database written before they existed). Each commit is one
transaction, and only the last
`keep_versions` placements per deployment are kept. Every call runs on one dedicated thread (the
connection never leaves it), so the event loop never waits on the disk.

Durability: WAL with synchronous=NORMAL, so a commit appends to the WAL without an fsync. A committed
placement survives the server process dying at any point (SIGKILL, OOM); an OS crash or power loss can
lose the commits since the last checkpoint, never the database's integrity. The checkpoint (which
fsyncs, ~20 ms here) is not left to SQLite's automatic one inside the commit that crosses the threshold:
it runs on the store thread right after that commit, whose caller does not wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from google.protobuf import json_format
from rebalancer_wire.v1 import rebalancer_pb2 as pb

from .model import PlacementRecord, Topology

log = logging.getLogger(__name__)

# Checkpoint once the WAL holds this much (SQLite's own default is 1000 pages, ~4 MiB).
CHECKPOINT_WAL_BYTES = 4 << 20

SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    deployment_id TEXT PRIMARY KEY,
    topology TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS placements (
    deployment_id TEXT NOT NULL REFERENCES deployments(deployment_id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    phy2log BLOB NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    trigger TEXT NOT NULL,
    stats TEXT NOT NULL,
    transfers BLOB,
    gpu_ids TEXT,
    PRIMARY KEY (deployment_id, version)
);
"""
# Columns added since the first schema: (name, type), added to older databases on open.
ADDED_PLACEMENT_COLUMNS = (("transfers", "BLOB"), ("gpu_ids", "TEXT"))


def _transfers_from_blob(blob: bytes | None, deployment_id: str, version: int) -> np.ndarray | None:
    """A stored transfer plan: int32 [T, 5] rows, or None where the version has none."""
    if blob is None:
        return None
    if not isinstance(blob, bytes) or len(blob) % 20:
        raise ValueError(f"placement {deployment_id!r} version {version} has no int32 [T, 5] transfer plan")
    return np.frombuffer(blob, dtype="<i4").reshape(-1, 5).astype(np.int32)


class StateError(RuntimeError):
    """The state directory cannot be used (unwritable, or the database is corrupt)."""


class Store:
    """The deployment and placement tables; async methods hop to the store thread."""

    def __init__(self, state_dir: str, keep_versions: int = 16) -> None:
        self.path = os.path.join(state_dir, "rebalancer.sqlite3")
        self.wal_path = self.path + "-wal"
        self.keep_versions = keep_versions
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        """Open (creating) the database and check it; raises StateError with a message fit for an operator."""
        self._executor.submit(self._open).result()

    def _open(self) -> None:
        state_dir = os.path.dirname(self.path)
        try:
            os.makedirs(state_dir, exist_ok=True)
            if not os.access(state_dir, os.W_OK | os.X_OK):
                raise StateError(f"state dir {state_dir} is not writable")
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run after commits, see _checkpoint_if_due
            db.execute("PRAGMA foreign_keys=ON")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StateError(f"state database {self.path} is corrupt: {check}")
            db.executescript(SCHEMA)
            present = {row[1] for row in db.execute("PRAGMA table_info(placements)")}
            for name, kind in ADDED_PLACEMENT_COLUMNS:
                if name not in present:
                    db.execute(f"ALTER TABLE placements ADD COLUMN {name} {kind}")
        except (OSError, sqlite3.Error) as error:
            raise StateError(f"cannot use state database {self.path}: {error}") from error
        self._db = db

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def load(self) -> tuple[dict[str, Topology], dict[str, PlacementRecord]]:
        """Every deployment's topology and its current placement (blocking; used at start-up only).

        Raises StateError when a row cannot be read back (a foreign schema, a damaged blob): serving
        without a committed placement would be worse than not starting.
        """
        try:
            return self._executor.submit(self._load).result()
        except (sqlite3.Error, ValueError, KeyError, TypeError) as error:
            raise StateError(f"state database {self.path} is unreadable: {type(error).__name__}: {error}") from error

    def _load(self) -> tuple[dict[str, Topology], dict[str, PlacementRecord]]:
        topologies = {
            row[0]: Topology.from_json(row[1])
            for row in self._db.execute("SELECT deployment_id, topology FROM deployments")
        }
        rows = self._db.execute(
            "SELECT p.deployment_id, p.version, p.phy2log, p.created_unix_ms, p.trigger, p.stats, p.transfers,"
            " p.gpu_ids"
            " FROM placements p"
            " JOIN (SELECT deployment_id, MAX(version) AS version FROM placements GROUP BY deployment_id) m"
            " USING (deployment_id, version)"
        )
        placements = {}
        for deployment_id, version, blob, created, trigger, stats, transfers, gpu_ids in rows:
            topology = topologies[deployment_id]
            shape = (topology.num_layers, topology.num_replicas)
            if not isinstance(blob, bytes) or len(blob) != 8 * shape[0] * shape[1]:
                raise ValueError(f"placement {deployment_id!r} version {version} is not an int64 {list(shape)} map")
            phy2log = np.frombuffer(blob, dtype="<i8").reshape(shape).copy()
            if ((phy2log < 0) | (phy2log >= topology.num_experts)).any():
                raise ValueError(f"placement {deployment_id!r} version {version} names unknown experts")
            placements[deployment_id] = PlacementRecord(
                deployment_id=deployment_id,
                version=version,
                topology=topology,
                phy2log=phy2log,
                logcnt=np.empty(0),
                log2phy=np.empty(0),
                stats=json_format.Parse(stats, pb.PlacementStats()),
                trigger=trigger,
                created_unix_ms=created,
                transfers=_transfers_from_blob(transfers, deployment_id, version),
                gpu_ids=None if gpu_ids is None else np.asarray(json.loads(gpu_ids), dtype=np.int64),
            )
        return topologies, placements

    async def add_deployment(self, deployment_id: str, topology: Topology, created_unix_ms: int) -> None:
        await self._call(
            self._execute,
            "INSERT INTO deployments (deployment_id, topology, created_unix_ms) VALUES (?, ?, ?)",
            (deployment_id, topology.to_json(), created_unix_ms),
        )

    def _execute(self, sql: str, args: tuple) -> None:
        self._db.execute(sql, args)

    async def commit(self, record: PlacementRecord, relayout: Topology | None = None) -> None:
        """Insert `record` and prune versions older than the last `keep_versions`, in one transaction;
        `relayout` (a plan for a changed GPU set) replaces the deployment's topology in the same one."""
        await self.start_commit(record, relayout)

    def start_commit(self, record: PlacementRecord, relayout: Topology | None = None) -> asyncio.Future:
        """`commit`, handed to the store thread now (the caller may work until it awaits the future);
        after it, without anyone waiting, the WAL is checkpointed if it has grown past CHECKPOINT_WAL_BYTES."""
        done = asyncio.get_running_loop().run_in_executor(self._executor, self._commit, record, relayout)
        self._executor.submit(self._checkpoint_if_due)
        return done

    def _checkpoint_if_due(self) -> None:
        try:
            if self._db is not None and os.path.getsize(self.wal_path) >= CHECKPOINT_WAL_BYTES:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except (OSError, sqlite3.Error) as error:  # the WAL keeps the commits; the next try checkpoints
            log.warning("WAL checkpoint of %s failed: %s", self.path, error)

    def _commit(self, record: PlacementRecord, relayout: Topology | None) -> None:
        with self._transaction():
            if relayout is not None:
                self._db.execute(
                    "UPDATE deployments SET topology = ? WHERE deployment_id = ?",
                    (relayout.to_json(), record.deployment_id),
                )
            self._db.execute(
                "INSERT INTO placements (deployment_id, version, phy2log, created_unix_ms, trigger, stats,"
                " transfers, gpu_ids) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.deployment_id,
                    record.version,
                    np.ascontiguousarray(record.phy2log, dtype="<i8").tobytes(),
                    record.created_unix_ms,
                    record.trigger,
                    json_format.MessageToJson(record.stats, indent=None),
                    None if record.transfers is None else np.ascontiguousarray(record.transfers, dtype="<i4").tobytes(),
                    None if record.gpu_ids is None else json.dumps([int(g) for g in record.gpu_ids]),
                ),
            )
            self._db.execute(
                "DELETE FROM placements WHERE deployment_id = ? AND version <= ?",
                (record.deployment_id, record.version - self.keep_versions),
            )

    async def delete_deployment(self, deployment_id: str) -> None:
        await self._call(self._delete, deployment_id)

    def _delete(self, deployment_id: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM placements WHERE deployment_id = ?", (deployment_id,))
            self._db.execute("DELETE FROM deployments WHERE deployment_id = ?", (deployment_id,))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        if self._db is not None:
            self._executor.submit(self._db.close).result()
            self._db = None
        self._executor.shutdown(wait=True)
