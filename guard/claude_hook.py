#!/usr/bin/env python3
"""Claude Code PreToolUse hook: shell commands may not train or touch the GPU outside the queue.

The card belongs to the queue's GPU lane, which runs one job at a time; a training run or a
CUDA process started beside it breaks that promise (and the 6 GB card). So:

BLOCKED (with the command to run instead):
  - training, evaluation and ablations in the foreground: `lab train`, `lab eval`, `lab ablate`,
    `python -m models.train`, `python models/train.py`, any `train.py` / `ablate.py` /
    `train_task.py` script, `python -m harness.ablate`, `python -m jobs.X`, `python -m workers...`;
  - distributed launchers: `torchrun`, `accelerate`, `deepspeed`, `python -m torch.distributed...`;
  - any Python that names CUDA: `python -c "...torch.cuda..."`, code piped or here-doc'ed into
    Python that mentions cuda, `--device cuda`, `device=cuda`;
  - choosing a card for a process: `CUDA_VISIBLE_DEVICES=0 cmd`, `export CUDA_VISIBLE_DEVICES=0`
    (only `lab daemon` may be started that way: it is the queue);
  - `bench/memory.py` and `make bench` (they allocate the card);
  - `nvidia-smi` with anything but read-only options (no reset, clocks, power, modes).
ALLOWED: everything else, in particular `lab submit/status/show/wait/logs/cancel/retry`, `lab
  runs/finding/register/registry/archive/restore`, `lab daemon`, `make test`, `make demo`,
  `make lint`, `pytest`, read-only `nvidia-smi`, and `lab smoke --device cpu` on the `tiny`
  preset (the default preset) — a smoke test is seconds of CPU on a model under 1M parameters,
  the check the agent runs before it queues anything. `lab smoke` without `--device cpu` (its
  default device is auto: the card when there is one), or on a bigger preset, is blocked: queue it.

Protocol (Claude Code hooks, PreToolUse): the payload arrives as JSON on stdin with `tool_name`
and `tool_input.command`. To block, the hook prints
  {"hookSpecificOutput": {"hookEventName": "PreToolUse", "permissionDecision": "deny",
                          "permissionDecisionReason": "..."}}
on stdout and exits 0; the reason is shown to the agent. To allow, it prints nothing and exits
0 (the normal permission rules still apply). A payload it cannot read is refused with exit code
2 and the reason on stderr (Claude Code blocks the call on exit 2): a broken guard fails closed.

Uses only the standard library, so any `python3` runs it. The rule is a filter on the command
text, not a sandbox: it stops the honest mistake, and CLAUDE.md states the rule in words.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys

SEPARATORS = set(";&|()\n")
WRAPPERS = {"env", "nohup", "nice", "ionice", "time", "timeout", "sudo", "setsid", "exec", "command",
            "builtin", "stdbuf", "taskset", "chrt", "xargs", "watch", "caffeinate"}
# Wrapper options that take a value (so the value is not mistaken for the program).
WRAPPER_VALUE_OPTS = {"-n", "-c", "-p", "-u", "-g", "-s", "-k", "-o", "-e", "-i", "--signal", "--kill-after"}
RUNNERS = {("uv", "run"), ("poetry", "run"), ("pipenv", "run"), ("conda", "run"), ("pdm", "run")}
PY = re.compile(r"^python(\d+(\.\d+)?)?$")
ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")

TRAIN_MODULES = re.compile(r"^(models\.train|harness\.(ablate|train_task)|jobs(\..+)?|workers(\..+)?)$")
TRAIN_SCRIPTS = {"train.py", "ablate.py", "train_task.py"}
GPU_SCRIPTS = {"bench/memory.py"}
DISTRIBUTED = {"torchrun", "accelerate", "deepspeed"}
CUDA_CODE = re.compile(r"cuda|nvml|\bCUDA_VISIBLE_DEVICES\b", re.IGNORECASE)
LAB_CODE = re.compile(r"models\.train|from models import train|harness\.(ablate|train_task)|\bjobs\.(train|"
                      r"ablation|eval|smoke)\b")
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
    "bench": ("bench/memory.py and `make bench` allocate the card: ask the person to run them while the "
              "daemon is stopped, or queue the check as a GPU-lane job"),
}


def deny_reason(what: str, why: str) -> str:
    return (f"Blocked by the lab's guard (guard/claude_hook.py): {why}. Training and GPU work go through "
            f"the queue, never a shell. Instead, {INSTEAD[what]}. See CLAUDE.md.")


def tokens(command: str) -> list[str]:
    # Backticks open a command of their own: make them separators before splitting.
    lexer = shlex.shlex(command.replace("`", " ; "), posix=True, punctuation_chars=";&|()<>\n")
    lexer.whitespace = " \t\r"
    lexer.whitespace_split = True
    return list(lexer)


def simple_commands(toks: list[str]) -> list[list[str]]:
    """Split a token stream at ; & | ( ) and newlines; drop the redirections (`>`, `2>&1`,
    `< file`, `<<EOF`) and their targets."""
    out: list[list[str]] = [[]]
    skip_next = False
    for t in toks:
        if skip_next:
            skip_next = False
        elif t and set(t) <= SEPARATORS:
            out.append([])
        elif t and set(t) <= set("<>&") and ("<" in t or ">" in t):
            skip_next = True  # the target file, or the here-doc delimiter
        elif t != "$":  # `$(cmd)`: the `(` after it is a separator
            out[-1].append(t)
    return [c for c in out if c]


def strip_prefix(cmd: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading VAR=value assignments and wrappers (env, nohup, timeout 5, uv run, ...) -> (env, rest)."""
    env: dict[str, str] = {}
    i = 0
    while i < len(cmd):
        t = cmd[i]
        if ASSIGN.match(t):
            k, _, v = t.partition("=")
            env[k] = v
            i += 1
        elif os.path.basename(t) in WRAPPERS:
            name = os.path.basename(t)
            i += 1
            while i < len(cmd) and cmd[i].startswith("-"):
                i += 2 if cmd[i] in WRAPPER_VALUE_OPTS else 1
            if name in ("timeout", "taskset", "chrt") and i < len(cmd) and not ASSIGN.match(cmd[i]):
                i += 1  # the duration / mask / priority
        elif i + 1 < len(cmd) and (os.path.basename(t), cmd[i + 1]) in RUNNERS:
            i += 2
            while i < len(cmd) and cmd[i].startswith("-"):
                i += 1
        else:
            break
    return env, cmd[i:]


