"""The sweep's record: one SQLite file (``SWEEP/sweep.db``) holding the sweep's identity and every trial.

Each finished trial is committed as soon as it is scored, so a sweep killed at any moment loses at
most the points in flight; rerunning the same command reopens the file and skips every point whose
key is already ``done``. Trials left ``running`` by a killed run are simply computed again.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SkillgraftError

DB_NAME = "sweep.db"
BASELINE = "__baseline__"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    key       TEXT UNIQUE NOT NULL,
    params    TEXT NOT NULL,
    state     TEXT NOT NULL,          -- running | done | failed
    scores    TEXT,                   -- {scenario: score}
    objective REAL,
    target    REAL,
    retention REAL,
    feasible  INTEGER,
    timings   TEXT,                   -- {apply_s, eval_s, restore_s, total_s}
    seed      INTEGER,
    version   TEXT,
    search    TEXT,
    backend   TEXT,
    started   REAL,
    finished  REAL,
    error     TEXT
);
"""


@dataclass
class Trial:
    key: str
    params: dict[str, Any]
    state: str
    scores: dict[str, float] = field(default_factory=dict)
    objective: float | None = None
    target: float | None = None
    retention: float | None = None
    feasible: bool | None = None
    timings: dict[str, float] = field(default_factory=dict)
    seed: int | None = None
    version: str | None = None
    search: str | None = None
    backend: str | None = None
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    id: int | None = None

    @property
    def is_baseline(self) -> bool:
        return self.key == BASELINE


def _row_to_trial(r: sqlite3.Row) -> Trial:
    return Trial(
        key=r["key"], params=json.loads(r["params"]), state=r["state"],
        scores=json.loads(r["scores"]) if r["scores"] else {},
        objective=r["objective"], target=r["target"], retention=r["retention"],
        feasible=None if r["feasible"] is None else bool(r["feasible"]),
        timings=json.loads(r["timings"]) if r["timings"] else {},
        seed=r["seed"], version=r["version"], search=r["search"], backend=r["backend"],
        started=r["started"], finished=r["finished"], error=r["error"], id=r["id"],
    )


class Store:
    """Open (or create) ``SWEEP/sweep.db``."""

    def __init__(self, sweep_dir: str | Path, *, create: bool = True):
        self.dir = Path(sweep_dir)
        self.path = self.dir / DB_NAME
        if not self.path.is_file():
            if not create:
                raise SkillgraftError(f"{self.dir} is not a sweep directory (no {DB_NAME})")
            if self.dir.exists() and not self.dir.is_dir():
                raise SkillgraftError(f"{self.dir} exists and is not a directory")
            self.dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=30.0)
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            self.db.commit()
            self.db.execute("SELECT key, value FROM meta LIMIT 1").fetchall()
            self.db.execute("SELECT key, state FROM trials LIMIT 1").fetchall()
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise SkillgraftError(
                f"{self.path} is not a readable sweep store ({e}); move it away (or the whole directory) "
                f"to start the sweep afresh"
            ) from None

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        try:
            return json.loads(row["value"]) if row else default
        except ValueError:
            raise SkillgraftError(f"{self.path}: its record of {key!r} is damaged; move the store away to start afresh") from None

    def set_meta(self, key: str, value: Any) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # ---------------------------------------------------------------- trials
    def get(self, key: str) -> Trial | None:
        row = self.db.execute("SELECT * FROM trials WHERE key=?", (key,)).fetchone()
        return _row_to_trial(row) if row else None

    def done(self, key: str) -> Trial | None:
        t = self.get(key)
        return t if t is not None and t.state == "done" else None

    def trials(self, state: str | None = "done", include_baseline: bool = False) -> list[Trial]:
        q = "SELECT * FROM trials" + (" WHERE state=?" if state else "") + " ORDER BY id"
        rows = self.db.execute(q, (state,) if state else ()).fetchall()
        out = [_row_to_trial(r) for r in rows]
        return out if include_baseline else [t for t in out if not t.is_baseline]

    def baseline(self) -> Trial | None:
        return self.done(BASELINE)

    def start(self, key: str, params: dict[str, Any], *, search: str, backend: str, seed: int | None, version: str) -> None:
        """Mark ``key`` running (a fresh row, or a failed / interrupted one reused)."""
        with self.db:
            self.db.execute(
                "INSERT INTO trials(key, params, state, seed, version, search, backend, started) "
                "VALUES (?, ?, 'running', ?, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET state='running', params=excluded.params, seed=excluded.seed, "
                "version=excluded.version, search=excluded.search, backend=excluded.backend, "
                "started=excluded.started, error=NULL",
                (key, json.dumps(params, sort_keys=True), seed, version, search, backend, time.time()),
            )

    def finish(self, key: str, scores: dict[str, float], timings: dict[str, float], *,
               objective: float | None, target: float | None, retention: float | None,
               feasible: bool | None) -> None:
        with self.db:
            cur = self.db.execute(
                "UPDATE trials SET state='done', scores=?, timings=?, objective=?, target=?, retention=?, "
                "feasible=?, finished=? WHERE key=?",
                (json.dumps(scores, sort_keys=True), json.dumps(timings, sort_keys=True), objective, target,
                 retention, None if feasible is None else int(feasible), time.time(), key),
            )
            if cur.rowcount != 1:
                raise RuntimeError(f"finish({key!r}) without start")

    def fail(self, key: str, error: str) -> None:
        with self.db:
            self.db.execute("UPDATE trials SET state='failed', error=?, finished=? WHERE key=?", (error, time.time(), key))

    def rescore(self, key: str, *, objective: float | None, target: float | None, retention: float | None,
                feasible: bool | None) -> None:
        """Recompute the derived columns (after the baseline or the objective changed); scores stay."""
        with self.db:
            self.db.execute(
                "UPDATE trials SET objective=?, target=?, retention=?, feasible=? WHERE key=?",
                (objective, target, retention, None if feasible is None else int(feasible), key),
            )

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
