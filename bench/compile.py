"""Start-up cost of ``rlspec compile`` against a bare import of its libraries.

Run: ``.venv/bin/python bench/compile.py`` (``--reps N``, ``--warmup N``, ``--no-breakdown``).

Every measurement is a fresh Python process, as a user's ``rlspec compile`` is. The
reference ("baseline") is ``python -c "import pydantic, yaml, jinja2, networkx"``; the
subject is the real CLI, ``rlspec compile examples/compassmax-245b.yaml -o <tmp> --force``
(the console script next to this interpreter, else ``python -m compiler.cli``). All
commands run interleaved, in an order that rotates every repetition, so that drifts of a
shared machine hit all alike; the result is the ratio of the medians (and, as a check, the
median of the per-repetition ratios). Goal: CLI / baseline ≤ 2×. Absolute times are
printed only as context.

The breakdown (same interleaved loop) runs cumulative steps between the two: baseline +
``from pydantic import BaseModel`` (``import pydantic`` alone is lazy and does not load
the model machinery a spec needs), + ``import typer, rich.console`` (the CLI framework),
``import compiler.cli, compiler.api`` (every module the compile command loads), then the
CLI. One more process times the compile's stages in-process. Then what-ifs, none of which
changes the project: both commands with Python's bytecode cache on (this machine sets
PYTHONDONTWRITEBYTECODE and the checkout has no ``__pycache__``, so a plain run recompiles
rlspec's modules every time), the CLI with a jinja2 bytecode cache patched into
``compiler.render.environment``, and the same compile through ``compiler.api`` without
typer or rich. Last, one ``-X importtime`` run lists the modules the CLI imports beyond the
baseline, and one in-process run of the CLI checks that torch (and numpy, transformers,
submitit, safetensors) stay out of ``sys.modules`` -- the exit status is 1 if not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = "examples/compassmax-245b.yaml"
GOAL = 2.0
BASELINE_IMPORTS = "import pydantic, yaml, jinja2, networkx"
#: must not be imported by the compile path (the compiler never needs torch & co.)
FORBIDDEN = ("torch", "numpy", "transformers", "submitit", "safetensors")
#: imported by the CLI itself (compiler/cli.py); reported, not forbidden
CLI_FRAMEWORK = ("typer", "rich")

# In-process stage timings of one compile, printed as JSON on the last line.
_STAGES = """
import json, sys, time
from pathlib import Path
t = [time.perf_counter()]
from compiler.api import compile_spec, validate
from compiler.bundle import write_bundle
from compiler.render import environment
t.append(time.perf_counter())
validate(sys.argv[1])
t.append(time.perf_counter())
env = environment()
for name in env.list_templates():
    env.get_template(name)
t.append(time.perf_counter())
c = compile_spec(sys.argv[1])
t.append(time.perf_counter())
write_bundle(c.files, Path(sys.argv[2]), force=True)
t.append(time.perf_counter())
names = ["import compiler.api (+ bundle, render)", "validate (1st call)",
         "compile the jinja templates", "compile_spec (validate again + render)", "write_bundle"]
print(json.dumps(dict(zip(names, [b - a for a, b in zip(t, t[1:])]))))
"""

# What-ifs: argv = mode ("cli" | "api"), jinja bytecode-cache dir ("-" for none), spec, out.
_WHATIF = """
import functools, sys
from pathlib import Path
mode, cache_dir, spec, out = sys.argv[1:5]
if cache_dir != "-":
    import jinja2
    import compiler.render as render
    plain = getattr(render.environment, "__wrapped__", render.environment)
    @functools.cache
    def environment():
        env = plain()
        env.bytecode_cache = jinja2.FileSystemBytecodeCache(cache_dir)
        return env
    render.environment = environment
if mode == "cli":
    from compiler.cli import main
    sys.argv = ["rlspec", "compile", spec, "-o", out, "--force"]
    main()
else:
    from compiler.api import compile_spec
    from compiler.bundle import write_bundle
    c = compile_spec(spec)
    write_bundle(c.files, Path(out), force=True)
    jobs = c.graph.order()
    print(f"wrote {out}: {len(jobs)} jobs ({' -> '.join(jobs)}), {len(c.files)} files")
