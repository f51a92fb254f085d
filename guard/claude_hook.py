#!/usr/bin/env python3
"""Claude Code PreToolUse hook: the agent's shell commands may not train or touch the GPU outside
the queue.

The card belongs to the queue's GPU lane, which runs one job at a time; a training run or a CUDA
process started beside it breaks that promise (and the 6 GB card). The hook reads each Bash command
before it runs and refuses the ones that would, saying what to run instead.

What it is, and is not: a filter on the command text that catches a cooperative agent's accidents
(the habit of typing `python -m models.train`, a CUDA one-liner, a script that imports the trainer,
the same thing wrapped in `bash -c` or `nohup`). It is not a sandbox: a program that opens the card
without the command or the script saying so (a binary, a module imported from a module, a file a
first command writes and a second one runs, a shell loop reading commands from a file) gets past
any text filter. The real boundary is the operating system: the daemon as a separate OS user that
owns the card (/dev/nvidia* in its group only) and the agent as another (docs/SECURITY.md, "The daemon
as a user of its own"). Around the hook, .claude/settings.json also gives the agent's shells
CUDA_VISIBLE_DEVICES="" (no card visible to what they start), and CLAUDE.md states the rule in words.

How it reads a command: as bash would, roughly. Quotes, escapes, `$'...'`, comments, pipelines,
`;` `&&` `||` `&`, subshells, brace groups, functions, `if/while/for/case` bodies and here-docs are
understood; everything that runs a command given as text is read again with the same rules, up to
MAX_DEPTH levels (deeper is refused): `$(...)`, backticks, `<(...)`, `bash|sh|zsh|dash|ksh|fish -c
TEXT` (also `-lc`, `-ec`, ...), `eval`, `trap`, `alias`, `source FILE`, `bash FILE` and `./x.sh`
(the file is read when it exists, under 1 MB, relative to the payload's `cwd` and any `cd` before
it), text piped or redirected into a shell, `at` or `batch` (`echo ... | bash`, `bash <<< ...`,
here-docs, `cat FILE | sh`; a shell fed by a pipe the guard cannot read, such as `curl ... | sh`, is
refused), `tmux new/new-window/split-window/send-keys/run-shell ...`, `screen [-X stuff] ...`,
`watch`, `parallel`, `su/runuser/script/flock -c`. Wrappers are looked through to the program they
run: env, nohup, setsid, nice, ionice, time, timeout, sudo, doas, exec, command, builtin, stdbuf,
taskset, chrt, numactl, caffeinate, unbuffer, busybox, strace, ltrace, valgrind, ncu, nvprof,
unshare, xargs (with words piped in), systemd-run, `find -exec/-execdir/-ok/-okdir`, `uv run` /
`uvx` / `poetry|pipenv|conda|mamba|micromamba|pdm|pixi|hatch|rye|pipx run` (their options that take
a value are known; an unknown option is read both ways), `python -m cProfile|profile|pdb|trace|
coverage` and `coverage run`.

BLOCKED (with the command to run instead):
  - training, evaluation and ablations in the foreground: `lab train`, `lab eval`, `lab ablate`,
    `python -m models.train`, `python models/train.py`, any `train.py` / `ablate.py` /
    `train_task.py` script, `python -m harness.ablate|harness.train_task`, `python -m jobs.X`,
    `python -m workers...`, a script under jobs/ or workers/;
  - distributed launchers: `torchrun`, `accelerate`, `deepspeed`, `python -m torch.distributed...`;
  - Python that names CUDA or calls the trainer: `python -c` code, code fed on stdin (pipe,
    here-doc, here-string), and the named script itself (`python my_experiment.py`, `./x.py`, a
    `#!...python` file, `python -m pkg.mod` when the module's file is under the working directory):
    it is read (when it exists and is under 1 MB) and refused when it mentions cuda/nvml/
    CUDA_VISIBLE_DEVICES or imports models.train, harness.ablate, harness.train_task, jobs.train/
    ablation/eval/smoke (`from models import train` and the like), or runs `lab train|eval|ablate`.
    bench/controls.py, bench/ablation_time.py and guard/claude_hook.py are exempt from the reading:
    they are CPU-only calibration and this filter (the names below still apply);
  - `--device cuda`, `--device=cuda:0`, `device=cuda` on a script, a module or a lab command;
  - `bench/memory.py`, `bench/train_speed.py` (they build rtx2060-sized models on CUDA) and `make
    bench` (it runs them);
  - `lab smoke` without `--device cpu` (its default is auto: the card when there is one) or on a
    preset other than `tiny`; with the option given twice, the last one counts, as in click;
  - `lab submit ... --force` (the earned-run gate): the person may force it, from their own
    terminal, never the agent;
  - CUDA_VISIBLE_DEVICES set to anything but "" (or -1/none/NoDevFiles) or removed, in any form:
    `CUDA_VISIBLE_DEVICES=0 cmd`, `env CUDA_VISIBLE_DEVICES=0 cmd`, `env -u CUDA_VISIBLE_DEVICES
    cmd`, `env -i cmd`, `systemd-run -E ...`, `tmux new -e ...`, `tmux setenv ...` (only `lab
    daemon` may be started that way: it is the queue); and for the whole shell, always: a bare
    `CUDA_VISIBLE_DEVICES=0`, `export`/`declare -x`/`typeset`/`local`/`readonly` with a value,
    `export -n`, `declare +x`, `unset`, `read`, `printf -v`, `mapfile`, `let`, `for ... in`,
    `${CUDA_VISIBLE_DEVICES:=...}`;
  - `nvidia-smi` with anything but read-only options (no reset, clocks, power, modes);
  - a program the shell works out when it runs (`$L train`, `"$(which python)" -m ...`, a glob):
    refused when its own words name a blocked verb or module (train, eval, ablate, smoke,
    torchrun, deepspeed, accelerate, cuda, models.train, harness.ablate, harness.train_task), or
    the command line as typed does (there without `eval`, mostly the shell builtin); the same for
    a `lab` subcommand, a Python module or script, or `-c` code built from variables;
  - a typed command the guard cannot read (an unclosed quote or `$(`: bash would refuse it too),
    one nested deeper than MAX_DEPTH, and a shell fed by a pipe it cannot see into. A file it
    cannot read whole (a script, text fed to a shell) is judged line by line.
ALLOWED: everything else, in particular `lab submit/status/show/wait/logs/cancel/retry/kinds`,
  `lab runs/finding/register/registry/archive/restore`, `lab daemon`, `make test`, `make demo`,
  `make lint`, `pytest`, read-only `nvidia-smi`, `python bench/controls.py`, and `lab smoke --device
  cpu` on the `tiny` preset (the default preset) -- a smoke test is seconds of CPU on a model under
  1M parameters, the check the agent runs before it queues anything; `CUDA_VISIBLE_DEVICES= lab
  smoke` is the same. Text that only mentions a blocked command is not a command: `echo 'lab
  train'`, `grep -r "lab train" docs`, `git commit -m "..."`, `cat > notes.md <<'EOF' ... EOF`.

Protocol (Claude Code hooks, PreToolUse): the payload arrives as JSON on stdin with `tool_name`,
`tool_input.command` and `cwd`. To block, the hook prints
  {"hookSpecificOutput": {"hookEventName": "PreToolUse", "permissionDecision": "deny",
                          "permissionDecisionReason": "..."}}
on stdout and exits 0; the reason is shown to the agent. To allow, it prints nothing and exits
0 (the normal permission rules still apply). A payload it cannot read, or an error inside the
guard, is refused with exit code 2 and the reason on stderr (Claude Code blocks the call on exit
2): a broken guard fails closed.

Uses only the standard library, so any `python3` runs it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CVD = "CUDA_VISIBLE_DEVICES"
UNSET = "\0unset"  # the value of CVD once a command removes it from the environment
MAX_DEPTH = 8      # shells in shells, substitutions, eval, files read: deeper is refused
MAX_FILE_BYTES = 1 << 20

PY = re.compile(r"^(python|pypy|ipython)(\d+(\.\d+)?)?$")
ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(\[[^\]]*\])?\+?=")
SHELLS = frozenset({"sh", "bash", "rbash", "zsh", "dash", "ash", "ksh", "mksh", "yash", "fish"})
DECLARES = frozenset({"export", "declare", "typeset", "local", "readonly"})
SETS_VARIABLES = DECLARES | {"unset", "read", "mapfile", "readarray", "printf", "let", "for", "select"}
STDIN_PATHS = frozenset({"-", "/dev/stdin", "/dev/fd/0", "/proc/self/fd/0"})

TRAIN_MODULES = re.compile(r"^(models\.train|harness\.(ablate|train_task)|jobs(\..+)?|workers(\..+)?)$")
TRAIN_SCRIPTS = {"train.py", "ablate.py", "train_task.py"}
GPU_SCRIPTS = ("bench/memory.py", "bench/train_speed.py")
# Read by name only: CPU calibration the agent is told to run, and this filter (it names CUDA).
CPU_SCRIPTS = frozenset(ROOT / p for p in ("bench/controls.py", "bench/ablation_time.py",
                                           "guard/claude_hook.py"))
SCRIPT_RUNNER_MODULES = frozenset({"cProfile", "profile", "pdb", "trace", "coverage"})
DISTRIBUTED = {"torchrun", "accelerate", "deepspeed"}
CUDA_CODE = re.compile(r"cuda|nvml|\bCUDA_VISIBLE_DEVICES\b", re.IGNORECASE)
LAB_CODE = re.compile(
    r"models\.train|from\s+models\s+import\s[^\n]*\btrain\b|harness\.(ablate|train_task)"
    r"|from\s+harness\s+import\s[^\n]*\b(ablate|train_task)\b|\bjobs\.(train|ablation|eval|smoke)\b"
    r"|from\s+jobs\s+import\s[^\n]*\b(train|ablation|eval|smoke)\b"
    r"|\blab['\"]?\s*,?\s*['\"]?(train|eval|ablate)\b")
# What a program worked out at run time must not come with: the verbs and modules that train or take
# the card, among its own words (VERBS) or anywhere on the command line typed (ROOT_VERBS, without
# `eval`, which there is mostly the shell builtin).
VERBS = re.compile(r"\b(train|eval|ablate|smoke|torchrun|deepspeed|accelerate)\b|cuda|models[./]train"
                   r"|harness[./](ablate|train_task)", re.IGNORECASE)
ROOT_VERBS = re.compile(r"\b(train|ablate|smoke|torchrun|deepspeed|accelerate)\b|cuda|models[./]train"
                        r"|harness[./](ablate|train_task)", re.IGNORECASE)
# Options of nvidia-smi that change the card (reset, clocks, power, modes); reading is fine.
NVSMI_WRITE = re.compile(
    r"^(-r|--gpu-reset|-pm|--persistence-mode\S*|-pl|--power-limit\S*|-ac|--applications-clocks\S*|"
    r"-rac|--reset-applications-clocks|-lgc|--lock-gpu-clocks\S*|-rgc|--reset-gpu-clocks|-lmc|"
    r"--lock-memory-clocks\S*|-rmc|--reset-memory-clocks|-c|--compute-mode\S*|-e|--ecc-config\S*|-p|"
    r"--reset-ecc-errors\S*|-mig|--multi-instance-gpu\S*|-am|--accounting-mode\S*|-caa|"
    r"--clear-accounted-apps|-cc|--cuda-clocks\S*|-dm|--driver-model\S*|-fdm|--force-driver-model\S*|"
    r"-gom|--gpu-operation-mode\S*|-acp|--accounted-apps-permission\S*|-t|--toggle-led\S*|mig|drain|"
    r"nvlink|clocks|vgpu|conf-compute)$")

# What to run instead, by the kind of thing that was blocked.
INSTEAD = {
    "train": ("queue it: `lab submit train --lane gpu --set preset=... --earned-by ABLATION_JOB` "
              "(then `lab wait ID --json`); a quick check is `lab smoke --device cpu` (tiny preset)"),
    "eval": "queue it: `lab submit eval --lane gpu --set ...` (then `lab wait ID --json`)",
    "ablate": ("queue it: `lab submit ablation --lane cpu --set task=... --set 'arms=[...]'` "
               "(then `lab wait ID --json` and `lab show ID --json`)"),
    "smoke": ("run `lab smoke --device cpu` on the tiny preset (seconds of CPU), or queue a bigger one: "
              "`lab submit smoke --lane gpu --set preset=...`"),
    "gpu": ("the card belongs to the queue's GPU lane: put the work in a job kind and "
            "`lab submit KIND --lane gpu`; read the card with plain `nvidia-smi` and the queue with "
            "`lab status --json`"),
    "bench": ("bench/memory.py, bench/train_speed.py and `make bench` use the card: ask the person to run "
              "them while the daemon is stopped, or queue the check as a GPU-lane job"),
    "force": ("earn the run: queue the ablation (`lab submit ablation --lane cpu ...`) and submit with "
              "`--earned-by ABLATION_JOB`; only the person may force the gate, from their own terminal"),
    "hidden": ("write the command out so it can be read: the program by name, the commands on the command "
               "line or in a script file (not piped into a shell, not built from variables, not nested "
               f"more than {MAX_DEPTH} deep); training and GPU work is queued with `lab submit KIND` "
               "(`lab kinds --json` lists them)"),
    "parse": ("fix the command (as written bash would not run it either); training and GPU work is queued "
              "with `lab submit KIND`"),
}


def deny(what: str, why: str) -> str:
    return (f"Blocked by the lab's guard (guard/claude_hook.py): {why}. Training and GPU work go through "
            f"the queue, never a shell. Instead, {INSTEAD[what]}. See CLAUDE.md.")


def selects(value: str) -> bool:
    """Would a process given CUDA_VISIBLE_DEVICES=value see a card? (UNSET: yes, all of them.)"""
    return value.strip() not in ("", "-1", "none", "NoDevFiles")


def cvd_phrase(value: str) -> str:
    return f"removing {CVD}" if value == UNSET else f"`{CVD}={value}`"


# --- reading shell text ---------------------------------------------------------------------------


class ParseError(ValueError):
    """The text cannot be read as a shell command."""


@dataclass
class Word:
    text: str                   # as the program gets it: quotes removed, expansions left as written
    dynamic: bool = False       # holds $x, ${x}, $(...) or `...` outside single quotes: known at run time
    pattern: bool = False       # an unquoted glob or brace expansion
    quoted: bool = False
    fd: bool = False            # the 2 of `2>&1`
    sub: str | None = None      # the command, when the whole word is one $(...) or `...`
    procsub: str | None = None  # the command, when the word is <(...) or >(...)


@dataclass
class Redir:
    op: str
    target: Word | None
    body: str | None = None     # a here-doc's text


Token = str | Word | Redir

OPERATORS = (";;&", "&>>", "<<<", "<<-", ";;", ";&", "&&", "||", "|&", "&>", "<<", ">>", ">|", "<>", "<&",
             ">&", ";", "&", "|", "(", ")", "<", ">", "\n")
REDIRECTIONS = frozenset({"&>>", "<<<", "<<-", "&>", "<<", ">>", ">|", "<>", "<&", ">&", "<", ">"})
META = frozenset(" \t\r\n;&|()<>")
GLOB = re.compile(r"[*?]|\[.+\]|\{[^{}]*(,|\.\.)[^{}]*\}")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9@*#?$!-]")
ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{1,2}|u[0-9A-Fa-f]{1,4}|U[0-9A-Fa-f]{1,8}|[0-7]{1,3}|.)", re.DOTALL)
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b", "f": "\f",
           "v": "\v", "\\": "\\", "'": "'", '"': '"', "?": "?"}


def decode_escapes(text: str) -> str:
    """Backslash escapes as `$'...'`, `printf` and `echo -e` read them."""
    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        if e[0] in "xuU" and len(e) > 1:
            return chr(min(int(e[1:], 16), sys.maxunicode))
        if e[0] in "01234567":
            return chr(int(e, 8))
        return ESCAPES.get(e, "\\" + e)
    return ESCAPE.sub(one, text)


@dataclass
class _Acc:
    """One word while it is read."""
    text: list[str] = field(default_factory=list)
    bare: list[str] = field(default_factory=list)  # unquoted literal characters, where globs live
    dynamic: bool = False
    quoted: bool = False
    subs: list[str] = field(default_factory=list)
    literal: bool = False                          # anything besides command substitutions


class Lexer:
    """Bash's tokens: words (quotes removed), operators, redirections with here-doc bodies. Commands
    inside the text ($(...), `...`, <(...), and those in unquoted here-docs) are collected in `subs`
    to be judged on their own."""

    def __init__(self, src: str, pos: int = 0) -> None:
        self.s = src
        self.i = pos
        self.subs: list[str] = []
        self.cvd_default = False  # ${CUDA_VISIBLE_DEVICES:=...} assigns when the value is empty
        self._heredocs: list[tuple[Redir, str, bool, bool]] = []

    def tokens(self, nested: bool = False) -> list[Token]:
        out: list[Token] = []
        parens = 0
        s = self.s
        while True:
            self._blank()
            if self.i >= len(s):
                if nested:
                    raise ParseError("a `$(` or `<(` is not closed")
                self._read_heredocs()
                return out
            c = s[self.i]
            if c == "#":
                end = s.find("\n", self.i)
                self.i = len(s) if end < 0 else end
                continue
            if c == ")" and nested and parens == 0:
                self.i += 1
                return out
            if c in "<>" and s.startswith("(", self.i + 1):
                out.append(self._word())
                continue
            op = next((o for o in OPERATORS if s.startswith(o, self.i)), None)
            if op is None:
                out.append(self._word())
                continue
            self.i += len(op)
            if op == "\n":
                out.append(op)
                self._read_heredocs()
            elif op in REDIRECTIONS:
                out.append(self._redirection(op))
            else:
                parens += {"(": 1, ")": -1}.get(op, 0)
                out.append(op)

    def _blank(self) -> None:
        s = self.s
        while self.i < len(s):
            if s[self.i] in " \t\r":
                self.i += 1
            elif s.startswith("\\\n", self.i):
                self.i += 2
            else:
                return

    def _redirection(self, op: str) -> Redir:
        self._blank()
        s = self.s
        target = None
        procsub = s.startswith(("<(", ">("), self.i)
        if self.i < len(s) and (s[self.i] not in META or procsub):
            target = self._word()
        redir = Redir(op, target)
        if op in ("<<", "<<-") and target is not None:
            self._heredocs.append((redir, target.text, op == "<<-", target.quoted))
        return redir

    def _read_heredocs(self) -> None:
        s = self.s
        for redir, delim, tabs, quoted in self._heredocs:
            lines: list[str] = []
            while self.i < len(s):
                end = s.find("\n", self.i)
                end = len(s) if end < 0 else end
                line = s[self.i:end].rstrip("\r")
                self.i = min(end + 1, len(s))
                if (line.lstrip("\t") if tabs else line) == delim:
                    break
                lines.append(line)
            redir.body = "".join(line + "\n" for line in lines)
            if not quoted:  # an unquoted here-doc expands $(...) and `...`: those run
                scan = Lexer(redir.body)
                scan._dquote(_Acc(), closing=None)
                self.subs += scan.subs
                self.cvd_default |= scan.cvd_default
        self._heredocs = []

    def _word(self) -> Word:
        s = self.s
        acc = _Acc()
        procsub = None
        while self.i < len(s):
            c = s[self.i]
            if c in "<>" and s.startswith("(", self.i + 1):
                procsub = self._nested(self.i + 2)
                acc.text.append("/dev/fd/63")
                acc.dynamic = acc.literal = True
                continue
            if c in META:
                break
            if c == "\\":
                nxt = s[self.i + 1:self.i + 2]
                self.i += 2
                if nxt != "\n":
                    acc.text.append(nxt)
                    acc.quoted = acc.literal = True
            elif c == "'":
                end = s.find("'", self.i + 1)
                if end < 0:
                    raise ParseError("a `'` quote is not closed")
                acc.text.append(s[self.i + 1:end])
                acc.quoted = acc.literal = True
                self.i = end + 1
            elif c == '"':
                self.i += 1
                acc.quoted = True
                self._dquote(acc)
            elif c == "$":
                self._dollar(acc, in_dquote=False)
            elif c == "`":
                self._backtick(acc)
            else:
                acc.text.append(c)
                acc.bare.append(c)
                acc.literal = True
                self.i += 1
        text = "".join(acc.text)
        return Word(text, acc.dynamic, bool(GLOB.search("".join(acc.bare))), acc.quoted,
                    fd=text.isdigit() and not acc.quoted and s[self.i:self.i + 1] in ("<", ">"),
                    sub=acc.subs[0] if len(acc.subs) == 1 and not acc.literal else None, procsub=procsub)

    def _dquote(self, acc: _Acc, closing: str | None = '"') -> None:
        """Inside double quotes (or a here-doc / ${...} body when `closing` is None)."""
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if closing is not None and c == closing:
                self.i += 1
                return
            nxt = s[self.i + 1:self.i + 2]
            if c == "\\" and nxt in ("$", "`", '"', "\\", "\n"):
                if nxt != "\n":
                    acc.text.append(nxt)
                    acc.literal = True
                self.i += 2
            elif c == "$":
                self._dollar(acc, in_dquote=True)
            elif c == "`":
                self._backtick(acc)
            else:
                acc.text.append(c)
                acc.literal = True
                self.i += 1
        if closing is not None:
            raise ParseError('a `"` quote is not closed')

    def _dollar(self, acc: _Acc, in_dquote: bool) -> None:
        s, start = self.s, self.i
        nxt = s[start + 1:start + 2]
        if nxt == "(":  # $(...) and $((...)): read as a command either way (arithmetic runs nothing)
            inner = self._nested(start + 2)
            acc.text.append(s[start:self.i])
            acc.dynamic = True
            acc.subs.append(inner)
        elif nxt == "{":
            end = self._brace_end(start + 2)
            inner = s[start + 2:end]
            m = re.match(rf"\s*{CVD}:?=(.*)$", inner, re.DOTALL)
            if m and selects(m.group(1)):
                self.cvd_default = True
            scan = Lexer(inner)
            scan._dquote(_Acc(), closing=None)
            self.subs += scan.subs
            acc.text.append(s[start:end + 1])
            acc.dynamic = acc.literal = True
            self.i = end + 1
        elif nxt == "'" and not in_dquote:
            end = start + 2
            while end < len(s) and s[end] != "'":
                end += 2 if s[end] == "\\" else 1
            if end >= len(s):
                raise ParseError("a `$'` quote is not closed")
            acc.text.append(decode_escapes(s[start + 2:end]))
            acc.quoted = acc.literal = True
            self.i = end + 1
        elif nxt == '"' and not in_dquote:
            self.i += 2
            acc.quoted = True
            self._dquote(acc)
        elif m := NAME.match(s, start + 1):
            acc.text.append(s[start:m.end()])
            acc.dynamic = acc.literal = True
            self.i = m.end()
        else:
            acc.text.append("$")
            acc.literal = True
            self.i += 1

    def _brace_end(self, pos: int) -> int:
        s, depth, j = self.s, 1, pos
        while j < len(s):
            c = s[j]
            if c == "\\":
                j += 2
                continue
            if c in "'\"":
                k = s.find(c, j + 1)
                if k < 0:
                    break
                j = k + 1
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return j
            j += 1
        raise ParseError("a `${` is not closed")

    def _backtick(self, acc: _Acc) -> None:
        s, j = self.s, self.i + 1
        buf: list[str] = []
        while j < len(s):
            c = s[j]
            if c == "\\" and s[j + 1:j + 2] in ("$", "`", "\\"):
                buf.append(s[j + 1])
                j += 2
                continue
            if c == "`":
                inner = "".join(buf)
                acc.text.append(s[self.i:j + 1])
                acc.dynamic = True
                acc.subs.append(inner)
                self.subs.append(inner)
                self.i = j + 1
                return
            buf.append(c)
            j += 1
        raise ParseError("a backtick is not closed")

    def _nested(self, pos: int) -> str:
        inner = Lexer(self.s, pos)
        inner.tokens(nested=True)
        self.i = inner.i
        text = self.s[pos:inner.i - 1]
        self.subs.append(text)
        return text


@dataclass
class Command:
    words: list[Word] = field(default_factory=list)
    redirs: list[Redir] = field(default_factory=list)


def _case_head(cmd: Command) -> bool:
    """`case WORD in [PATTERN]`: a header, and maybe the first pattern, not a command."""
    w = cmd.words
    return bool(w) and w[0].text == "case" and not w[0].quoted and any(x.text == "in" for x in w[2:])


def pipelines(tokens: list[Token]) -> list[list[Command]]:
    """Simple commands, grouped by pipeline (what a command reads on stdin comes from its left).
    The patterns of a `case` (`a|b)` after `in` or `;;`) are dropped: they do not run."""
    out: list[list[Command]] = [[Command()]]
    pattern = False  # the words until the next `)` are a case pattern
    for t in tokens:
        cur = out[-1][-1]
        if isinstance(t, Word):
            if pattern and not cur.words and t.text == "esac":
                pattern = False
            if not t.fd:
                cur.words.append(t)
        elif isinstance(t, Redir):
            cur.redirs.append(t)
        elif t == ")" and (pattern or _case_head(cur)):
            out[-1] = [c for c in out[-1] if c is not cur] or [Command()]
            pattern = False
            out.append([Command()])
        elif t in ("|", "|&"):
            if not (pattern or _case_head(cur)):  # in a pattern, `|` separates alternatives
                out[-1].append(Command())
        else:
            if t in (";;", ";&", ";;&"):
                pattern = True
            elif t == "\n":
                pattern = pattern or _case_head(cur)
            else:
                pattern = False
            out.append([Command()])
    return [p for p in out if any(c.words or c.redirs for c in p)]


RESERVED = frozenset({"{", "}", "!", "if", "then", "else", "elif", "fi", "do", "done", "while", "until",
                      "esac", "coproc"})


def command_words(words: list[Word]) -> list[Word]:
    """Drop the reserved words in front (`{`, `then`, `do`, `function NAME`, ...): what follows runs."""
    i = 0
    while i < len(words) and not words[i].quoted:
        if words[i].text == "case":
            return []
        if words[i].text in RESERVED:
            i += 1
        elif words[i].text == "function":
            i += 2
        else:
            break
    return words[i:]


def join_words(words: list[Word]) -> Word:
    return Word(" ".join(w.text for w in words), any(w.dynamic for w in words),
                sub=words[0].sub if len(words) == 1 else None)


# --- judging -------------------------------------------------------------------------------------


@dataclass
class Ctx:
    depth: int
    root: str   # the command line as typed, with the command texts found in it (-c, eval, echo | sh)
    cwd: str

    def deeper(self, text: str, from_file: bool = False) -> Ctx:
        # A file's text does not join the root: a script's comments are not the agent's command line.
        return Ctx(self.depth + 1, self.root if from_file else self.root + "\n" + text, self.cwd)


@dataclass(frozen=True)
class Stdin:
    text: str | None  # None: something is fed that the guard cannot read
    fed: bool


NO_STDIN = Stdin("", False)
StdinFn = Callable[[], Stdin]


def no_stdin() -> Stdin:
    return NO_STDIN


def check(command: str, cwd: str | None = None) -> str | None:
    """The reason to block `command`, or None to allow it."""
    return check_text(command, Ctx(0, command, cwd or os.getcwd()))


def check_text(text: str, ctx: Ctx, lenient: bool = False) -> str | None:
    """`lenient`: text the agent did not type as a command (a file, a tmux argument): where it cannot
    be read whole, each line is judged on its own, and a line that cannot be read is passed."""
    if ctx.depth > MAX_DEPTH:
        return deny("hidden", f"commands nest more than {MAX_DEPTH} deep (shells in shells, eval, "
                              "substitutions, scripts)")
    lexer = Lexer(text)
    try:
        tokens = lexer.tokens()
    except ParseError as e:
        if not lenient:
            return deny("parse", f"the guard cannot read this command: {e}")
        lines = text.splitlines()
        if len(lines) < 2:
            return None
        return next((r for line in lines if (r := check_text(line, ctx, lenient=True))), None)
    if lexer.cvd_default:
        return deny("gpu", f"`${{{CVD}:=...}}` sets {CVD} for every later command of this shell")
    for sub in lexer.subs:
        if reason := check_text(sub, ctx.deeper(sub)):
            return reason
    for pipe in pipelines(tokens):
        for k, cmd in enumerate(pipe):
            words = command_words(cmd.words)
            stdin = functools.partial(stdin_of, pipe, k, ctx)
            if words and (reason := walk(words, None, ctx, stdin, top=True)):
                return reason
    return None


def nested(word: Word, ctx: Ctx) -> str | None:
    """Judge text that a shell will run as a command (-c TEXT, eval, trap, ...)."""
    text = word.text
    if word.sub is not None:  # `bash -c "$(cat x.sh)"`: judge what the substitution prints, if known
        out = output_of_text(word.sub, ctx)
        if out is not None:
            text = out
    return check_text(text, ctx.deeper(text))


def check_file_text(text: str, ctx: Ctx) -> str | None:
    return check_text(text, ctx.deeper(text, from_file=True), lenient=True)


def unknown(what: str, words: list[Word], ctx: Ctx) -> str | None:
    m = VERBS.search(" ".join(w.text for w in words)) or ROOT_VERBS.search(ctx.root)
    if m is None:
        return None
    return deny("hidden", f"{what} is only known when the shell runs it, and this command line names "
                          f"`{m.group()}`")


def walk(words: list[Word], cvd: str | None, ctx: Ctx, stdin: StdinFn, top: bool = False) -> str | None:
    """Judge one simple command: its assignments, then wrappers down to the program that runs.
    `cvd`: CUDA_VISIBLE_DEVICES as this command's prefixes leave it (None: untouched)."""
    i = 0
    while i < len(words) and (m := ASSIGN.match(words[i].text)):
        if m.group(1) == CVD:
            cvd = words[i].text[m.end():]  # a `$X` value is unknown, so it selects (the safe side)
        i += 1
    rest = words[i:]
    if not rest:
        if top and cvd is not None and selects(cvd):
            return deny("gpu", f"`{CVD}={cvd}` on its own hands a card to every later command of this shell")
        return None
    prog, args = rest[0], rest[1:]
    if prog.dynamic or prog.pattern:
        return unknown(f"the program `{prog.text}`", rest, ctx)
    name = os.path.basename(prog.text)
    if top and name in ("cd", "pushd"):
        change_dir(args, ctx)
        return None
    handled, reason = wrapper(name, args, cvd, ctx, stdin)
    if handled:
        return reason
    if reason := cvd_gate(cvd, rest):
        return reason
    hidden = cvd is not None and not selects(cvd)
    return program(name, prog, args, ctx, stdin, hidden)


