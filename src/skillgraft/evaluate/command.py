"""An external evaluator (lmms-eval, VLMEvalKit, your own script) run on each merged checkpoint.

    --eval command --eval-command 'lmms_eval --model llava_hf --model_args pretrained={model} \\
        --tasks mme --output_path {out}' --eval-json '{out}/**/*results*.json' \\
        --eval-metric general=results.mme.mme_cognition_score

The command is split into arguments the way a shell would (``shlex``) and run WITHOUT a shell;
``{model}`` (the merged checkpoint's directory) and ``{out}`` (a fresh empty directory for the
command's output) are replaced inside the arguments, so a path is always one argument whatever it
contains (no other braces are touched, so JSON in the command is fine). Pipes, redirections and
variables need a shell: ``shell=True`` (``--eval-shell``) runs the command with ``/bin/sh``, and the two
paths then reach it as the variables ``SKILLGRAFT_MODEL`` and ``SKILLGRAFT_OUT`` (quoted to suit where
the placeholder stands), never as text the shell parses. A non-zero exit fails that trial (the
sweep goes on) with the tail of the command's stderr.
Metrics are read from the JSON file ``--eval-json`` (``{out}``, ``{model}`` and globs allowed; the
newest match wins) or, without it, from the last line of the command's standard output that parses
as JSON. A metric path is dotted (``results.mme.acc``; list indices as numbers; keys that contain dots
are matched whole).
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
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


_VARS = {"{model}": "SKILLGRAFT_MODEL", "{out}": "SKILLGRAFT_OUT"}


def shell_template(command: str) -> str:
    """``command`` with ``{model}``/``{out}`` replaced by references to their environment variables,
    quoted for where each stands (outside quotes, in double quotes, in single quotes)."""
    out: list[str] = []
    i, quote = 0, None
    while i < len(command):
        key = next((k for k in _VARS if command.startswith(k, i)), None)
        if key is not None:
            ref = "${" + _VARS[key] + "}"
            out.append({"'": f"'\"{ref}\"'", '"': ref}.get(quote, f'"{ref}"'))
            i += len(key)
            continue
        c = command[i]
        if c == "\\" and quote != "'":
            out.append(command[i:i + 2])
            i += 2
            continue
        if quote is None and c in "'\"":
            quote = c
        elif c == quote:
            quote = None
        out.append(c)
        i += 1
    return "".join(out)


class CommandEvaluator(Evaluator):
    kind = "command"
    supports_loaded = False

    def __init__(self, command: str, json_path: str | None, metrics: dict[str, str], timeout: float | None = None,
                 shell: bool = False):
        if "{model}" not in command:
            raise SkillgraftError("--eval-command must contain {model}, the merged checkpoint's directory")
        if not metrics:
            raise SkillgraftError("--eval command needs at least one --eval-metric NAME=PATH")
        self.command = command
        self.json_path = json_path
        self.metrics = dict(metrics)
        self.timeout = timeout
        self.shell = bool(shell)
        self.argv: list[str] = []
        if not self.shell:
            try:
                self.argv = shlex.split(command)
            except ValueError as e:
                raise SkillgraftError(f"--eval-command cannot be split into arguments ({e}); check its quotes") from None
            program = self.argv[0]
            if "{" not in program and shutil.which(program) is None:
                raise SkillgraftError(f"--eval-command: program {program!r} not found")

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "CommandEvaluator":
        return cls(spec["command"], spec.get("json"), spec["metrics"], spec.get("timeout"), spec.get("shell", False))

    def spec(self) -> dict[str, Any]:
        return {"kind": "command", "command": self.command, "json": self.json_path, "metrics": self.metrics,
                "timeout": self.timeout, "shell": self.shell}

    def scenarios(self) -> list[str]:
        return list(self.metrics)

    def default_target(self) -> list[str]:
        names = [m for m in self.metrics if m != "general"]
        return names[:1] or list(self.metrics)[:1]

    @staticmethod
    def _fill(text: str, model_dir: str, out: str) -> str:
        return text.replace("{model}", model_dir).replace("{out}", out)

    def evaluate_dir(self, model_dir: str | Path) -> dict[str, float]:
        with tempfile.TemporaryDirectory(prefix="skillgraft-eval-") as out:
            env = {**os.environ, "SKILLGRAFT_MODEL": str(model_dir), "SKILLGRAFT_OUT": out}
            if self.shell:
                cmd: Any = shell_template(self.command)
            else:
                cmd = [self._fill(a, str(model_dir), out) for a in self.argv]
            try:
                r = subprocess.run(cmd, shell=self.shell, capture_output=True, text=True, timeout=self.timeout, env=env)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"evaluator command timed out after {self.timeout} s") from None
            except OSError as e:
                raise RuntimeError(f"evaluator command could not start: {e.strerror or e}: {e.filename or cmd}") from None
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
            pattern = self._fill(self.json_path, model_dir, out)
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