"""

# The CLI run in-process, then which modules it left in sys.modules.
_MODULES = """
import json, runpy, sys
sys.argv = ["rlspec", "compile", sys.argv[1], "-o", sys.argv[2], "--force"]
code = 0
try:
    runpy.run_module("compiler.cli", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code or 0
names = %r
print(json.dumps({"exit": code, **{n: n in sys.modules for n in names}}))
"""


def _cli_args(out: Path) -> list[str]:
    return ["compile", SPEC, "-o", str(out), "--force"]


def _cli_command(out: Path) -> tuple[list[str], str]:
    """The console script next to this interpreter (as a user runs it), else ``-m``."""
    script = Path(sys.executable).with_name("rlspec")
    if script.exists():
        shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
        return [str(script), *_cli_args(out)], str(shown)
    return [sys.executable, "-m", "compiler.cli", *_cli_args(out)], "python -m compiler.cli"


def _run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-2000:]}")
    return dt, p.stdout


def _import_times(cmd: list[str]) -> dict[str, int]:
    """Self import time (µs) of every module a ``-X importtime`` run of ``cmd`` loads."""
    p = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], cwd=ROOT, capture_output=True,
                       text=True, check=True)
    out: dict[str, int] = {}
    for line in p.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            out[m[2]] = out.get(m[2], 0) + int(m[1])
    return out


def _ratio(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float]:
    """(ratio of the medians, median of the per-repetition ratios)."""
    pair = [a / b for a, b in zip(times[num], times[den], strict=True)]
    return (statistics.median(times[num]) / statistics.median(times[den]),
            statistics.median(pair))


def measure_compile(reps: int = 15, warmup: int = 2, breakdown: bool = True) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="rlspec-bench-"))
    try:
        return _measure(tmp, reps, warmup, breakdown)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(tmp: Path, reps: int, warmup: int, breakdown: bool) -> dict:
    py = sys.executable
    load_before = os.getloadavg()[0]
    cli, cli_name = _cli_command(tmp / "bundle")
    pyc = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    pyc["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    jbc = tmp / "jinja-cache"
    jbc.mkdir()

    def whatif(mode: str, cache: bool, out: str) -> list[str]:
        return [py, "-c", _WHATIF, mode, str(jbc) if cache else "-", SPEC, str(tmp / out)]

    variants: dict[str, tuple[list[str], dict[str, str] | None]] = {
        "baseline": ([py, "-c", BASELINE_IMPORTS], None),
        "cli": (cli, None),
    }
    if breakdown:
        variants |= {
            "+BaseModel": ([py, "-c", BASELINE_IMPORTS + "; from pydantic import BaseModel"], None),
            "+typer,rich": ([py, "-c", BASELINE_IMPORTS + "; from pydantic import BaseModel; "
                             "import typer, rich.console"], None),
            "import cli": ([py, "-c", "import compiler.cli, compiler.api"], None),
            "stages": ([py, "-c", _STAGES, SPEC, str(tmp / "stages")], None),
            "baseline, pyc": ([py, "-c", BASELINE_IMPORTS], pyc),
            "cli, pyc": (cli, pyc),
            "cli+jinja cache": (whatif("cli", True, "w1"), None),
            "api": (whatif("api", False, "w2"), None),
            "api+jinja cache": (whatif("api", True, "w3"), None),
            "api+jinja cache, pyc": (whatif("api", True, "w4"), pyc),
        }
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            _run(*variants[name])
    times: dict[str, list[float]] = {n: [] for n in names}
    stages: dict[str, list[float]] = {}
    for i in range(reps):
        for name in names[i % len(names):] + names[: i % len(names)]:
            dt, stdout = _run(*variants[name])
            times[name].append(dt)
            if name == "stages":
                for k, v in json.loads(stdout.strip().splitlines()[-1]).items():
                    stages.setdefault(k, []).append(v)
    pair = [c / b for c, b in zip(times["cli"], times["baseline"], strict=True)]
    r: dict = {
        "cli_name": cli_name,
        "reps": reps,
        "warmup": warmup,
        "python": sys.version.split()[0],
        "dont_write_bytecode": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
        "median_s": {n: statistics.median(v) for n, v in times.items()},
        "ratio": _ratio(times, "cli", "baseline")[0],
        "ratio_median_of_reps": statistics.median(pair),
        "ratio_min_max_of_reps": (min(pair), max(pair)),
        "stages_s": {k: statistics.median(v) for k, v in stages.items()},
        "goal": GOAL,
        "load": (load_before, os.getloadavg()[0]),
    }
    if breakdown:
        r["whatif"] = {
            "both commands with the bytecode cache on": _ratio(times, "cli, pyc", "baseline, pyc"),
            "CLI + jinja2 bytecode cache": _ratio(times, "cli+jinja cache", "baseline"),
            "compile via compiler.api, no typer/rich": _ratio(times, "api", "baseline"),
            "  + jinja2 bytecode cache": _ratio(times, "api+jinja cache", "baseline"),
            "  + jinja2 bytecode cache + Python bytecode cache": _ratio(
                times, "api+jinja cache, pyc", "baseline, pyc"),
        }
    # what the CLI imports beyond the baseline (one -X importtime run each: context)
    base_mods = _import_times([py, "-c", BASELINE_IMPORTS])
    # compiler.main: the console script's module, as the timed command runs it
    cli_mods = _import_times([py, "-m", "compiler.main", *_cli_args(tmp / "importtime")])
    extra = {m: us for m, us in cli_mods.items() if m not in base_mods}
    by_pkg: Counter[str] = Counter()
    for m, us in extra.items():
        by_pkg[m.split(".")[0]] += us
    r["importtime_extra_us"] = sum(extra.values())
    r["importtime_by_package_us"] = dict(by_pkg.most_common(8))
    r["importtime_top_modules_us"] = dict(Counter(extra).most_common(6))
    # which heavy modules the compile leaves in sys.modules
    p = subprocess.run([py, "-c", _MODULES % ((*FORBIDDEN, *CLI_FRAMEWORK),), SPEC,
                        str(tmp / "modules")], cwd=ROOT, capture_output=True, text=True,
                       check=True)
    r["modules"] = json.loads(p.stdout.strip().splitlines()[-1])
    return r


def show_compile(r: dict) -> None:
    med = r["median_s"]
    print(f"[compile] `rlspec compile {SPEC} -o <tmp> --force` vs "
          f"`python -c \"{BASELINE_IMPORTS}\"`, fresh processes, interleaved")
    print(f"  CLI/baseline: {r['ratio']:.2f}x (ratio of medians; goal ≤ {r['goal']:.1f}x) "
          f"{'PASS' if r['ratio'] <= r['goal'] else 'OVER GOAL'}")
    lo, hi = r["ratio_min_max_of_reps"]
    print(f"  median of per-repetition ratios: {r['ratio_median_of_reps']:.2f}x "
          f"(range {lo:.2f}x-{hi:.2f}x)")
    print(f"  context: {r['reps']} reps after {r['warmup']} warm-up, via {r['cli_name']}, "
          f"python {r['python']}, PYTHONDONTWRITEBYTECODE={r['dont_write_bytecode'] or '(unset)'}; "
          f"medians CLI {med['cli'] * 1e3:.0f} ms, baseline {med['baseline'] * 1e3:.0f} ms; "
          f"load average (1 min) {r['load'][0]:.2f} before, {r['load'][1]:.2f} after, "
          f"{os.cpu_count()} cores")
    if "whatif" in r:
        b = med["baseline"]
        steps = [
            ("baseline", "baseline"),
            ("+BaseModel", "+ pydantic's model machinery (from pydantic import BaseModel)"),
            ("+typer,rich", "+ typer, rich.console (the CLI framework)"),
            ("import cli", "rlspec's modules (import compiler.cli, compiler.api)"),
            ("cli", "the CLI's compile (yaml, validation, jinja, write)"),
        ]
        print("[compile breakdown] cumulative steps, medians as multiples of the baseline's")
        for (prev, _), (name, label) in itertools.pairwise(steps):
            print(f"  {label}: {med[name] / b:.2f}x (+{(med[name] - med[prev]) / b:.2f}x)")
        print("  the compile's stages in-process (medians, as multiples of the baseline process):")
        for k, v in r["stages_s"].items():
            print(f"    {k}: {v / b:.2f}x ({v * 1e3:.0f} ms)")
        print("[compile what-ifs] project unchanged; ratio of medians to the baseline "
              "(median of per-repetition ratios)")
        for k, (ratio, per_rep) in r["whatif"].items():
            print(f"  {k}: {ratio:.2f}x ({per_rep:.2f}x)")
    print("[compile imports] modules the CLI imports beyond the baseline (one -X importtime "
          "run; self times, inflated by -X importtime: context)")
    print(f"  total {r['importtime_extra_us'] / 1e3:.0f} ms; by package: " + ", ".join(
        f"{k} {v / 1e3:.0f} ms" for k, v in r["importtime_by_package_us"].items()))
    print("  largest modules: " + ", ".join(
        f"{k} {v / 1e3:.0f} ms" for k, v in r["importtime_top_modules_us"].items()))
    mods = r["modules"]
    bad = [m for m in FORBIDDEN if mods[m]]
    print(f"  after compile (CLI in-process, exit {mods['exit']}): 'torch' in sys.modules = "
          f"{mods['torch']}; " + ", ".join(f"{m} {mods[m]}" for m in FORBIDDEN[1:])
          + f" -> {'OK' if not bad else 'FAIL: ' + ', '.join(bad)}")
    print("  imported by compiler/cli.py at module level: "
          + ", ".join(f"{m} {mods[m]}" for m in CLI_FRAMEWORK))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    args = ap.parse_args(argv)
    r = measure_compile(args.reps, args.warmup, args.breakdown)
    show_compile(r)
    # over the time goal is reported, not an error; torch & co. imported by compile is one
    return 1 if any(r["modules"][m] for m in FORBIDDEN) else 0


if __name__ == "__main__":
    sys.exit(main())
