# size: one runner: the target map, the sampling, the mutmut driver and the report share one run's state; the map grows
#   with every pure module brought under mutation testing.
"""Mutation testing of the pure core: ``python -m ops.mutate [MODULE ...] [--sample N] [--time-box S] [--check]``.

Each pure core module is mapped to the few fast test files that exercise it (no Redis, no network);
mutmut makes the mutants and runs, for each one, the tests of that list that reach the mutated
function.  A mutant that survives must be explained: either a test is added that kills it, or it is
listed in ``docs/mutants-equivalent.txt`` as equivalent (no behaviour can tell it from the code).  That
list is keyed by module, function and the changed line(s), never by mutmut's per-function counter,
which shifts when code moves.

The run happens in a scratch copy of the work tree (the packages, ``tests/``, ``pyproject.toml`` and a
generated ``setup.cfg`` holding mutmut's configuration), so the tree itself is never touched.

- no argument: every module of :data:`TARGETS`, every mutant; prints per-module figures;
- ``--sample N``: N mutants, first from the target modules changed since ``--base`` (default: the merge
  base with ``main``, or the previous commit on ``main`` itself), the rest drawn at random with ``--seed``
  (default: the commit checked out, so each commit samples differently and a failure reproduces);
- ``--time-box S``: the whole command ends within about S seconds; mutants not reached are reported as
  not run, never as failures;
- ``--check``: exit 1 when a mutant that ran survived and is not on the equivalent list; on a full run
  also when a module kills under :data:`MIN_SCORE` of its mutants or an entry of the list no longer
  matches a survivor.

Exit status: 0 done (and, with ``--check``, passed), 1 check failed or mutmut failed, 2 bad arguments.
Cost: one copy of the tree, one mutmut generation (libcst, a few seconds), one run of the mapped tests
to learn which test reaches which function, then one forked test run per mutant, two at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["EQUIVALENT_FILE", "MIN_SCORE", "TARGETS", "Equivalent", "Mutant", "Target", "load_equivalents", "main"]

ROOT: Final = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE: Final = ROOT / "docs" / "mutants-equivalent.txt"
#: a full ``--check`` run fails when a module kills less than this share of its mutants
MIN_SCORE: Final = 0.90
#: what the scratch copy holds besides the target packages
_COPY: Final = ("ingestor", "consumer_sdk", "distributor", "ops", "tests", "pyproject.toml")
#: seconds kept after the mutants for describing the survivors and the report
_RESERVE: Final = 15.0
#: mutmut's output, in the scratch directory (it also marks a directory ``--keep`` may empty)
_LOG: Final = "mutmut.log"


@dataclass(frozen=True, slots=True)
class Target:
    """A pure core module, the fast test files that exercise it, and (if not all) the functions mutated."""

    path: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return self.path.removesuffix(".py").replace("/", ".")


TARGETS: Final = (
    Target(
        "consumer_sdk/core/sequencing.py",
        ("tests/consumer_sdk/test_sequencing.py", "tests/consumer_sdk/test_mutants_sequencing.py"),
    ),
    Target(
        "ingestor/sequencer.py",
        ("tests/consumer_sdk/test_sequencing.py", "tests/consumer_sdk/test_mutants_sequencing.py"),
    ),
    Target(
        "ingestor/binance.py",
        (
            "tests/ingestor/test_binance.py",
            "tests/consumer_sdk/test_sequencing.py",
            "tests/ingestor/test_mutants_binance.py",
            "tests/ingestor/test_mutants_binance_venue.py",
        ),
    ),
    # the field checks every venue parser applies: the parsers' refusal tests (spot, USD-M, OKX)
    Target(
        "ingestor/fields.py",
        (
            "tests/ingestor/test_binance.py",
            "tests/consumer_sdk/test_sequencing.py",
            "tests/ingestor/test_mutants_binance.py",
            "tests/ingestor/test_mutants_binance_venue.py",
            "tests/ingestor/test_binance_usdm.py",
            "tests/ingestor/test_okx.py",
            "tests/ingestor/test_fields.py",
        ),
    ),
    Target("ingestor/depth.py", ("tests/ingestor/test_depth.py", "tests/ingestor/test_mutants_depth.py")),
    Target("ingestor/depth_pacer.py", ("tests/ingestor/test_depth.py", "tests/ingestor/test_mutants_depth.py")),
    # the frame parser only: the connection class around it is I/O, covered by tests/ingestor/test_wsframes.py
    Target(
        "ingestor/wsframes.py",
        ("tests/ingestor/test_wsframes.py", "tests/ingestor/test_mutants_wsframes.py"),
        ("read_frames",),
    ),
    Target(
        "distributor/ingress.py",
        (
            "tests/distributor/test_ingress.py",
            "tests/distributor/test_mutants_ingress.py",
            "tests/distributor/test_control_books.py",
        ),
    ),
    Target(
        "consumer_sdk/core/backoff.py",
        ("tests/ingestor/test_backoff_lifecycle.py", "tests/consumer_sdk/test_mutants_backoff.py"),
    ),
    Target(
        "ingestor/lifecycle.py",
        ("tests/ingestor/test_backoff_lifecycle.py", "tests/consumer_sdk/test_mutants_backoff.py"),
    ),
    Target(
        "distributor/control/state.py",
        ("tests/distributor/test_control.py", "tests/distributor/test_mutants_control.py"),
    ),
    Target(
        "distributor/control/codec.py",
        ("tests/distributor/test_control.py", "tests/distributor/test_mutants_control.py"),
    ),
    Target(
        "distributor/control/degrade.py",
        (
            "tests/distributor/test_control.py",
            "tests/distributor/test_mutants_control.py",
            "tests/distributor/test_control_books.py",
        ),
    ),
    Target(
        "distributor/control/gate.py",
        (
            "tests/distributor/test_control.py",
            "tests/distributor/test_mutants_control.py",
            "tests/distributor/test_control_books.py",
        ),
    ),
    Target(
        "consumer_sdk/book.py",
        (
            "tests/consumer_sdk/test_book.py",
            "tests/consumer_sdk/test_book_stream.py",
            "tests/consumer_sdk/test_mutants_book.py",
        ),
    ),
    Target(
        "consumer_sdk/book_stream.py",
        (
            "tests/consumer_sdk/test_book.py",
            "tests/consumer_sdk/test_book_stream.py",
            "tests/consumer_sdk/test_mutants_book.py",
        ),
    ),
    # the record framing and the check at open; tests/distributor/test_spill.py drives a real Redis and is not mapped
    Target(
        "distributor/spill.py", ("tests/distributor/test_mutants_spill.py",),
        ("frame_records", "parse_records", "SpillLog._open_segment"),
    ),
)

#: mutmut's exit codes per mutant, by what they mean here
_KILLED: Final = frozenset({1, 3})
_TIMEOUT: Final = frozenset({36, -24, 24, 152, 255, -9, -11})
_SURVIVED: Final = frozenset({0})
_NO_TESTS: Final = frozenset({5, 33})


class UsageError(Exception):
    """Bad arguments or a bad equivalent list: one line, exit status 2."""


class RunError(Exception):
    """mutmut itself failed (the clean tests fail, say): exit status 1 with mutmut's output."""