def change_dir(args: list[Word], ctx: Ctx) -> None:
    """Later relative script paths are read from where `cd` went (best effort)."""
    target = next((a for a in args if not a.text.startswith("-")), None)
    if target is None:
        ctx.cwd = os.path.expanduser("~")
    elif not target.dynamic:
        ctx.cwd = os.path.normpath(os.path.join(ctx.cwd, os.path.expanduser(target.text)))


def cvd_gate(cvd: str | None, words: list[Word]) -> str | None:
    if cvd is not None and selects(cvd) and not is_lab_daemon(words):
        return deny("gpu", f"{cvd_phrase(cvd)} selects a card for a process outside the queue (only "
                           "`lab daemon` may be started that way)")
    return None


def candidates(found: Iterable[list[Word]], cvd: str | None, ctx: Ctx, stdin: StdinFn) -> str | None:
    cands = [c for c in found if c]
    if not cands:  # `CUDA_VISIBLE_DEVICES=0 nohup`: the gate still holds
        return cvd_gate(cvd, [])
    if cvd is not None and selects(cvd) and any(is_lab_daemon(c) for c in cands):
        cvd = None  # `CUDA_VISIBLE_DEVICES=0 nohup lab daemon`: the queue itself
    for c in cands:
        if reason := walk(c, cvd, ctx, stdin):
            return reason
    return None