def gpu_selected(value: str) -> bool:
    return value.strip() not in ("", "-1", "none", "NoDevFiles")


def check(command: str, depth: int = 0) -> str | None:
    """The reason to block `command`, or None to allow it."""
    try:
        toks = tokens(command)
    except ValueError:
        # Unbalanced quotes: bash would reject it too, but judge the raw text conservatively.
        toks = command.split()
    for cmd in simple_commands(toks):
        reason = check_simple(cmd, command, depth)
        if reason:
            return reason
    return None


def check_simple(cmd: list[str], whole: str, depth: int) -> str | None:
    env, rest = strip_prefix(cmd)
    if not rest:
        return None
    prog = os.path.basename(rest[0])
    args = rest[1:]
    if prog in ("bash", "sh", "zsh", "dash") and "-c" in args and depth < 5:
        i = args.index("-c")
        return check(args[i + 1], depth + 1) if i + 1 < len(args) else None
    if prog == "eval" and depth < 5:
        return check(" ".join(args), depth + 1)
    if prog == "export":
        for a in args:
            k, sep, v = a.partition("=")
            if sep and k == "CUDA_VISIBLE_DEVICES" and gpu_selected(v):
                return deny_reason("gpu", f"`export CUDA_VISIBLE_DEVICES={v}` hands a card to every later "
                                          "command of this shell")
        return None
    is_lab, lab_args = lab_invocation(prog, args)
    if gpu_selected(env.get("CUDA_VISIBLE_DEVICES", "")) and "CUDA_VISIBLE_DEVICES" in env:
        if not (is_lab and lab_args[:1] == ["daemon"]):
            value = env["CUDA_VISIBLE_DEVICES"]
            return deny_reason("gpu", f"`CUDA_VISIBLE_DEVICES={value}` selects a card for a process outside "
                                      "the queue (only `lab daemon` may be started that way)")
    if is_lab:
        hidden = "CUDA_VISIBLE_DEVICES" in env and not gpu_selected(env["CUDA_VISIBLE_DEVICES"])
        return check_lab(lab_args, cpu_only=hidden)
    if prog in DISTRIBUTED:
        return deny_reason("train", f"`{prog}` launches training processes on the GPU")
    if prog == "nvidia-smi":
        for a in args:
            if NVSMI_WRITE.match(a):
                return deny_reason("gpu", f"`nvidia-smi {a}` changes the card's settings")
        return None
    if prog == "make" and "bench" in args:
        return deny_reason("bench", "`make bench` runs bench/memory.py, which allocates the card")
    if PY.match(prog):
        return check_python(args, whole)
    return None