# ------------------------------------------------------------------------------------------- mutants


@dataclass(frozen=True, slots=True)
class Mutant:
    """One mutant: mutmut's name for it and what it belongs to."""

    name: str
    target: Target

    @property
    def function(self) -> str:
        """``Class.method`` or ``function``, from ``<module>.xǁClassǁmethod__mutmut_3`` / ``<module>.x_f__mutmut_3``."""
        mangled = self.name[len(self.target.module) + 1 :].rsplit("__mutmut_", 1)[0]
        if mangled.startswith("xǁ"):
            return ".".join(part for part in mangled[2:].split("ǁ") if part)
        return mangled.removeprefix("x_")


@dataclass(frozen=True, slots=True)
class Equivalent:
    """An entry of the equivalent list: the mutant (module, function, lines before and after) and why."""

    path: str
    function: str
    before: tuple[str, ...]
    after: tuple[str, ...]
    why: str

    @property
    def key(self) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
        return (self.path, self.function, self.before, self.after)


def describe(diff: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The changed lines of a unified diff, leading whitespace dropped: ``(removed, added)``."""
    before: list[str] = []
    after: list[str] = []
    for line in diff.splitlines():
        if line.startswith(("---", "+++")):
            continue
        if line.startswith("-"):
            before.append(line[1:].strip())
        elif line.startswith("+"):
            after.append(line[1:].strip())
    return tuple(before), tuple(after)


def load_equivalents(path: Path) -> list[Equivalent]:
    """Parse the equivalent list: blocks separated by blank lines, ``#`` lines are comments::

        ingestor/sequencer.py Sequencer.seed
        - <line as in the code>
        + <line as mutated>
        why: <reason, may continue on the next lines>
    """
    if not path.exists():
        return []
    out: list[Equivalent] = []
    blocks: list[list[tuple[int, str]]] = [[]]
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.rstrip()
        if line.startswith("#"):
            continue
        if not line:
            if blocks[-1]:
                blocks.append([])
            continue
        blocks[-1].append((number, line))
    for block in blocks:
        if not block:
            continue
        number, head = block[0]
        parts = head.split()
        if len(parts) != 2 or not parts[0].endswith(".py"):
            raise UsageError(f"{path.name}:{number}: expected 'module/path.py function', got {head!r}")
        before: list[str] = []
        after: list[str] = []
        why: list[str] = []
        for n, line in block[1:]:
            if why:
                why.append(line.strip())
            elif line.startswith("- ") or line == "-":
                before.append(line[2:].strip())
            elif line.startswith("+ ") or line == "+":
                after.append(line[2:].strip())
            elif line.startswith("why:"):
                why.append(line[4:].strip())
            else:
                raise UsageError(f"{path.name}:{n}: expected '- line', '+ line' or 'why: reason', got {line!r}")
        if not (before or after) or not " ".join(why).strip():
            raise UsageError(f"{path.name}:{number}: an entry needs its changed lines and a 'why:' reason")
        out.append(Equivalent(parts[0], parts[1], tuple(before), tuple(after), " ".join(why).strip()))
    return out


# ------------------------------------------------------------------------------------------- mutmut


#: mutmut has no command that only makes the mutants or prints a mutant's diff without its status
#: banner; these call the functions its own ``run`` and ``show`` call (mutmut is pinned to 3.8.x)
_HELPER: Final = r"""
import json, os, sys
import mutmut.__main__ as m
if sys.argv[1] == "generate":
    m.set_mutant_under_test("mutant_generation")
    os.makedirs("mutants", exist_ok=True)
    m.copy_src_dir()
    m.copy_also_copy_files()
    m.setup_source_paths()
    m.create_mutants(int(sys.argv[2]))
else:
    names = json.load(sys.stdin)
    json.dump({n: m.get_diff_for_mutant(n, path=m.find_mutant(n).path) for n in names}, sys.stdout)
"""


def _write_config(work: Path, targets: Sequence[Target], tests: Iterable[str]) -> None:
    packages = sorted({t.path.split("/", 1)[0] for t in targets})
    lines = [
        "[mutmut]",
        "source_paths =",
        *(f"    {p}" for p in packages),
        "only_mutate =",
        *(f"    {t.path}" for t in targets),
        "also_copy =",
        *(f"    {p}" for p in _COPY if p not in packages),
        "pytest_add_cli_args_test_selection =",
        *(f"    {t}" for t in sorted(set(tests))),
        "pytest_add_cli_args =",
        "    -p",
        "    no:cacheprovider",
        # CPU seconds a mutant may take: (its tests' clean time + 1) * 3 * 2; an endless loop is a kill
        "timeout_multiplier = 3.0",
        "",
    ]
    (work / "setup.cfg").write_text("\n".join(lines), encoding="utf-8")


def _helper(work: Path, *args: str, stdin: str | None = None, log: Path | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", _HELPER, *args], cwd=work, input=stdin, capture_output=True, text=True, env=_env(),
        check=False,
    )
    if log is not None:
        with log.open("a", encoding="utf-8") as f:
            f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RunError(f"mutmut ({args[0]}) failed ({proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}")
    return proc.stdout


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def _run_mutants(work: Path, names: Sequence[str], stop_at: float | None, log: Path) -> bool:
    """``mutmut run NAMES``; at ``stop_at`` (monotonic) it is interrupted.  True when it was cut short."""
    with log.open("a", encoding="utf-8") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(os.cpu_count() or 2), *names],
            cwd=work, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True,
        )
        cut = False
        try:
            proc.wait(timeout=None if stop_at is None else max(0.0, stop_at - time.monotonic()))
        except subprocess.TimeoutExpired:
            cut = True
            proc.send_signal(signal.SIGINT)  # mutmut stops its workers and keeps what finished
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        finally:
            if proc.poll() is None or cut:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if not cut and proc.returncode != 0:
        raise RunError(f"mutmut run failed ({proc.returncode}):\n{_tail(log.read_text(encoding='utf-8'))}")
    return cut


def _results(work: Path, targets: Sequence[Target]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for t in targets:
        meta = work / "mutants" / (t.path + ".meta")
        if meta.exists():
            out.update(json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"])
    return out


# ------------------------------------------------------------------------------------------- choosing


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def changed_paths(base: str | None) -> set[str]:
    """Files that differ between the work tree and ``base`` (default: the merge base with ``main``, or the
    previous commit when that is the commit checked out)."""
    if base is None:
        head = _git("rev-parse", "HEAD")
        base = _git("merge-base", "HEAD", "main") or _git("merge-base", "HEAD", "origin/main")
        if base is None or base == head:
            base = _git("rev-parse", "HEAD~1")
        if base is None:
            return set()
    names = _git("diff", "--name-only", base, "--")
    return set(names.splitlines()) if names else set()


def choose(mutants: Sequence[Mutant], n: int, seed: str, changed: set[str]) -> list[Mutant]:
    """``n`` mutants: those of changed modules first, each group in an order drawn from ``seed``."""
    rng = random.Random(seed)
    first = sorted((m for m in mutants if m.target.path in changed), key=lambda m: m.name)
    rest = sorted((m for m in mutants if m.target.path not in changed), key=lambda m: m.name)
    rng.shuffle(first)
    rng.shuffle(rest)
    return (first + rest)[:n]


def resolve(names: Sequence[str], targets: Sequence[Target] = TARGETS) -> list[Target]:
    """Those of ``targets`` named by path (``ingestor/sequencer.py``), dotted module or unique file stem."""
    if not names:
        return list(targets)
    out: list[Target] = []
    for name in names:
        found = [
            t for t in targets
            if name in (t.path, t.module, t.path.removesuffix(".py")) or name == Path(t.path).stem
        ]
        if len(found) != 1:
            known = ", ".join(t.path for t in targets)
            what = "is ambiguous" if found else "is not a pure core module"
            raise UsageError(f"{name!r} {what}: choose among {known}")
        if found[0] not in out:
            out.append(found[0])
    return out


# ------------------------------------------------------------------------------------------- the run


@dataclass(slots=True)
class Row:
    mutants: int = 0
    killed: int = 0
    survived: int = 0
    equivalent: int = 0
    unexplained: int = 0
    not_run: int = 0

    @property
    def score(self) -> float:
        ran = self.mutants - self.not_run
        return self.killed / ran if ran else 1.0


@contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    """A fresh scratch directory, removed afterwards; or ``keep``, emptied first if a previous run left it."""
    if keep is not None:
        if keep.exists():
            shutil.rmtree(keep)
        keep.mkdir(parents=True)
        yield keep
        return
    path = Path(tempfile.mkdtemp(prefix="market-mutate-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _copy_tree(work: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache", "*.egg-info")
    for name in _COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=ignore)
        else:
            shutil.copy2(src, work / name)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ops.mutate", description=__doc__.split("\n", 1)[0])
    p.add_argument("modules", nargs="*", metavar="MODULE", help="pure core modules (default: all)")
    p.add_argument("--sample", type=int, metavar="N", help="run N mutants: changed modules first, then at random")
    p.add_argument("--time-box", type=float, metavar="S", help="end within about S seconds")
    p.add_argument("--check", action="store_true", help="exit 1 on a survivor that is not on the equivalent list")
    p.add_argument("--seed", help="what the sample is drawn from (default: the commit checked out)")
    p.add_argument("--base", help="git ref the changed modules are found against (default: merge base with main)")
    p.add_argument("--equivalents", type=Path, default=EQUIVALENT_FILE, help="the equivalent list")
    p.add_argument("--keep", type=Path, metavar="DIR", help="run in DIR and keep it (mutmut browse works there)")
    args = p.parse_args(argv)
    if args.sample is not None and args.sample < 1:
        raise UsageError(f"--sample must be at least 1, got {args.sample}")
    keep = args.keep
    ours = keep is not None and keep.is_dir() and (not any(keep.iterdir()) or (keep / _LOG).exists())
    if keep is not None and keep.exists() and not ours:
        raise UsageError(f"--keep {str(keep)!r}: not empty and not left by a previous run; choose a new directory")
    if args.time_box is not None and not args.time_box > _RESERVE:
        raise UsageError(f"--time-box must be more than {_RESERVE:g} seconds, got {args.time_box:g}")
    return args


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    targets = resolve(args.modules)
    equivalents = load_equivalents(args.equivalents)
    known = {t.path for t in TARGETS}
    for e in equivalents:
        if e.path not in known:
            raise UsageError(f"{args.equivalents.name}: {e.path} is not a pure core module")
    stop_at = None if args.time_box is None else started + args.time_box - _RESERVE
    try:
        import mutmut  # noqa: F401
    except ImportError:
        raise UsageError("mutmut is not installed: pip install -e '.[dev]' (or run ops/dev.sh mutate)") from None

    with _workdir(args.keep) as work:
        log = work / _LOG
        log.touch()
        _copy_tree(work)
        _write_config(work, targets, (f for t in targets for f in t.tests if (ROOT / f).exists()))
        _helper(work, "generate", str(os.cpu_count() or 2), log=log)
        mutants: list[Mutant] = []
        for name in _results(work, targets):
            m = Mutant(name, next(t for t in targets if name.startswith(t.module + ".x")))
            target = m.target
            if not target.functions or m.function in target.functions:
                mutants.append(m)
        chosen = mutants
        if args.sample is not None:
            seed = args.seed or _git("rev-parse", "HEAD") or time.strftime("%Y-%m-%d")
            chosen = choose(mutants, args.sample, seed, changed_paths(args.base))
            print(f"sample: {len(chosen)} of {len(mutants)} mutants, seed {seed[:12]}")
            ran_targets = [t for t in targets if any(m.target is t for m in chosen)]
            _write_config(work, targets, (f for t in ran_targets for f in t.tests if (ROOT / f).exists()))
        run_started = time.monotonic()
        cut = bool(chosen) and _run_mutants(work, [m.name for m in chosen], stop_at, log)
        mutants_seconds = time.monotonic() - run_started
        codes = _results(work, targets)
        open_ = [m for m in chosen if codes.get(m.name) in _SURVIVED | _NO_TESTS]
        diffs: dict[str, str] = {}
        if open_:
            diffs = json.loads(_helper(work, "diff", stdin=json.dumps([m.name for m in open_])))

    return _report(
        args, targets, mutants, chosen, codes, diffs, equivalents, cut,
        total=time.monotonic() - started, mutants_seconds=mutants_seconds,
    )


def _report(
    args: argparse.Namespace, targets: Sequence[Target], mutants: Sequence[Mutant], chosen: Sequence[Mutant],
    codes: dict[str, int | None], diffs: dict[str, str], equivalents: Sequence[Equivalent], cut: bool, *,
    total: float, mutants_seconds: float,
) -> int:
    rows = {t.path: Row() for t in targets}
    listed = Counter(e.key for e in equivalents)
    matched: Counter[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = Counter()
    unexplained: list[tuple[Mutant, str, tuple[tuple[str, ...], tuple[str, ...]]]] = []
    for m in chosen:
        row = rows[m.target.path]
        row.mutants += 1
        code = codes.get(m.name)
        if code in _KILLED or code in _TIMEOUT:
            row.killed += 1
            continue
        if code not in _SURVIVED and code not in _NO_TESTS:
            row.not_run += 1
            continue
        row.survived += 1
        before, after = describe(diffs.get(m.name, ""))
        key = (m.target.path, m.function, before, after)
        if matched[key] < listed[key]:
            matched[key] += 1
            row.equivalent += 1
        else:
            row.unexplained += 1
            unexplained.append((m, "no test reaches it" if code in _NO_TESTS else "survived", (before, after)))

    print(f"{'module':<28} {'mutants':>7} {'killed':>6} {'survived':>8} {'equivalent':>10} {'unexplained':>11}"
          f" {'not run':>7} {'killed %':>8}")
    every = Row(*(sum(getattr(r, f) for r in rows.values()) for f in Row.__slots__))
    for path, row in [*rows.items(), ("total", every)]:
        score = f"{100 * row.score:>7.1f}%" if row.mutants > row.not_run else f"{'-':>8}"
        print(f"{path:<28} {row.mutants:>7} {row.killed:>6} {row.survived:>8} {row.equivalent:>10}"
              f" {row.unexplained:>11} {row.not_run:>7} {score}")
    print(f"time: {total:.0f} s in all, {mutants_seconds:.0f} s in mutmut run (mapping the tests, then the mutants)"
          + (" (cut by the time box)" if cut else ""))

    failed = False
    for m, status, (before, after) in unexplained:
        print(f"\nunexplained ({status}): {m.name}\n{m.target.path} {m.function}")
        print("\n".join([*(f"- {x}" for x in before), *(f"+ {x}" for x in after)]))
        failed = True
    full = args.sample is None and not cut
    if full:
        ran = {t.path for t in targets}
        stale = [e for e in equivalents if e.path in ran and matched[e.key] < listed[e.key]]
        seen: set[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = set()
        for e in stale:
            if e.key in seen:
                continue
            seen.add(e.key)
            print(f"\nstale entry in {args.equivalents.name} (no such survivor): {e.path} {e.function}")
            print("\n".join([*(f"- {x}" for x in e.before), *(f"+ {x}" for x in e.after)]))
            failed = True
        for path, row in rows.items():
            if row.mutants and row.score < MIN_SCORE:
                print(f"\n{path}: {100 * row.score:.1f}% of its mutants killed, under {100 * MIN_SCORE:.0f}%")
                failed = True
    if args.check and failed:
        listed_in = args.equivalents.relative_to(ROOT) if args.equivalents.is_relative_to(ROOT) else args.equivalents
        print(f"\nmutation check failed: kill each survivor with a test, or list it as equivalent in {listed_in}")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(_parse_args(argv))
    except UsageError as exc:
        print(f"ops.mutate: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"ops.mutate: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