def is_lab_daemon(words: list[Word]) -> bool:
    words = [w for w in words if not ASSIGN.match(w.text)]
    if not words:
        return False
    is_lab, args = lab_invocation(os.path.basename(words[0].text), words[1:])
    return is_lab and next((a.text for a in args if not a.text.startswith("-")), None) == "daemon"


# --- wrappers: programs that run the program named after their options ---------------------------


@dataclass(frozen=True)
class Opts:
    flags: frozenset[str] = frozenset()
    values: frozenset[str] = frozenset()  # options that take the next word as their value
    positionals: int = 0                  # operands before the command (timeout's duration, ...)


def _f(names: str) -> frozenset[str]:
    return frozenset(names.split())


def positions(args: list[Word], opts: Opts) -> list[int]:
    """Where the wrapped command may start. An option the table does not know may or may not take a
    value: both readings count, so a value is never mistaken for the end of the options."""
    found: set[int] = set()
    seen: set[tuple[int, int]] = set()

    def go(i: int, npos: int) -> None:
        if (i, npos) in seen:
            return
        seen.add((i, npos))
        while i < len(args):
            t = args[i].text
            if t == "--":
                i += 1 + npos
                break
            if len(t) < 2 or not t.startswith("-") or args[i].dynamic:
                if npos:
                    npos -= 1
                    i += 1
                    continue
                break
            if t.startswith("--"):
                name = t.split("=", 1)[0]
                if "=" in t or name in opts.flags:
                    i += 1
                elif name in opts.values:
                    i += 2
                else:
                    go(i + 2, npos)
                    i += 1
                continue
            step = 1
            for j in range(1, len(t)):  # a cluster of short options: -abc, -n5, -dmS NAME
                o = "-" + t[j]
                if o in opts.values:
                    step = 2 if j == len(t) - 1 else 1
                    break
                if o not in opts.flags:
                    go(i + 2, npos)
                    break
            i += step
        if i < len(args):
            found.add(i)

    go(0, opts.positionals)
    return sorted(found)