def lab_invocation(prog: str, args: list[str]) -> tuple[bool, list[str]]:
    """Is this the `lab` CLI (`lab`, `.venv/bin/lab`, `python -m cli`, `python cli.py`)? Its arguments."""
    if prog == "lab":
        return True, args
    if PY.match(prog):
        rest = _skip_python_opts(args)
        if rest[:2] == ["-m", "cli"]:
            return True, rest[2:]
        if rest and os.path.basename(rest[0]) == "cli.py":
            return True, rest[1:]
    return False, []


def _skip_python_opts(args: list[str]) -> list[str]:
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] not in ("-m", "-c", "-"):
        i += 2 if args[i] in ("-X", "-W") else 1
    return args[i:]


def _names_cuda(args: list[str]) -> bool:
    """`--device cuda`, `--device=cuda:0`, `--set device=cuda`: an argument that picks the card."""
    for i, a in enumerate(args):
        if re.search(r"(^|[-.])device=cuda", a):
            return True
        if a in ("--device", "-d") and i + 1 < len(args) and args[i + 1].startswith("cuda"):
            return True
    return False


def check_lab(args: list[str], cpu_only: bool = False) -> str | None:
    sub = next((a for a in args if not a.startswith("-")), None)
    if sub in ("train", "eval", "ablate"):
        return deny_reason(sub, f"`lab {sub}` runs in the foreground, outside the queue")
    if sub == "smoke":
        preset = _option(args, "--preset")
        if preset not in (None, "tiny"):
            return deny_reason("smoke", f"`lab smoke --preset {preset}` is more than a smoke test")
        if _option(args, "--device") != "cpu" and not cpu_only:
            return deny_reason("smoke", "`lab smoke` without `--device cpu` takes the card when there is one "
                                        "(its default is auto)")
        return None
    if sub in ("submit", "daemon") or sub is None:
        return None
    if _names_cuda(args):
        return deny_reason("gpu", f"`lab {sub}` with a CUDA device runs on the card outside the queue")
    return None


def _option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def check_python(args: list[str], whole: str) -> str | None:
    rest = _skip_python_opts(args)
    if rest[:1] == ["-c"] and len(rest) > 1:
        code = rest[1]
        if CUDA_CODE.search(code):
            return deny_reason("gpu", "inline Python that names CUDA initialises the card outside the queue")
        if LAB_CODE.search(code):
            return deny_reason("train", "inline Python that calls the trainer or the harness trains "
                                        "outside the queue")
        return None
    if rest[:1] == ["-m"] and len(rest) > 1:
        mod = rest[1]
        if mod.startswith("torch.distributed"):
            return deny_reason("train", f"`python -m {mod}` launches training processes")
        if TRAIN_MODULES.match(mod):
            what = "ablate" if "ablate" in mod or "train_task" in mod else "train"
            return deny_reason(what, f"`python -m {mod}` trains (or runs a job) outside the queue")
        if _names_cuda(rest[2:]):
            return deny_reason("gpu", f"`python -m {mod}` with a CUDA device runs on the card outside "
                                      "the queue")
        return None
    if not rest or rest[0] == "-":
        # Code from a here-doc, a file or a pipe: judge the whole command text.
        if CUDA_CODE.search(whole):
            return deny_reason("gpu", "Python code that names CUDA initialises the card outside the queue")
        if LAB_CODE.search(whole):
            return deny_reason("train", "Python code that calls the trainer or the harness trains outside "
                                        "the queue")
        return None
    script = rest[0]
    norm = os.path.normpath(script).lstrip("./")
    base = os.path.basename(script)
    if any(norm.endswith(g) for g in GPU_SCRIPTS):
        return deny_reason("bench", f"`{script}` allocates the card")
    if base in TRAIN_SCRIPTS or re.match(r"^(jobs|workers)/", norm):
        return deny_reason("train", f"`python {script}` trains (or runs a job) outside the queue")
    if _names_cuda(rest[1:]):
        return deny_reason("gpu", f"`python {script}` with a CUDA device runs on the card outside the queue")
    return None


def main() -> int:
    try:
        payload = json.loads(sys.stdin.read())
        tool = payload.get("tool_name")
        command = (payload.get("tool_input") or {}).get("command", "") if tool == "Bash" else ""
        if not isinstance(command, str):
            raise ValueError("tool_input.command is not a string")
    except (ValueError, AttributeError) as e:
        print(f"guard/claude_hook.py: cannot read the PreToolUse payload ({e}); refusing the call",
              file=sys.stderr)
        return 2
    reason = check(command) if command else None
    if reason:
        print(json.dumps({"hookSpecificOutput": {"hookEventName": "PreToolUse", "permissionDecision": "deny",
                                                 "permissionDecisionReason": reason}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
