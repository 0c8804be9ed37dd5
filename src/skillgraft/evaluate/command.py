"""An external evaluator (lmms-eval, VLMEvalKit, your own script) run on each merged checkpoint.

    --eval command --eval-command 'lmms_eval --model llava_hf --model_args pretrained={model} \\
        --tasks mme --output_path {out}' --eval-json '{out}/**/*results*.json' \\
        --eval-metric general=results.mme.mme_cognition_score

``{model}`` is replaced by the merged checkpoint's directory and ``{out}`` by a fresh empty directory
for the command's output (both shell-quoted; no other braces are touched, so JSON in the command is
fine). The command runs through the shell; a non-zero exit fails that trial (the sweep goes on).
Metrics are read from the JSON file ``--eval-json`` (``{out}``, ``{model}`` and globs allowed; the
newest match wins) or, without it, from the last line of the command's standard output that parses
as JSON. A metric path is dotted (``results.mme.acc``; list indices as numbers; keys that contain dots
are matched whole).
"""

from __future__ import annotations

import glob
import json
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ..errors import SkillgraftError
from .base import Evaluator


def lookup(data: Any, path: str) -> Any:
    """``data`` at dotted ``path``; a key containing dots is matched whole before splitting."""
    if path in ("", "."):
        return data
    if isinstance(data, dict):
        parts = path.split(".")
        for n in range(len(parts), 0, -1):  # longest key first: "mme.acc" may itself be a key
            key = ".".join(parts[:n])
            if key in data:
                return lookup(data[key], ".".join(parts[n:]))
        raise KeyError(path)
    if isinstance(data, list):
        head, _, rest = path.partition(".")
        try:
            return lookup(data[int(head)], rest)
        except (ValueError, IndexError):
            raise KeyError(path) from None
    raise KeyError(path)


class CommandEvaluator(Evaluator):
    kind = "command"
    supports_loaded = False

    def __init__(self, command: str, json_path: str | None, metrics: dict[str, str], timeout: float | None = None):
        if "{model}" not in command:
            raise SkillgraftError("--eval-command must contain {model}, the merged checkpoint's directory")
        if not metrics:
            raise SkillgraftError("--eval command needs at least one --eval-metric NAME=PATH")
        self.command = command
        self.json_path = json_path
        self.metrics = dict(metrics)
        self.timeout = timeout

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "CommandEvaluator":
        return cls(spec["command"], spec.get("json"), spec["metrics"], spec.get("timeout"))

    def spec(self) -> dict[str, Any]:
        return {"kind": "command", "command": self.command, "json": self.json_path, "metrics": self.metrics,
                "timeout": self.timeout}

    def scenarios(self) -> list[str]:
        return list(self.metrics)

    def default_target(self) -> list[str]:
        names = [m for m in self.metrics if m != "general"]
        return names[:1] or list(self.metrics)[:1]

    def _fill(self, text: str, model_dir: str, out: str, quote: bool) -> str:
        q = shlex.quote if quote else (lambda s: s)
        return text.replace("{model}", q(model_dir)).replace("{out}", q(out))

    def evaluate_dir(self, model_dir: str | Path) -> dict[str, float]:
        with tempfile.TemporaryDirectory(prefix="skillgraft-eval-") as out:
            cmd = self._fill(self.command, str(model_dir), out, quote=True)
            try:
                r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"evaluator command timed out after {self.timeout} s") from None
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                raise RuntimeError(f"evaluator command exited {r.returncode}: {' | '.join(tail)}")
            data = self._read(out, str(model_dir), r.stdout)
        scores = {}
        for name, path in self.metrics.items():
            try:
                v = lookup(data, path)
            except KeyError:
                raise RuntimeError(f"metric {name}: no {path!r} in the evaluator's JSON") from None
            try:
                scores[name] = float(v)
            except (TypeError, ValueError):
                raise RuntimeError(f"metric {name}: {path!r} is {v!r}, not a number") from None
        return scores

    def _read(self, out: str, model_dir: str, stdout: str) -> Any:
        if self.json_path:
            pattern = self._fill(self.json_path, model_dir, out, quote=False)
            matches = sorted(glob.glob(pattern, recursive=True), key=lambda p: Path(p).stat().st_mtime)
            if not matches:
                raise RuntimeError(f"the evaluator wrote no file matching {pattern}")
            try:
                return json.loads(Path(matches[-1]).read_text())
            except ValueError as e:
                raise RuntimeError(f"{matches[-1]}: not valid JSON ({e})") from None
        for line in reversed(stdout.strip().splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
        raise RuntimeError("the evaluator printed no JSON line and --eval-json was not given")