TRACE_OPTS = Opts(_f("-f -F -c -C -d -D -i -k -q -r -t -T -v -V -w -x -y -z -Z"),
                  _f("-o -e -p -s -u -E -a -b -I -O -S -X -P -U"))
WRAPPERS: dict[str, Opts] = {
    "nohup": Opts(),
    "nice": Opts(frozenset(f"-{d}" for d in "0123456789"), _f("-n --adjustment")),
    "ionice": Opts(_f("-t --ignore"), _f("-c -n -p -P -u --class --classdata --pid --pgid --uid")),
    "time": Opts(_f("-p -v -a -q --portability --verbose --append --quiet"), _f("-o -f --output --format")),
    "timeout": Opts(_f("-v --verbose --preserve-status --foreground"), _f("-s -k --signal --kill-after"), 1),
    "setsid": Opts(_f("-c -f -w --ctty --fork --wait")),
    "exec": Opts(_f("-c -l"), _f("-a")),
    "command": Opts(_f("-p")),
    "builtin": Opts(),
    "stdbuf": Opts(values=_f("-i -o -e --input --output --error")),
    "taskset": Opts(_f("-a -c -p --all-tasks --cpu-list --pid"), positionals=1),
    "chrt": Opts(_f("-a -b -d -e -f -i -m -o -p -r -v -R --all-tasks --batch --deadline --ext --fifo --idle "
                    "--max --other --pid --rr --verbose --reset-on-fork"),
                 _f("-T -P -D --sched-runtime --sched-period --sched-deadline"), 1),
    "numactl": Opts(_f("-a -l -s -H -b --all --localalloc --show --hardware --balancing"),
                    _f("-C -N -m -i -p -w --physcpubind --cpunodebind --membind --interleave --preferred "
                       "--weighted-interleave")),
    "caffeinate": Opts(_f("-d -i -m -s -u"), _f("-t -w")),
    "unbuffer": Opts(_f("-p")),
    "busybox": Opts(),
    "sudo": Opts(_f("-A -b -E -e -H -i -K -k -l -n -P -S -s -V -v -B -N --login --shell --non-interactive "
                    "--stdin --background --askpass --set-home --preserve-env --reset-timestamp "
                    "--remove-timestamp --list --validate --edit --bell --preserve-groups"),
                 _f("-u -g -h -p -C -D -r -t -U -T -R --user --group --host --prompt --close-from --chdir "
                    "--role --type --other-user --command-timeout --chroot")),
    "doas": Opts(_f("-n -s -L"), _f("-u -C")),
    "strace": TRACE_OPTS,
    "ltrace": TRACE_OPTS,
    "valgrind": Opts(),
    "ncu": Opts(_f("-f --force-overwrite"),
                _f("-o -k -c -s --set --section --metrics --export --target-processes --launch-skip "
                   "--launch-count --kernel-name")),
    "nvprof": Opts(_f("-f --force-overwrite"), _f("-o --log-file --export-profile")),
    "unshare": Opts(),
    "xargs": Opts(_f("-0 -t -p -r -x -o --null --verbose --interactive --no-run-if-empty --exit --open-tty"),
                  _f("-I -L -n -P -s -d -E -a --arg-file --delimiter --max-args --max-procs --max-chars "
                     "--max-lines --process-slot-var")),
    "systemd-run": Opts(_f("-t --pty -P --pipe -q --quiet -G --collect -d --same-dir -S --shell --wait "
                           "--no-block -r --remain-after-exit --send-sighup --user --system --scope "
                           "--no-ask-password"),
                        _f("-p --property -E --setenv -u --unit --description --slice -M --machine --uid "
                           "--gid --nice --working-directory -H --host --on-active --on-boot --on-startup "
                           "--on-unit-active --on-unit-inactive --on-calendar --timer-property "
                           "--path-property --socket-property --service-type --capsule -C")),
}
RUNNERS = frozenset({"uv", "uvx", "poetry", "pipenv", "conda", "mamba", "micromamba", "pdm", "pixi", "hatch",
                     "rye", "pipx"})
RUN_OPTS = Opts(
    _f("--no-sync --frozen --locked --isolated --active --no-active --no-project --all-extras --no-dev --dev "
       "--only-dev --no-default-groups --all-groups --no-editable --exact --refresh --offline -q --quiet -v "
       "--verbose --no-cache --no-env-file --all-packages --gui-script --script -s --module -m --no-config "
       "--native-tls --no-progress -U --upgrade --reinstall --compile-bytecode --no-build-isolation "
       "--no-build --no-binary --no-python-downloads --managed-python --no-managed-python --preview "
       "--live-stream --no-capture-output"),
    _f("--with --with-editable --with-requirements -p --python --project --directory --package --extra "
       "--no-extra --group --only-group --no-group --env-file --index --default-index -i --index-url "
       "--extra-index-url -f --find-links --config-file --cache-dir -C --config-setting --exclude-newer "
       "--resolution --prerelease --link-mode --keyring-provider --index-strategy --python-platform "
       "--allow-insecure-host -P --upgrade-package --reinstall-package --no-build-package "
       "--no-binary-package --refresh-package --color --from --name --prefix --cwd --manifest-path -e "
       "--environment"))
SCRIPT_RUNNER_OPTS = Opts(_f("-m --module -a --append --branch -p --parallel-mode --pylib -L --timid"),
                          _f("-o -s -c --outfile --sort --rcfile --source --omit --include --concurrency "
                             "--context --data-file --debug"))


def wrapper(name: str, args: list[Word], cvd: str | None, ctx: Ctx,
            stdin: StdinFn) -> tuple[bool, str | None]:
    """(True, reason) when `name` runs another program with this environment, judged here."""
    if name == "env":
        return True, run_env(args, cvd, ctx, stdin)
    if name in RUNNERS:
        body = runner_body(name, args)
        return (False, None) if body is None else (True, run_runner(body, cvd, ctx, stdin))
    if name == "coverage":
        if args[:1] and args[0].text == "run":
            return True, run_script_runner(args[1:], cvd, ctx, stdin)
        return False, None
    opts = WRAPPERS.get(name)
    if opts is None:
        return False, None
    if name == "command" and any(a.text in ("-v", "-V") for a in args):
        return False, None  # a lookup: nothing runs beyond `command` itself
    starts = positions(args, opts)
    cands = [args[p:] for p in starts]
    if name == "xargs":
        # Words piped in become arguments: `echo train | xargs lab` runs `lab train`.
        s = stdin()
        extra = [Word(t) for t in (s.text or "").split()] if s.fed else []
        return True, candidates([c + extra for c in cands], cvd, ctx, no_stdin)
    if name == "systemd-run":
        cvd = systemd_env(args, cvd)
    reason = candidates(cands, cvd, ctx, stdin)
    if reason is None and name in ("sudo", "doas") and any(
            a.text in ("-s", "-i", "--shell", "--login") for a in args[:starts[0] if starts else len(args)]):
        reason = next((r for c in cands if c and (r := nested(join_words(c), ctx))), None)
    return True, reason


def run_env(args: list[Word], cvd: str | None, ctx: Ctx, stdin: StdinFn) -> str | None:
    i = 0
    while i < len(args):
        t = args[i].text
        if t in ("-i", "-", "--ignore-environment"):
            cvd = UNSET
            i += 1
        elif t in ("-u", "--unset"):
            if i + 1 < len(args) and args[i + 1].text == CVD:
                cvd = UNSET
            i += 2
        elif t.startswith("--unset=") or (t.startswith("-u") and not t.startswith("--")):
            if t.split("=", 1)[-1] == CVD or t[2:] == CVD:
                cvd = UNSET
            i += 1
        elif t in ("-C", "--chdir"):
            i += 2
        elif t in ("-S", "--split-string") or t.startswith(("--split-string=", "-S")):
            # -S 'a b c': one argument split into words, as a shebang line would be.
            attached = t.split("=", 1)[1] if t.startswith("--split-string=") else t[2:]
            text = attached or (args[i + 1].text if i + 1 < len(args) else "")
            tail = args[i + (1 if attached else 2):]
            try:
                split = [w for w in Lexer(text).tokens() if isinstance(w, Word)]
            except ParseError as e:
                return deny("parse", f"the guard cannot read `env -S {text}`: {e}")
            return walk(split + tail, cvd, ctx, stdin)
        elif t == "--":
            i += 1
            break
        elif t.startswith("-") and len(t) > 1:
            i += 1
        else:
            break
    return walk(args[i:], cvd, ctx, stdin)


def systemd_env(args: list[Word], cvd: str | None) -> str | None:
    for i, a in enumerate(args):
        t = a.text
        value = None
        if t in ("-E", "--setenv") and i + 1 < len(args):
            value = args[i + 1].text
        elif t.startswith("--setenv="):
            value = t[len("--setenv="):]
        elif t.startswith("-E") and len(t) > 2:
            value = t[2:]
        if value is not None and value.startswith(CVD + "="):
            cvd = value[len(CVD) + 1:]
    return cvd


def runner_body(name: str, args: list[Word]) -> list[Word] | None:
    """What follows `run` in `uv run ...` (all of `uvx ...`); None for `uv pip install`, `conda list`."""
    if name == "uvx":
        return args
    k = next((i for i, a in enumerate(args[:6]) if a.text == "run"), None)
    return None if k is None else args[k + 1:]


def run_runner(body: list[Word], cvd: str | None, ctx: Ctx, stdin: StdinFn) -> str | None:
    cands = []
    for p in positions(body, RUN_OPTS):
        if any(a.text in ("-m", "--module") for a in body[:p]):  # `uv run -m models.train`
            cands.append([Word("python"), Word("-m"), *body[p:]])
        else:
            cands.append(body[p:])
    return candidates(cands, cvd, ctx, stdin)


def run_script_runner(args: list[Word], cvd: str | None, ctx: Ctx, stdin: StdinFn) -> str | None:
    """`coverage run [-m] X`, `python -m cProfile [-m] X`: X runs as `python [-m] X` would."""
    cands = []
    for p in positions(args, SCRIPT_RUNNER_OPTS):
        module = any(a.text in ("-m", "--module") for a in args[:p])
        cands.append([Word("python"), *([Word("-m")] if module else []), *args[p:]])
    return candidates(cands, cvd, ctx, stdin)


# --- programs ------------------------------------------------------------------------------------


def program(name: str, prog: Word, args: list[Word], ctx: Ctx, stdin: StdinFn, hidden: bool) -> str | None:
    if name in SHELLS:
        return run_shell(name, args, ctx, stdin)
    if name == "eval":
        return nested(join_words(args), ctx) if args else None
    if name in ("source", "."):
        return shell_script(args[0], name, ctx, stdin) if args else None
    if name == "trap":
        first = next((a for a in args if a.text not in ("--",)), None)
        return nested(first, ctx) if first is not None and not first.text.startswith("-") else None
    if name == "alias":
        return next((r for a in args if "=" in a.text
                     and (r := check_text(a.text.split("=", 1)[1], ctx.deeper(a.text)))), None)
    if name in SETS_VARIABLES:
        return shell_variables(name, args, ctx)
    if name in ("at", "batch"):
        return run_at(name, args, ctx, stdin)
    if name == "find":
        return run_find(args, ctx)
    if name == "parallel":
        return run_parallel(args, ctx, stdin)
    if name in ("tmux", "screen"):
        return run_multiplexer(name, args, ctx)
    if name == "watch":
        return next((r for p in positions(args, WATCH_OPTS)
                     if (r := nested(join_words(args[p:]), ctx))), None)
    if name in ("su", "runuser", "script", "flock"):
        return run_command_option(name, args, ctx)
    is_lab, lab_args = lab_invocation(name, args)
    if is_lab:
        return check_lab(lab_args, ctx, cpu_only=hidden)
    if name in DISTRIBUTED:
        return deny("train", f"`{name}` launches training processes on the GPU")
    if name == "nvidia-smi":
        for a in args:
            if NVSMI_WRITE.match(a.text):
                return deny("gpu", f"`nvidia-smi {a.text}` changes the card's settings")
        return None
    if name == "make" and any(a.text == "bench" for a in args):
        return deny("bench", "`make bench` runs bench/memory.py and bench/train_speed.py, which use the card")
    if PY.match(name):
        return check_python(args, ctx, stdin)
    if name.endswith(".py"):
        return check_script(prog.text, args, ctx)
    if "/" in prog.text or name.endswith((".sh", ".bash")):
        return executable_file(prog.text, args, ctx)
    return None


WATCH_OPTS = Opts(_f("-b -c -C -d -e -f -g -p -r -t -w -x --beep --color --no-color --differences --chgexit "
                     "--errexit --precise --no-rerun --no-title --no-wrap --exec"),
                  _f("-n -q --interval --equexit"))


def run_shell(name: str, args: list[Word], ctx: Ctx, stdin: StdinFn) -> str | None:
    i, command_string, from_stdin = 0, False, False
    while i < len(args):
        t = args[i].text
        if t in ("--", "-"):
            i += 1
            break
        if t in ("-o", "+o", "-O", "+O", "--rcfile", "--init-file"):
            i += 2
            continue
        if t.startswith("--command="):  # fish
            return nested(Word(t.split("=", 1)[1], args[i].dynamic), ctx)
        if t == "--command":
            command_string = True
            i += 1
            continue
        if t.startswith("--"):
            i += 1
            continue
        if len(t) > 1 and t[0] in "-+":
            if t[0] == "-":
                command_string |= "c" in t
                from_stdin |= "s" in t
            i += 2 if t[-1] in "oO" else 1
            continue
        break
    rest = args[i:]
    if command_string:
        return nested(rest[0], ctx) if rest else None
    if rest and not from_stdin:
        return shell_script(rest[0], name, ctx, stdin)
    return stdin_commands(name, stdin(), ctx)


def shell_script(word: Word, prog: str, ctx: Ctx, stdin: StdinFn) -> str | None:
    """`bash FILE`, `source FILE`: the file's commands, when the guard can read them."""
    if word.procsub is not None:  # `bash <(curl ...)`: what the inner command prints
        return stdin_commands(prog, Stdin(output_of_text(word.procsub, ctx), True), ctx)
    if word.text in STDIN_PATHS:
        return stdin_commands(prog, stdin(), ctx)
    if word.dynamic or word.pattern:
        return unknown(f"the script `{word.text}`", [word], ctx)
    text = read_small(word.text, ctx.cwd)
    return check_file_text(text, ctx) if text is not None else None


def stdin_commands(prog: str, s: Stdin, ctx: Ctx) -> str | None:
    if not s.fed:
        return None
    if s.text is None:
        return deny("hidden", f"`{prog}` would run commands read from a pipe or file the guard cannot read")
    return check_file_text(s.text, ctx)


def executable_file(path: str, args: list[Word], ctx: Ctx) -> str | None:
    """`./run.sh`, `./experiment` with a shebang: judged by what the file holds."""
    text = read_small(path, ctx.cwd)
    if text is None:
        return None
    first = text.split("\n", 1)[0]
    if first.startswith("#!"):
        if "python" in first:
            return check_script(path, args, ctx)
        if re.search(r"\b(ba|z|da|k|mk)?sh\b", first):
            return check_file_text(text, ctx)
        return None
    return check_file_text(text, ctx) if path.endswith((".sh", ".bash")) else None


def shell_variables(name: str, args: list[Word], ctx: Ctx) -> str | None:
    """Builtins that set, export or remove a variable of this shell: CUDA_VISIBLE_DEVICES stays ""."""
    texts = [a.text for a in args]
    if name in DECLARES:
        removes = False
        for a in args:
            t = a.text
            if t[:1] in ("-", "+") and "=" not in t:
                removes |= (name == "export" and t[0] == "-" and "n" in t) or (t[0] == "+" and "x" in t)
                continue
            key, sep, value = t.partition("=")
            if a.dynamic and not ASSIGN.match(t) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t):
                if reason := unknown(f"the name in `{name} {t}`", args, ctx):
                    return reason
            if key.rstrip("+") == CVD and ((sep and (selects(value) or a.dynamic)) or (not sep and removes)):
                return deny("gpu", f"`{name} {t}` changes {CVD} for every later command of this shell")
        return None
    if name == "unset":
        if "-f" in texts:
            return None
        if CVD in texts:
            return deny("gpu", f"`unset {CVD}` makes every card visible to every later command of this shell")
        if any(a.dynamic for a in args):
            return unknown("the name `unset` removes", args, ctx)
        return None
    if name in ("for", "select"):
        if texts[:1] == [CVD]:
            return deny("gpu", f"`{name} {CVD} in ...` sets {CVD} for the commands of the loop and after")
        return None
    if name == "printf":
        sets = any(t == "-v" and texts[k + 1:k + 2] == [CVD] for k, t in enumerate(texts))
    elif name == "let":
        sets = any(CVD in t for t in texts)
    else:  # read, mapfile, readarray
        sets = CVD in texts
    if sets:
        return deny("gpu", f"`{name}` would set {CVD} for every later command of this shell")
    return None


def run_at(name: str, args: list[Word], ctx: Ctx, stdin: StdinFn) -> str | None:
    texts = [a.text for a in args]
    if any(t in ("-l", "-r", "-d", "-c") for t in texts):
        return None  # listing, removing or printing jobs
    if "-f" in texts and texts.index("-f") + 1 < len(texts):
        text = read_small(texts[texts.index("-f") + 1], ctx.cwd)
        return check_file_text(text, ctx) if text is not None else None
    return stdin_commands(name, stdin(), ctx)


def run_find(args: list[Word], ctx: Ctx) -> str | None:
    i = 0
    while i < len(args):
        if args[i].text in ("-exec", "-execdir", "-ok", "-okdir"):
            j = i + 1
            while j < len(args) and args[j].text not in (";", "+"):
                j += 1
            if args[i + 1:j] and (reason := walk(args[i + 1:j], None, ctx, no_stdin)):
                return reason
            i = j
        i += 1
    return None


PARALLEL_OPTS = Opts(_f("-0 -k -u -v -q -X -m -g --null --keep-order --ungroup --verbose --quote --dry-run "
                        "--tag --line-buffer --group --bar --eta --progress --pipe --no-notice"),
                     _f("-j --jobs -S --sshlogin -a --arg-file -d --delimiter -I -N -n -L -l --colsep -C "
                        "--joblog --results --tmpdir --timeout --delay --retries -E --env --workdir --wd "
                        "--tag-string -P --max-procs --halt --block --memfree --load --sshloginfile"))
PARALLEL_SEPARATORS = frozenset({":::", "::::", ":::+", "::::+"})


def run_parallel(args: list[Word], ctx: Ctx, stdin: StdinFn) -> str | None:
    cut = next((i for i, a in enumerate(args) if a.text in PARALLEL_SEPARATORS), len(args))
    head = args[:cut]
    starts = positions(head, PARALLEL_OPTS)
    if starts:  # the command template runs through a shell
        return next((r for p in starts if (r := nested(join_words(head[p:]), ctx))), None)
    # No command: the arguments (or the lines of stdin / of :::: files) are the commands.
    mode = None
    for a in args[cut:]:
        if a.text in PARALLEL_SEPARATORS:
            mode = a.text
            continue
        if mode and mode.startswith("::::"):
            text = read_small(a.text, ctx.cwd)
            reason = check_file_text(text, ctx) if text is not None else None
        else:
            reason = check_text(a.text, ctx.deeper(a.text))
        if reason:
            return reason
    return stdin_commands("parallel", stdin(), ctx) if cut == len(args) else None


TMUX_SPAWN = _f("new new-session new-window neww split-window splitw respawn-pane respawnp respawn-window "
                "respawnw run-shell run display-popup popup if-shell if pipe-pane pipep")
TMUX_OPTS = Opts(_f("-A -D -E -P -X -a -b -k -h -v -Z -I -C -B -o"),
                 _f("-c -e -F -n -s -t -x -y -f -l -L -S -T -w -H -R"))
SCREEN_OPTS = Opts(_f("-d -m -D -R -r -x -A -a -f -i -l -O -q -U -L -4 -6 -wipe -ls -list -v"),
                   _f("-S -c -e -h -p -s -t -T -X -Logfile"))


def run_multiplexer(name: str, args: list[Word], ctx: Ctx) -> str | None:
    """tmux and screen run text in a shell (new-session 'cmd', send-keys, -X stuff): every argument
    that could be such text is judged as a command, escapes decoded as screen does."""
    for a in args:
        if a.text.startswith("-"):
            continue
        for text in {a.text, decode_escapes(a.text)}:
            if reason := check_text(text, ctx.deeper(text), lenient=True):
                return reason
    texts = [a.text for a in args]
    if name == "tmux" and CVD in texts and ({"set-environment", "setenv"} & set(texts)):
        k = texts.index(CVD)
        value = texts[k + 1] if k + 1 < len(texts) else None
        if "-u" in texts or "-r" in texts or value is None or selects(value):
            return deny("gpu", f"`tmux setenv {CVD}` hands a card to the commands tmux starts")
    bodies = [args[s + 1:] for s, a in enumerate(args) if a.text in TMUX_SPAWN] if name == "tmux" else [args]
    for body in bodies:
        for p in positions(body, TMUX_OPTS if name == "tmux" else SCREEN_OPTS):
            cmd = body[p:]
            cmd = cmd[:next((i for i, a in enumerate(cmd) if a.text == ";"), len(cmd))]  # tmux's \;
            if len(cmd) > 1 and (reason := walk(cmd, None, ctx, no_stdin)):
                return reason
    return None


FLOCK_OPTS = Opts(_f("-s -x -u -n -o -F --shared --exclusive --unlock --nonblock --close --no-fork "
                     "--verbose"), _f("-w -E --timeout --conflict-exit-code"), 1)


def run_command_option(name: str, args: list[Word], ctx: Ctx) -> str | None:
    """su/runuser/script/flock -c TEXT; flock FILE CMD... otherwise."""
    for i, a in enumerate(args):
        t = a.text
        if t == "--command" and i + 1 < len(args):
            return nested(args[i + 1], ctx)
        if t.startswith("--command="):
            return nested(Word(t.split("=", 1)[1], a.dynamic), ctx)
        if t.startswith("-") and not t.startswith("--") and "c" in t[1:]:  # -c, -qc, -lc 'cmd'
            attached = t[t.index("c", 1) + 1:]
            if attached:
                return nested(Word(attached, a.dynamic), ctx)
            return nested(args[i + 1], ctx) if i + 1 < len(args) else None
    if name == "flock":
        return candidates([args[p:] for p in positions(args, FLOCK_OPTS)], None, ctx, no_stdin)
    return None


# --- what goes into a command's stdin -------------------------------------------------------------


def read_small(name: str, cwd: str) -> str | None:
    path = Path(os.path.expanduser(name))
    path = path if path.is_absolute() else Path(cwd) / path
    try:
        if path.is_file() and path.stat().st_size <= MAX_FILE_BYTES:
            return path.read_text(errors="replace")
    except OSError:
        pass
    return None


def read_input(name: str, cwd: str) -> str | None:
    """A file redirected into a command: "" when there is none (bash runs nothing then)."""
    path = Path(os.path.expanduser(name))
    path = path if path.is_absolute() else Path(cwd) / path
    if name == "/dev/null" or not path.exists():
        return ""
    return read_small(name, cwd)


def stdin_of(pipe: list[Command], k: int, ctx: Ctx) -> Stdin:
    for r in reversed(pipe[k].redirs):
        if r.op in ("<<", "<<-"):
            return Stdin(r.body or "", True)
        if r.op == "<<<":
            return Stdin((r.target.text if r.target else "") + "\n", True)
        if r.op == "<":
            t = r.target
            if t is None or (t.dynamic and t.procsub is None):
                return Stdin(None, True)
            if t.procsub is not None:
                return Stdin(output_of_text(t.procsub, ctx), True)
            return Stdin(read_input(t.text, ctx.cwd), True)
        if r.op in ("<&", "<>"):
            return Stdin(None, True)
    if k > 0:
        return Stdin(output_of(pipe, k - 1, ctx), True)
    return NO_STDIN


PASS_THROUGH = frozenset({"cat", "tac", "tee", "head", "tail", "sort", "uniq", "grep", "egrep", "fgrep"})


def output_of(pipe: list[Command], k: int, ctx: Ctx) -> str | None:
    """What pipe[k] prints, when the guard can tell (echo, printf, cat FILE, filters of those); None
    when it cannot. A filter's output is taken as all of its input: a superset is the safe side."""
    words = [w for w in command_words(pipe[k].words) if not ASSIGN.match(w.text)]
    if not words:
        return None
    name, args = os.path.basename(words[0].text), words[1:]
    if name == "echo":
        i = 0
        while i < len(args) and re.fullmatch(r"-[neE]+", args[i].text):
            i += 1
        return decode_escapes(" ".join(a.text for a in args[i:])) + "\n"
    if name == "printf":
        if args[:1] and args[0].text == "-v":
            return ""
        return decode_escapes(" ".join(a.text for a in args)) + "\n"
    if name not in PASS_THROUGH:
        return None
    operands = [a for a in args if not a.text.startswith("-") or a.text == "-"]
    if name in ("grep", "egrep", "fgrep") and not any(a.text.startswith(("-e", "-f")) for a in args):
        operands = operands[1:]  # the pattern
    files = [] if name == "tee" else [t for a in operands if a.text != "-"
                                      and (t := read_small(a.text, ctx.cwd)) is not None]
    if files and not any(a.text == "-" for a in operands):
        return "".join(files)
    s = stdin_of(pipe, k, ctx)
    return None if s.text is None else "".join(files) + s.text


def output_of_text(text: str, ctx: Ctx) -> str | None:
    try:
        pipes = pipelines(Lexer(text).tokens())
    except ParseError:
        return None
    return output_of(pipes[-1], len(pipes[-1]) - 1, ctx) if pipes else ""


# --- lab and Python ---------------------------------------------------------------------------------


def lab_invocation(name: str, args: list[Word]) -> tuple[bool, list[Word]]:
    """Is this the `lab` CLI (`lab`, `.venv/bin/lab`, `python -m cli`, `python cli.py`)? Its arguments."""
    if name in ("lab", "cli.py"):
        return True, args
    if PY.match(name):
        kind, target, rest = python_target(args)
        if target is not None and ((kind == "m" and target.text == "cli")
                                   or (kind == "script" and os.path.basename(target.text) == "cli.py")):
            return True, rest
    return False, []


def _names_cuda(args: list[Word]) -> bool:
    """`--device cuda`, `--device=cuda:0`, `--set device=cuda`: an argument that picks the card."""
    for i, a in enumerate(args):
        if re.search(r"(^|[-.])device=cuda", a.text):
            return True
        if a.text in ("--device", "-d") and i + 1 < len(args) and args[i + 1].text.startswith("cuda"):
            return True
    return False


def _last_option(args: list[Word], name: str) -> str | None:
    """The value click uses: the last `--name X` or `--name=X`."""
    value = None
    for i, a in enumerate(args):
        if a.text == name and i + 1 < len(args):
            value = args[i + 1].text
        elif a.text.startswith(name + "="):
            value = a.text.split("=", 1)[1]
    return value


def check_lab(args: list[Word], ctx: Ctx, cpu_only: bool = False) -> str | None:
    sub_word = next((a for a in args if not a.text.startswith("-")), None)
    if sub_word is None:
        return None
    if sub_word.dynamic or sub_word.pattern:
        return unknown(f"the lab command `{sub_word.text}`", args, ctx)
    sub = sub_word.text
    if sub in ("train", "eval", "ablate"):
        return deny(sub, f"`lab {sub}` runs in the foreground, outside the queue")
    if sub == "smoke":
        preset = _last_option(args, "--preset")
        if preset not in (None, "tiny"):
            return deny("smoke", f"`lab smoke --preset {preset}` is more than a smoke test")
        if _last_option(args, "--device") != "cpu" and not cpu_only:
            return deny("smoke", "`lab smoke` without `--device cpu` (the last --device counts) takes the "
                                 "card when there is one (its default is auto)")
        if any(re.match(r"^([\w.]+\.)?device=cuda", a.text) for a in args):
            return deny("smoke", "`lab smoke --set device=cuda` runs on the card outside the queue")
        return None
    if sub == "submit":
        if any(a.text == "--force" or a.text.startswith("--force=") for a in args):
            return deny("force", "`lab submit --force` skips the earned-run gate, which is the person's call")
        return None
    if sub == "daemon":
        return None
    if _names_cuda(args):
        return deny("gpu", f"`lab {sub}` with a CUDA device runs on the card outside the queue")
    return None


def python_target(args: list[Word]) -> tuple[str, Word | None, list[Word]]:
    """What the interpreter runs: ("c", code), ("m", module), ("script", path) or ("stdin", None),
    with the arguments after it. Reads option clusters as CPython does (-uc CODE, -mmod, -W x)."""
    i = 0
    while i < len(args):
        t = args[i].text
        if t == "-":
            return "stdin", None, args[i + 1:]
        if t == "--":
            i += 1
            break
        if t.startswith("--"):
            i += 2 if t == "--check-hash-based-pycs" else 1
            continue
        if t.startswith("-") and len(t) > 1:
            step = 1
            for j in range(1, len(t)):
                if t[j] in "cm":
                    if j + 1 < len(t):
                        return t[j], Word(t[j + 1:], args[i].dynamic), args[i + 1:]
                    return t[j], (args[i + 1] if i + 1 < len(args) else None), args[i + 2:]
                if t[j] in "XW":
                    step = 1 if j + 1 < len(t) else 2
                    break
            i += step
            continue
        break
    if i >= len(args):
        return "stdin", None, []
    return "script", args[i], args[i + 1:]


def code_rules(code: str, what: str) -> str | None:
    if CUDA_CODE.search(code):
        return deny("gpu", f"{what} names CUDA, which initialises the card outside the queue")
    if LAB_CODE.search(code):
        return deny("train", f"{what} calls the trainer or the harness, which trains outside the queue")
    return None


def check_python(args: list[Word], ctx: Ctx, stdin: StdinFn) -> str | None:
    kind, target, rest = python_target(args)
    if kind == "c":
        if target is None:
            return None
        code = target.text
        if target.sub is not None:  # python -c "$(cat x.py)"
            code = output_of_text(target.sub, ctx) or code
        reason = code_rules(code, "inline Python")
        if reason is None and target.dynamic:
            reason = code_rules(ctx.root, "inline Python built from shell variables, on a command line that")
        return reason
    if kind == "m":
        if target is None:
            return None
        if target.dynamic or target.pattern:
            return unknown(f"the module `{target.text}`", args, ctx)
        return check_module(target.text, rest, ctx, stdin)
    if kind == "stdin" or (target is not None and target.text in STDIN_PATHS):
        s = stdin()
        if not s.fed:
            return None
        return code_rules(s.text if s.text is not None else ctx.root, "Python code fed on stdin")
    assert target is not None
    if target.procsub is not None:
        code = output_of_text(target.procsub, ctx)
        return code_rules(code if code is not None else ctx.root, "Python code from a process substitution")
    if target.dynamic or target.pattern:
        return unknown(f"the script `{target.text}`", args, ctx)
    return check_script(target.text, rest, ctx)


def check_module(mod: str, rest: list[Word], ctx: Ctx, stdin: StdinFn) -> str | None:
    top = mod.split(".")[0]
    if mod.startswith("torch.distributed") or top in DISTRIBUTED:
        return deny("train", f"`python -m {mod}` launches training processes")
    if TRAIN_MODULES.match(mod):
        what = "ablate" if "ablate" in mod or "train_task" in mod else "train"
        return deny(what, f"`python -m {mod}` trains (or runs a job) outside the queue")
    if top in SCRIPT_RUNNER_MODULES:
        body = rest[1:] if top == "coverage" and rest[:1] and rest[0].text == "run" else rest
        return run_script_runner(body, None, ctx, stdin)
    path = mod.replace(".", "/")
    return check_script(path + ".py", rest, ctx, package_main=path + "/__main__.py")


def check_script(script: str, rest: list[Word], ctx: Ctx, package_main: str | None = None) -> str | None:
    norm = os.path.normpath(script).lstrip("./")
    base = os.path.basename(script)
    path = Path(os.path.expanduser(script))
    path = (path if path.is_absolute() else Path(ctx.cwd) / path).resolve()
    if any(norm.endswith(g) for g in GPU_SCRIPTS):
        return deny("bench", f"`{script}` builds rtx2060-sized models on the card")
    if (base in TRAIN_SCRIPTS or re.match(r"^(jobs|workers)/", norm)
            or path.is_relative_to(ROOT / "jobs") or path.is_relative_to(ROOT / "workers")):
        return deny("train", f"`python {script}` trains (or runs a job) outside the queue")
    if _names_cuda(rest):
        return deny("gpu", f"`python {script}` with a CUDA device runs on the card outside the queue")
    if path in CPU_SCRIPTS:
        return None
    text = read_small(script, ctx.cwd)
    if text is None and package_main is not None:
        text = read_small(package_main, ctx.cwd)
    return code_rules(text, f"`{script}`") if text is not None else None


def main() -> int:
    try:
        payload = json.loads(sys.stdin.read())
        tool = payload.get("tool_name")
        command = (payload.get("tool_input") or {}).get("command", "") if tool == "Bash" else ""
        if not isinstance(command, str):
            raise ValueError("tool_input.command is not a string")
        cwd = payload.get("cwd")
    except (ValueError, AttributeError) as e:
        print(f"guard/claude_hook.py: cannot read the PreToolUse payload ({e}); refusing the call",
              file=sys.stderr)
        return 2
    try:
        reason = check(command, cwd if isinstance(cwd, str) else None) if command else None
    except Exception as e:  # noqa: BLE001 -- a bug in the guard must block the call, not wave it through
        print(f"guard/claude_hook.py: the guard failed on this command ({type(e).__name__}: {e}); refusing "
              "the call", file=sys.stderr)
        return 2
    if reason:
        print(json.dumps({"hookSpecificOutput": {"hookEventName": "PreToolUse", "permissionDecision": "deny",
                                                 "permissionDecisionReason": reason}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
